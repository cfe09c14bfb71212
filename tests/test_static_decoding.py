"""Static-cache decoding (ituning/static_decoding.py) gives the tokens and scores of the dynamic
cache and of the recomputing reference, for beams that finish unevenly, min_length, padded batches,
greedy decoding and the compiled forward; and DecodingConfig.compile picks the step."""

import logging
from functools import partial

import pytest
import torch

from ituning import static_decoding
from ituning.decoding import (CachedStep, DecodingConfig, RecomputingStep, decoding_step, generate, greedy_search,
                              ranked_beams)
from ituning.fast_paths import FastPathFailed, fallbacks, outcomes
from ituning.static_decoding import StaticCacheStep, kept_decoder_sizes
from tests.conftest import random_visual, tiny_captioner

EOS = 0
PROMPT = torch.tensor([[EOS]])


def early_finishing_captioner(seed: int = 2):
    """Two layers in float64 (cached and static logits stay far from ties, so tokens compare exactly),
    EOS made likelier so that some images finish all their beams well before others."""
    torch.manual_seed(seed)
    model = tiny_captioner(n_layer=2).double()
    with torch.no_grad():
        model.language_model.lm_head.weight[EOS] *= 3  # tied to the EOS embedding: the prompt changes too
    return model


def static_step(config: DecodingConfig, compile: str = "never"):
    return partial(StaticCacheStep, max_new_tokens=config.max_length, compile=compile)


def beam_tokens(ranked) -> list[list[list[int]]]:
    return [[beam.tokens for beam in beams] for beams in ranked]


def beam_scores(ranked) -> torch.Tensor:
    return torch.tensor([[beam.score for beam in beams] for beams in ranked])  # (B, K)


def assert_same_beams(ranked, expected):
    assert beam_tokens(ranked) == beam_tokens(expected)
    torch.testing.assert_close(beam_scores(ranked), beam_scores(expected))


def finished_early(ranked, max_length: int) -> list[bool]:
    """Images whose every hypothesis ended before the last two steps (they idled while others decoded)."""
    return [all(len(beam.tokens) <= max_length - 2 for beam in beams) for beams in ranked]


@pytest.mark.parametrize(
    "config",
    [DecodingConfig(num_beams=5, max_length=10),
     DecodingConfig(num_beams=5, max_length=9, min_length=4, length_penalty=0.6),
     DecodingConfig(num_beams=3, max_length=8, length_penalty=0.0)],
)
def test_static_beam_search_equals_the_cached_and_recomputing_steps(config):
    model = early_finishing_captioner()
    visual = random_visual(4).double()
    static = ranked_beams(model, visual, PROMPT, EOS, config, step=static_step(config))
    assert_same_beams(static, ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep))
    assert_same_beams(static, ranked_beams(model, visual, PROMPT, EOS, config, step=RecomputingStep))
    assert all(len(beam.tokens) >= config.min_length for beams in static for beam in beams)
    if config.min_length == 0:  # the premise: some images are done early, others run to max_length
        early = finished_early(static, config.max_length)
        assert any(early) and not all(early)


@pytest.mark.parametrize("min_length", [0, 3])
def test_static_greedy_equals_the_cached_and_recomputing_steps(min_length):
    model = early_finishing_captioner()
    visual = random_visual(5).double()
    config = DecodingConfig(num_beams=1, max_length=10, min_length=min_length)
    static = greedy_search(model, visual, PROMPT, EOS, config, step=static_step(config))
    assert static == greedy_search(model, visual, PROMPT, EOS, config, step=CachedStep)
    assert static == greedy_search(model, visual, PROMPT, EOS, config, step=RecomputingStep)
    lengths = {len(tokens) for tokens in static}
    assert len(lengths) > 1 and min(lengths) >= min_length


def test_under_autocast_the_cache_holds_the_dtype_the_layers_compute_in():
    """Evaluation runs float32 weights under bf16 autocast on CUDA; CPU autocast computes the same way."""
    torch.manual_seed(0)
    model = tiny_captioner(n_layer=2)
    visual = random_visual(3)
    config = DecodingConfig(num_beams=3, max_length=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        static = ranked_beams(model, visual, PROMPT, EOS, config, step=static_step(config))
        cached = ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep)
    assert beam_tokens(static) == beam_tokens(cached)
    assert kept_decoder_sizes(model) == [3]


def test_smaller_batches_are_padded_into_the_kept_decoder_and_a_larger_one_gets_its_own():
    model = early_finishing_captioner()
    config = DecodingConfig(num_beams=5, max_length=8)
    for images, sizes in ((4, [4]), (3, [4]), (1, [4]), (6, [4, 6]), (5, [4, 6])):
        visual = random_visual(images).double()
        static = ranked_beams(model, visual, PROMPT, EOS, config, step=static_step(config))
        assert_same_beams(static, ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep))
        assert kept_decoder_sizes(model) == sizes


class AddressRecordingStep(StaticCacheStep):
    def __call__(self, sequences, beam_sources):
        log_probs = super().__call__(sequences, beam_sources)
        decoder = self.decoder
        tensors = [decoder.tokens, *(t for layer in decoder.cache.layers for t in (layer.keys, layer.values))]
        tensors += [t for memory in decoder.memory for t in (memory.key, memory.value)]
        self.addresses.append([tensor.data_ptr() for tensor in tensors])
        return log_probs


def test_beams_are_reordered_in_place_so_no_tensor_of_the_step_moves():
    """CUDA graphs read fixed addresses: the cache, visual memory and token buffer never move."""
    model = early_finishing_captioner()
    config = DecodingConfig(num_beams=5, max_length=8)
    AddressRecordingStep.addresses = []
    for images in (3, 2):  # the second batch reuses the first one's tensors
        step = partial(AddressRecordingStep, max_new_tokens=config.max_length)
        ranked_beams(model, random_visual(images).double(), PROMPT, EOS, config, step=step)
    assert len(AddressRecordingStep.addresses) > 10
    assert all(addresses == AddressRecordingStep.addresses[0] for addresses in AddressRecordingStep.addresses)


def test_a_decoder_in_use_is_not_shared_by_a_second_live_step():
    model = early_finishing_captioner()
    first_visual, second_visual = random_visual(2).double(), random_visual(2).double()
    first, second = StaticCacheStep(model, first_visual, 4), StaticCacheStep(model, second_visual, 4)
    first_cached, second_cached = CachedStep(model, first_visual), CachedStep(model, second_visual)
    sequences = PROMPT.expand(2, -1)  # (B, 1)
    for _ in range(3):  # interleaved greedy steps of two batches
        expected_first, expected_second = first_cached(sequences, None), second_cached(sequences, None)
        torch.testing.assert_close(first(sequences, None), expected_first)
        torch.testing.assert_close(second(sequences, None), expected_second)
        sequences = torch.cat([sequences, expected_first.argmax(-1, keepdim=True)], dim=1)
    assert kept_decoder_sizes(model) == [2, 2]


def test_a_step_refuses_to_write_past_its_cache():
    model = early_finishing_captioner(0)
    config = DecodingConfig(num_beams=2, max_length=6, min_length=5)
    with pytest.raises(RuntimeError, match="max_new_tokens=3"):
        ranked_beams(model, random_visual(2).double(), PROMPT, EOS, config,
                     step=partial(StaticCacheStep, max_new_tokens=3))


def test_the_compile_setting_is_checked():
    with pytest.raises(ValueError, match="DecodingConfig.compile must be one of auto, never, always"):
        DecodingConfig(compile="sometimes")
    with pytest.raises(ValueError, match="compile must be one of"):
        StaticCacheStep(early_finishing_captioner(0), random_visual(1).double(), 4, compile="yes")


def test_the_compile_setting_picks_the_step():
    config = DecodingConfig(max_length=7)
    assert decoding_step(config, torch.device("cpu")) is CachedStep
    assert decoding_step(DecodingConfig(compile="never"), torch.device("cuda")) is CachedStep
    for setting, device in (("auto", "cuda"), ("always", "cpu"), ("always", "cuda")):
        step = decoding_step(DecodingConfig(max_length=7, compile=setting), torch.device(device))
        assert step.func is StaticCacheStep and step.keywords == {"max_new_tokens": 7, "compile": setting}
    model = early_finishing_captioner(0)
    generate(model, random_visual(2).double(), PROMPT, EOS, DecodingConfig(num_beams=2, max_length=4))
    assert kept_decoder_sizes(model) == []  # "auto" on CPU: the dynamic cache


def test_an_explicit_step_wins_over_the_compile_setting():
    from ituning.decoding import BlindStep

    model = early_finishing_captioner(0)
    visual = random_visual(3).double()
    always, never = (DecodingConfig(num_beams=3, max_length=6, compile=setting) for setting in ("always", "never"))
    blind = generate(model, visual, PROMPT, EOS, always, step=BlindStep)
    assert blind == generate(model, visual, PROMPT, EOS, never, step=BlindStep)
    assert blind[0] == blind[1] == blind[2]  # the caption-blind baseline ignores the image
    recomputed = generate(model, visual, PROMPT, EOS, always, step=RecomputingStep)
    assert recomputed == generate(model, visual, PROMPT, EOS, never)
    assert kept_decoder_sizes(model) == []  # nothing was compiled or preallocated


def compiler_failing_at_first_call(forward):
    def compiled(*args):
        raise RuntimeError("no working C++ compiler found")

    return compiled


def compiler_failing_at_once(forward):
    raise RuntimeError("no working C++ compiler found")


@pytest.mark.parametrize("failing_compiler", [compiler_failing_at_first_call, compiler_failing_at_once])
def test_a_failed_compile_raises_for_always_and_falls_back_once_for_auto(monkeypatch, caplog, failing_compiler):
    """`failing_compiler` stands in for a machine where compiling fails (no C++ compiler for
    inductor on CPU, a broken toolchain on CUDA, a Python that torch.compile does not support)."""
    monkeypatch.setattr(static_decoding, "compile_one_token_forward", failing_compiler)
    config = DecodingConfig(num_beams=3, max_length=6)
    visual = random_visual(3).double()
    model = early_finishing_captioner(0)
    with pytest.raises(RuntimeError, match="DecodingConfig.compile='always'.*no working C\\+\\+ compiler"):
        ranked_beams(model, visual, PROMPT, EOS, config, step=static_step(config, "always"))

    model = early_finishing_captioner(0)
    expected = ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep)
    with caplog.at_level(logging.WARNING, logger="ituning.fast_paths"):
        assert_same_beams(ranked_beams(model, visual, PROMPT, EOS, config, step=static_step(config, "auto")), expected)
        assert_same_beams(ranked_beams(model, visual[:2], PROMPT, EOS, config, step=static_step(config, "auto")),
                          expected[:2])
        larger = random_visual(4).double()
        assert_same_beams(ranked_beams(model, larger, PROMPT, EOS, config, step=static_step(config, "auto")),
                          ranked_beams(model, larger, PROMPT, EOS, config, step=CachedStep))
    assert len([record for record in caplog.records if "(static_decoding) fell back" in record.getMessage()]) == 1
    assert "decoding with the uncompiled static cache" in fallbacks()["static_decoding"]


def compiler_off_by_a_little(forward):
    """A compiled forward whose log-probabilities drift: the mismatch a miscompiled graph would give."""
    return lambda *args: forward(*args) + torch.linspace(0, 0.5, 120, dtype=torch.float64)


def test_a_compiled_step_that_disagrees_with_the_cached_one_is_caught_on_its_first_batch(monkeypatch):
    monkeypatch.setattr(static_decoding, "compile_one_token_forward", compiler_off_by_a_little)
    config = DecodingConfig(num_beams=3, max_length=6, compile="always")
    model, visual = early_finishing_captioner(0), random_visual(3).double()
    with pytest.raises(FastPathFailed, match="static_decoding.*differs from the plain path"):
        ranked_beams(model, visual, PROMPT, EOS, config)


def test_a_compiled_step_that_fails_its_first_batch_falls_back_to_the_cached_step(monkeypatch):
    """The fault-injection point of the tests (ituning/fault_injection.py) takes the compiled step as
    available on the CPU and makes its first batch fail, as a broken graph capture would on CUDA."""
    monkeypatch.setenv("ITUNING_TEST_FAULTS", "static_decoding")
    config = DecodingConfig(num_beams=3, max_length=6)
    model, visual = early_finishing_captioner(0), random_visual(3).double()
    assert decoding_step(config, visual.device) is not CachedStep
    expected = ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep)
    assert_same_beams(ranked_beams(model, visual, PROMPT, EOS, config), expected)
    assert "InjectedFault" in fallbacks()["static_decoding"]
    assert_same_beams(ranked_beams(model, visual[:2], PROMPT, EOS, config), expected[:2])  # no second check
    assert outcomes() == {"static_decoding": fallbacks()["static_decoding"]}


@pytest.mark.slow  # inductor's first compile takes 30-40 s here
def test_compiled_decoding_on_cpu_gives_the_cached_tokens():
    """Inductor compiles the one-token forward for CPU (no CUDA graphs there); a partial batch
    reuses the compiled full-size decoder."""
    model = early_finishing_captioner()
    config = DecodingConfig(num_beams=5, max_length=10, compile="always")
    visual = random_visual(4).double()
    expected = ranked_beams(model, visual, PROMPT, EOS, config, step=CachedStep)
    assert_same_beams(ranked_beams(model, visual, PROMPT, EOS, config), expected)
    assert_same_beams(ranked_beams(model, visual[:3], PROMPT, EOS, config), expected[:3])
    assert kept_decoder_sizes(model) == [4]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compiled_decoding_on_cuda_replays_graphs_and_gives_the_cached_tokens():
    from torch._dynamo.utils import counters

    counters.clear()
    model = early_finishing_captioner().cuda()
    prompt = PROMPT.cuda()
    config = DecodingConfig(num_beams=5, max_length=10)  # "auto": compiled on CUDA
    for images in (4, 4, 3):  # capture, replay, replay padded
        visual = random_visual(images).double().cuda()
        assert_same_beams(ranked_beams(model, visual, prompt, EOS, config),
                          ranked_beams(model, visual, prompt, EOS, config, step=CachedStep))
        greedy = DecodingConfig(num_beams=1, max_length=10)
        assert greedy_search(model, visual, prompt, EOS, greedy) == greedy_search(model, visual, prompt, EOS, greedy,
                                                                                  step=CachedStep)
    assert sorted(kept_decoder_sizes(model)) == [4, 4]  # one beam-5 and one greedy decoder
    assert counters["inductor"]["cudagraph_skips"] == 0
