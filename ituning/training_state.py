"""Resumable training checkpoints: everything a killed run needs to continue exactly.

    <stage>/last/adapter_model.safetensors   module weights (the ordinary checkpoint format)
    <stage>/last/adapter_config.json
    <stage>/last/optimizer.safetensors       AdamW moments and step counts, keyed <param>.<name>
    <stage>/last/rng.safetensors             torch CPU (and CUDA) generator states
    <stage>/last/trainer_state.json          position in the data, scheduler, best score, Python RNG

Beside it, <stage>/best (the modules of the best validation CIDEr) and <stage>/final (those training
ended with), each with a metrics.json. Tensors go to safetensors and scalars to JSON; nothing is
unpickled. Every one of these folders is written beside the old one and swapped in only when
complete (ituning.checkpoint.write_folder): a kill at any point keeps a whole checkpoint, and the
next run settles what the kill left (`settle_checkpoints`) before it reads or writes any.
"""

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ituning.backbones import BackboneSpec
from ituning.checkpoint import load_weights_into, save_checkpoint, settle_folder, write_folder
from ituning.model import ITuningCaptioner
from ituning.provenance import Provenance

LAST = "last"
BEST = "best"
FINAL = "final"
METRICS_FILE = "metrics.json"  # written last into best/ and final/
OPTIMIZER_FILE = "optimizer.safetensors"
RNG_FILE = "rng.safetensors"
STATE_FILE = "trainer_state.json"


@dataclass
class TrainerState:
    step: int = 0  # optimizer steps taken in this stage
    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # steps of that epoch already taken
    epoch_loss_sum: float = 0.0  # for the epoch's mean training loss
    best_cider: float | None = None
    last_loss: float | None = None
    history: list[dict] = field(default_factory=list)  # per-epoch metrics


def save_training_checkpoint(stage_dir: Path, model: ITuningCaptioner, backbones: BackboneSpec,
                             optimizer, scheduler, state: TrainerState, provenance: Provenance | None = None,
                             workspace: Path | None = None) -> Path:
    def write(folder: Path) -> None:
        save_checkpoint(folder, model, backbones, provenance, workspace)
        tensors, groups = _optimizer_tensors(optimizer)
        save_file(tensors, folder / OPTIMIZER_FILE)
        save_file(_rng_tensors(), folder / RNG_FILE)
        scalars = {
            "trainer": asdict(state),
            "scheduler": scheduler.state_dict(),
            "optimizer_param_groups": groups,
            "python_random": _python_random_state(),
        }
        (folder / STATE_FILE).write_text(json.dumps(scalars, indent=1))

    return write_folder(stage_dir / LAST, write)


def save_modules(directory: Path, model: ITuningCaptioner, backbones: BackboneSpec, metrics,
                 provenance: Provenance | None = None, workspace: Path | None = None) -> Path:
    """A module checkpoint with its metrics (best/, final/), swapped in whole."""

    def write(folder: Path) -> None:
        save_checkpoint(folder, model, backbones, provenance, workspace)
        (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1))

    return write_folder(directory, write)


def settle_checkpoints(stage_dir: Path) -> None:
    """Tidy what a kill during a checkpoint write left in a stage folder (see write_folder)."""
    for name in (LAST, BEST, FINAL):
        settle_folder(Path(stage_dir) / name)


def is_finished(stage_dir: Path) -> bool:
    """Whether the stage wrote its final checkpoint, metrics included (they are written last)."""
    return (Path(stage_dir) / FINAL / METRICS_FILE).is_file()


def last_checkpoint(stage_dir: Path) -> Path | None:
    """The newest complete checkpoint (the previous one if a swap was interrupted)."""
    for name in (LAST, f"{LAST}.previous"):
        if (stage_dir / name / STATE_FILE).is_file():
            return stage_dir / name
    return None


def restore_training_checkpoint(directory: Path, model: ITuningCaptioner, backbones: BackboneSpec,
                                optimizer, scheduler) -> TrainerState:
    load_weights_into(model, directory, backbones)
    scalars = json.loads((directory / STATE_FILE).read_text())
    device = next(model.parameters()).device
    tensors = {key: tensor.to(device) for key, tensor in load_file(directory / OPTIMIZER_FILE).items()}
    optimizer.load_state_dict(_optimizer_state(tensors, scalars["optimizer_param_groups"]))
    scheduler.load_state_dict(scalars["scheduler"])
    _restore_rng(load_file(directory / RNG_FILE), scalars["python_random"])
    return TrainerState(**scalars["trainer"])


def _optimizer_tensors(optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    state = optimizer.state_dict()
    tensors = {
        f"{index}.{name}": value.detach().cpu().contiguous()
        for index, entry in state["state"].items()
        for name, value in entry.items()
    }
    return tensors, state["param_groups"]


def _optimizer_state(tensors: dict[str, torch.Tensor], groups: list[dict]) -> dict:
    state: dict[int, dict] = {}
    for key, tensor in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = tensor
    for group in groups:
        group["betas"] = tuple(group["betas"])
    return {"state": state, "param_groups": groups}


def _rng_tensors() -> dict[str, torch.Tensor]:
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for index, cuda_state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"torch_cuda_{index}"] = cuda_state
    return tensors


def _python_random_state() -> list:
    version, internal, gauss = random.getstate()
    return [version, list(internal), gauss]


def _restore_rng(tensors: dict[str, torch.Tensor], python_state: list) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda_keys = sorted((key for key in tensors if key.startswith("torch_cuda_")), key=lambda k: int(k.rsplit("_", 1)[1]))
    cuda_states = [tensors[key] for key in cuda_keys]
    if cuda_states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda_states)
    version, internal, gauss = python_state
    random.setstate((version, tuple(internal), gauss))
