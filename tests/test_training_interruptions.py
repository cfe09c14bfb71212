"""A training run killed at any step of writing a checkpoint (last, best or final), then run again,
ends exactly as an uninterrupted run: the same losses at every step and, byte for byte, the same
stage folder."""

import json
import random
from pathlib import Path

import pytest

import ituning.checkpoint
import ituning.training_state
from ituning.training import train_run
from tests.interruptions import HALVES, FileSystemSteps, Killed
from tests.test_training import Recorder, run_config, stage_dict, stage_data

WRITERS = (ituning.checkpoint, ituning.training_state)  # the modules that call safetensors' save_file

# Three epochs of one step each; every epoch validates (on one image) and checkpoints. The score is
# the same every epoch, so `best` is written once, at the first validation.
STAGE = {"epochs": 3, "micro_batch_size": 8, "val_images": 1, "val_max_length": 2}


def same_score(candidates, references):
    return {"CIDEr": 1.0}


# The interruption points: every file-system step of the run, in order. A folder is written as
# <name>.partial and swapped in; the module weights and config go through a temporary file each.
MODULES = [("write", ".adapter_model.safetensors.tmp"), ("rename", ".adapter_model.safetensors.tmp"),
           ("write", ".adapter_config.json.tmp"), ("rename", ".adapter_config.json.tmp")]
TRAINER = [("write", "optimizer.safetensors"), ("write", "rng.safetensors"), ("write", "trainer_state.json")]
METRICS = [("write", "metrics.json")]


def folder_write(name: str, files: list[tuple[str, str]], replacing: bool) -> list[tuple[str, str]]:
    swap = [("rename", name), ("rename", f"{name}.partial"), ("remove", f"{name}.previous")]
    return [(kind, f"{name}.partial/{file}") for kind, file in files] + (swap if replacing else swap[1:2])


STEPS = (folder_write("best", MODULES + METRICS, replacing=False)  # epoch 0: validated, then checkpointed
         + folder_write("last", MODULES + TRAINER, replacing=False)
         + folder_write("last", MODULES + TRAINER, replacing=True)  # epoch 1
         + folder_write("last", MODULES + TRAINER, replacing=True)  # epoch 2
         + folder_write("final", MODULES + METRICS, replacing=False))
POINTS = [(at, False) for at in range(len(STEPS))] + [(at, True) for at, (kind, _) in enumerate(STEPS) if kind in HALVES]


def train(backbones, out_dir: Path, recorder: Recorder):
    random.seed(0)  # checkpoints hold Python's generator too: start every run from the same one
    config = run_config(backbones, [stage_dict(**STAGE)])
    return train_run(config, {"finetune": stage_data(images=4)}, out_dir, same_score, [recorder], progress=False)


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(path.relative_to(folder)): file_bytes(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def file_bytes(path: Path) -> bytes:
    """A file's bytes; for a trainer state, without Python's global `random` state: training draws
    nothing from it, but other threads of the test process (servers, clients of earlier tests) may,
    so the snapshot of it differs from run to run while the training does not."""
    if path.name != "trainer_state.json":
        return path.read_bytes()
    state = json.loads(path.read_text())
    state.pop("python_random", None)
    return json.dumps(state, sort_keys=True).encode()


@pytest.fixture(scope="module")
def uninterrupted(standin_backbones, tmp_path_factory):
    out_dir, recorder = tmp_path_factory.mktemp("uninterrupted"), Recorder()
    with pytest.MonkeyPatch.context() as patch:
        steps = FileSystemSteps(out_dir / "finetune").install(patch, WRITERS)
        train(standin_backbones, out_dir, recorder)
    return folder_bytes(out_dir / "finetune"), {step: metrics["loss"] for step, metrics in recorder.steps}, steps.steps


def test_the_interruption_points_are_every_step_of_every_checkpoint_write(uninterrupted):
    _, losses, steps = uninterrupted
    assert steps == STEPS and sorted(losses) == [1, 2, 3]


@pytest.mark.slow
@pytest.mark.parametrize("at, halfway", POINTS, ids=[f"{'halfway-through' if halfway else 'before'}-{at}-"
                                                     f"{'-'.join(STEPS[at])}" for at, halfway in POINTS])
def test_a_run_killed_at_any_step_of_a_checkpoint_write_ends_as_an_uninterrupted_one(
        standin_backbones, uninterrupted, tmp_path, at, halfway):
    expected_files, expected_losses, _ = uninterrupted
    killed, resumed = Recorder(), Recorder()
    with pytest.MonkeyPatch.context() as patch, pytest.raises(Killed):
        FileSystemSteps(tmp_path / "finetune", kill_at=at, halfway=halfway).install(patch, WRITERS)
        train(standin_backbones, tmp_path, killed)
    train(standin_backbones, tmp_path, resumed)
    assert {step for step, _ in killed.steps + resumed.steps} == set(expected_losses)
    assert {step: metrics["loss"] for step, metrics in resumed.steps} == {
        step: expected_losses[step] for step, _ in resumed.steps}
    assert folder_bytes(tmp_path / "finetune") == expected_files
