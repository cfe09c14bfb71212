import pytest
import torch

from ituning.decoding import CachedStep, DecodingConfig, RecomputingStep, beam_search, greedy_search, ranked_beams
from tests.conftest import random_visual, tiny_captioner

EOS = 0
PROMPT = torch.tensor([[EOS]])


def double_precision_captioner(seed):
    # float64 keeps the cached and recomputed logits far from ties, so tokens compare exactly.
    torch.manual_seed(seed)
    return tiny_captioner().double()


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "config",
    [DecodingConfig(num_beams=5, max_length=12), DecodingConfig(num_beams=3, max_length=9, min_length=4, length_penalty=0.6)],
)
def test_cached_beam_search_equals_the_recomputing_reference(seed, config):
    model = double_precision_captioner(seed)
    visual = random_visual(3).double()
    cached = beam_search(model, visual, PROMPT, EOS, config, step=CachedStep)
    reference = beam_search(model, visual, PROMPT, EOS, config, step=RecomputingStep)
    assert cached == reference
    assert all(len(tokens) <= config.max_length for tokens in cached)


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_greedy_equals_the_recomputing_reference(seed):
    model = double_precision_captioner(seed)
    visual = random_visual(3).double()
    config = DecodingConfig(num_beams=1, max_length=15)
    assert greedy_search(model, visual, PROMPT, EOS, config) == greedy_search(
        model, visual, PROMPT, EOS, config, step=RecomputingStep
    )


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("min_length", [0, 3])
def test_beam_one_equals_greedy(seed, min_length):
    model = double_precision_captioner(seed)
    visual = random_visual(4).double()
    config = DecodingConfig(num_beams=1, max_length=10, min_length=min_length)
    assert beam_search(model, visual, PROMPT, EOS, config) == greedy_search(model, visual, PROMPT, EOS, config)


class EosFavouringStep(CachedStep):
    def __call__(self, sequences, beam_sources):
        log_probs = super().__call__(sequences, beam_sources)
        log_probs[:, EOS] += 50
        return log_probs.log_softmax(dim=-1)


def test_eos_ends_a_caption_and_min_length_is_respected():
    model = double_precision_captioner(0)
    visual = random_visual(2).double()
    assert beam_search(model, visual, PROMPT, EOS, DecodingConfig(num_beams=3), step=EosFavouringStep) == [[], []]
    assert greedy_search(model, visual, PROMPT, EOS, DecodingConfig(num_beams=1), step=EosFavouringStep) == [[], []]
    for search in (beam_search, greedy_search):
        forced = search(model, visual, PROMPT, EOS, DecodingConfig(num_beams=3 if search is beam_search else 1, min_length=4), step=EosFavouringStep)
        assert [len(tokens) for tokens in forced] == [4, 4] and all(EOS not in tokens for tokens in forced)


def test_beam_search_finds_a_sequence_greedy_misses():
    # Greedy takes the best first token; beam search may trade it for a better whole caption.
    # Over a few random models the two must disagree at least once and beam never scores worse.
    differs = 0
    for seed in range(6):
        model = double_precision_captioner(seed)
        visual = random_visual(2).double()
        config = DecodingConfig(num_beams=5, max_length=6, length_penalty=0.0)
        beam = beam_search(model, visual, PROMPT, EOS, config)
        greedy = greedy_search(model, visual, PROMPT, EOS, DecodingConfig(num_beams=1, max_length=6))
        for image in range(2):
            assert sequence_log_prob(model, visual[image : image + 1], beam[image]) >= sequence_log_prob(
                model, visual[image : image + 1], greedy[image]
            ) - 1e-9
        differs += beam != greedy
    assert differs > 0


def sequence_log_prob(model, visual, tokens):
    ids = torch.tensor([[EOS, *tokens, *([EOS] if len(tokens) < 6 else [])]])
    log_probs = model(ids, visual=visual).logits.log_softmax(-1)[0, :-1]
    return log_probs.gather(1, ids[0, 1:, None]).sum().item()


def test_invalid_decoding_settings_are_rejected():
    with pytest.raises(ValueError):
        DecodingConfig(num_beams=0)
    with pytest.raises(ValueError):
        DecodingConfig(max_length=5, min_length=5)


@pytest.mark.parametrize("seed", [0, 1])
def test_ranked_beams_start_with_the_beam_search_answer_and_carry_their_scores(seed):
    model = double_precision_captioner(seed)
    visual = random_visual(2).double()
    config = DecodingConfig(num_beams=4, max_length=6)
    ranked = ranked_beams(model, visual, PROMPT, EOS, config)
    assert [beams[0].tokens for beams in ranked] == beam_search(model, visual, PROMPT, EOS, config)
    for image, beams in enumerate(ranked):
        assert len(beams) == config.num_beams
        assert [beam.score for beam in beams] == sorted((beam.score for beam in beams), reverse=True)
        for beam in beams:  # length penalty 1: the mean log-probability of the tokens written, EOS included
            generated = len(beam.tokens) + (len(beam.tokens) < config.max_length)
            expected = sequence_log_prob(model, visual[image : image + 1], beam.tokens) / generated
            assert beam.score == pytest.approx(expected, rel=1e-6)  # scores are kept in float32
