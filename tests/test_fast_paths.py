"""The first-use check of the fast paths (ituning/fast_paths.py): auto falls back with one warning on
an error or a mismatch and never checks twice, always raises, never skips the check; the checks of
the micro-batch, the device JPEGs and the compiled loss, and a failure of the compiled loss after
its check, met by a training stage on the CPU."""

import logging

import pytest
import torch
from safetensors.torch import load_file

from ituning.checkpoint import WEIGHTS_FILE
from ituning.device_jpeg import END_TO_END_TOLERANCE, pixel_difference
from ituning.fast_paths import COMPILE, MICRO_BATCH, ON, FastPath, FastPathFailed, fallbacks, outcomes
from ituning.micro_batch import largest_that_runs, resolve_micro_batch
from ituning import training
from ituning.training import StageData, StageTrainer, build_model, caption_loss_sum
from tests.test_speed_settings import STANDIN_WIDTH, run_config
from tests.training_fixtures import caption_set, random_feature_set

CPU = torch.device("cpu")


class Calls:
    """A path's fast and plain functions that count their calls."""

    def __init__(self, fast_result=1, plain_result=1, fast_error=None):
        self.fast_result, self.plain_result, self.fast_error = fast_result, plain_result, fast_error
        self.fast_calls = self.plain_calls = 0

    def fast(self):
        self.fast_calls += 1
        if self.fast_error:
            raise self.fast_error
        return self.fast_result

    def plain(self):
        self.plain_calls += 1
        return self.plain_result


def differ(fast, plain) -> str:
    return "" if fast == plain else f"{fast} against {plain}"


def test_a_path_that_agrees_is_checked_once_and_then_runs_alone():
    path, calls = FastPath("demo", "a demo path"), Calls()
    assert path.first_use("auto", calls.fast, calls.plain, differ) == (True, 1)
    assert path.first_use("auto", calls.fast, calls.plain, differ) == (True, 1)
    assert (calls.fast_calls, calls.plain_calls, path.outcome) == (2, 1, ON)


@pytest.mark.parametrize("calls, reason", [(Calls(fast_result=2), "differs from the plain path: 2 against 1"),
                                           (Calls(fast_error=ValueError("no kernel")), "ValueError: no kernel")])
def test_auto_falls_back_once_with_one_warning_line_and_the_reason(caplog, calls, reason):
    path = FastPath("demo", "a demo path")
    with caplog.at_level(logging.WARNING, logger="ituning.fast_paths"):
        assert path.first_use("auto", calls.fast, calls.plain, differ) == (False, 1)
        assert path.first_use("auto", calls.fast, calls.plain, differ) == (False, 1)
        path.failed_later("auto", RuntimeError("again"))
    assert calls.fast_calls == 1 and path.outcome == reason
    assert [record.getMessage() for record in caplog.records] == \
        [f"warning: a demo path (demo) fell back to the plain path: {reason}"]


def test_always_raises_and_never_skips_the_check():
    with pytest.raises(FastPathFailed, match="a demo path \\(demo\\) failed: differs from the plain path"):
        FastPath("demo", "a demo path").first_use(True, Calls(fast_result=2).fast, Calls().plain, differ)
    with pytest.raises(FastPathFailed, match="RuntimeError: graph capture"):
        FastPath("demo", "a demo path").failed_later("always", RuntimeError("graph capture"))
    path, calls = FastPath("demo", "a demo path"), Calls(fast_error=AssertionError("never called"))
    assert path.first_use(False, calls.fast, calls.plain, differ) == (False, 1) and calls.fast_calls == 0
    assert path.outcome is None
    with pytest.raises(ValueError, match="one of auto, always, never"):
        path.first_use("sometimes", calls.fast, calls.plain, differ)


def test_the_fault_injection_point_makes_a_path_available_and_its_check_fail(monkeypatch):
    calls = Calls()
    assert not MICRO_BATCH.available(False)
    monkeypatch.setenv("ITUNING_TEST_FAULTS", "compile, micro_batch")
    assert MICRO_BATCH.available(False)
    assert MICRO_BATCH.first_use("auto", calls.fast, calls.plain, differ) == (False, 1) and calls.fast_calls == 0
    assert "InjectedFault" in fallbacks()["micro_batch"] and outcomes() == fallbacks()


def out_of_memory_above(limit: int, ran: list):
    def run_size(size: int) -> None:
        ran.append(size)
        if size > limit:
            raise torch.OutOfMemoryError(f"{size} captions do not fit")  # what the CUDA allocator raises
    return run_size


def test_a_micro_batch_that_does_not_run_falls_back_to_the_largest_that_does(monkeypatch):
    ran = []
    assert largest_that_runs(96, 48, CPU, out_of_memory_above(10, ran)) == 6 and ran == [48, 24, 12, 6]
    monkeypatch.setenv("ITUNING_TEST_FAULTS", "micro_batch")  # the measured micro-batch fails its check
    ran.clear()
    assert resolve_micro_batch("auto", 4096, CPU, out_of_memory_above(40, ran)) == 32 and ran == [64, 32]
    assert "InjectedFault" in fallbacks()["micro_batch"]
    assert resolve_micro_batch(16, 4096, CPU, None) == 16  # a number is not the fast path


def test_device_pixels_are_held_to_the_end_to_end_tolerance():
    cpu = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    assert pixel_difference(cpu.clone(), cpu) == ""
    nudged = cpu.clone()
    nudged[0, 0, 0, :4] = nudged[0, 0, 0, :4] // 2 + 64  # a few values at a sharp edge
    assert pixel_difference(nudged, cpu) == ""
    assert "mean difference" in pixel_difference((cpu.int() + 3).clamp(0, 255).to(torch.uint8), cpu)
    assert "of shape" in pixel_difference(cpu[:, :, :8], cpu)
    assert END_TO_END_TOLERANCE.max_levels == 16


def compiler_failing_from_call(failing_call: int):
    """Stands in for torch.compile on a GPU whose recompilation for a new shape fails in a later step:
    the eager loss until call `failing_call`, then an error (a real compile takes 40 s here)."""
    def compile(function, **options):
        calls = []

        def compiled(*args):
            calls.append(1)
            if len(calls) >= failing_call:
                raise RuntimeError("inductor: recompilation failed")
            return function(*args)
        return compiled
    return compile


def trained_weights(backbones, folder, compile_setting):
    config = run_config(backbones, compile=compile_setting, epochs=2, batch_size=8, micro_batch_size=4)
    model, tokenizer, spec = build_model(config, "cpu")
    captions = caption_set(6, per_image=2)
    trainer = StageTrainer(model, tokenizer, spec, config.stages[0],
                           StageData(random_feature_set(captions, STANDIN_WIDTH), captions), folder, progress=False)
    compiled = trainer.loss_sum is not caption_loss_sum
    return compiled, load_file(trainer.run(resume=False).final_dir / WEIGHTS_FILE)


def test_true_fails_loudly_when_the_compiled_loss_fails_in_a_later_step(standin_backbones, tmp_path, monkeypatch):
    monkeypatch.setattr(training.torch, "compile", compiler_failing_from_call(5))  # check: 1, steps: 2, 3, 4, 5 fails
    with pytest.raises(FastPathFailed, match="the compiled training loss \\(compile\\) failed: .*recompilation failed"):
        trained_weights(standin_backbones, tmp_path, True)


def test_auto_falls_back_from_a_compiled_loss_that_fails_later(standin_backbones, tmp_path, monkeypatch, caplog):
    _, expected = trained_weights(standin_backbones, tmp_path / "eager", False)
    monkeypatch.setattr(training.torch, "compile", compiler_failing_from_call(5))
    monkeypatch.setattr(COMPILE, "available", lambda here: True)  # auto: as on CUDA
    with caplog.at_level(logging.WARNING, logger="ituning.fast_paths"):
        compiled, weights = trained_weights(standin_backbones, tmp_path / "auto", "auto")
    assert compiled and "recompilation failed" in fallbacks()["compile"]
    assert len(caplog.records) == 1
    for name, tensor in expected.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=0)


def test_the_pipeline_summary_names_each_fallback_of_a_step(tmp_path):
    from pipeline.run_summary import pipeline_markdown

    records = [{"step": "train finetune", "cached": False, "metrics": {}, "run_id": "abc",
                "fallbacks": {"compile": "InductorError: no C++ compiler"}},
               {"step": "evaluate coco/test", "cached": False, "metrics": {}, "run_id": "def", "fallbacks": {}}]
    rows = pipeline_markdown("run", records, tmp_path).splitlines()
    assert "| train finetune | ran; compile fell back to the plain path (InductorError: no C++ compiler) |" in rows[4]
    assert rows[5].startswith("| evaluate coco/test | ran |")
