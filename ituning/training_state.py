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
next run settles what the kill left (`StageFolder.settle`) before it reads or writes any.

Two small interfaces hold it: `StageFolder` names a stage's folders (last, best, final, metrics.json)
for the trainer and the application alike, and `TrainingState` is what a run is at a step (modules,
optimizer, schedule, random generators, `Position` in the data): `save(directory)` writes it,
`restore(directory)` reads it back.
"""

import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ituning.backbones import BackboneSpec
from ituning.checkpoint import WEIGHTS_FILE, load_weights_into, save_checkpoint, settle_folder, write_folder
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
class Position:
    """Where a stage's run is, and what it has seen so far."""

    step: int = 0  # optimizer steps taken in this stage
    epoch: int = 0  # the epoch in progress (or next to start)
    step_in_epoch: int = 0  # steps of that epoch already taken
    epoch_loss_sum: float = 0.0  # for the epoch's mean training loss
    best_cider: float | None = None
    last_loss: float | None = None
    history: list[dict] = field(default_factory=list)  # per-epoch metrics


@dataclass(frozen=True)
class StageFolder:
    """A stage's folder: <stage>/last (resumable), <stage>/best and <stage>/final (modules + metrics.json)."""

    path: Path

    @property
    def last(self) -> Path:
        return self.path / LAST

    @property
    def best(self) -> Path:
        return self.path / BEST

    @property
    def final(self) -> Path:
        return self.path / FINAL

    def settle(self) -> None:
        """Tidy what a kill during a checkpoint write left here (see ituning.checkpoint.write_folder)."""
        for folder in (self.last, self.best, self.final):
            settle_folder(folder)

    def finished(self) -> bool:
        """Whether the stage wrote its final checkpoint, metrics included (they are written last)."""
        return (self.final / METRICS_FILE).is_file()

    def final_weights_written(self) -> bool:
        return (self.final / WEIGHTS_FILE).is_file()

    def kept_best(self) -> Path | None:
        """best/, when the stage kept one (its metrics are written last)."""
        return self.best if (self.best / METRICS_FILE).is_file() else None

    def resumable(self) -> Path | None:
        """The newest complete training checkpoint (the previous one if a swap was interrupted)."""
        for folder in (self.last, self.last.with_name(f"{LAST}.previous")):
            if (folder / STATE_FILE).is_file():
                return folder
        return None

    def resumable_step(self) -> int:
        """The step a rerun resumes from (0 when no training checkpoint was written yet)."""
        checkpoint = self.resumable()
        return json.loads((checkpoint / STATE_FILE).read_text())["trainer"]["step"] if checkpoint else 0


def read_metrics(folder: Path):
    """What best/ or final/ recorded: the validation metrics, or final's per-epoch history."""
    return json.loads((Path(folder) / METRICS_FILE).read_text())


class TrainingState:
    """Everything a stage's run needs to continue exactly where it was: the module weights, AdamW's
    state, the learning-rate schedule, the random generators and the `position` in the data."""

    def __init__(self, model: ITuningCaptioner, backbones: BackboneSpec, optimizer, scheduler,
                 provenance: Provenance | None = None, workspace: Path | None = None):
        self.model, self.backbones, self.optimizer, self.scheduler = model, backbones, optimizer, scheduler
        self.provenance = provenance  # recorded in every checkpoint
        self.workspace = workspace  # checkpoints name the backbones inside it relative to it
        self.position = Position()

    def save(self, directory: Path) -> Path:
        """The resumable checkpoint, written beside `directory` and swapped in whole."""

        def write(folder: Path) -> None:
            save_checkpoint(folder, self.model, self.backbones, self.provenance, self.workspace)
            tensors, groups = _optimizer_tensors(self.optimizer)
            save_file(tensors, folder / OPTIMIZER_FILE)
            save_file(_rng_tensors(), folder / RNG_FILE)
            scalars = {
                "trainer": asdict(self.position),
                "scheduler": self.scheduler.state_dict(),
                "optimizer_param_groups": groups,
                "python_random": _python_random_state(),
            }
            (folder / STATE_FILE).write_text(json.dumps(scalars, indent=1))

        return write_folder(directory, write)

    def restore(self, directory: Path) -> None:
        """Back to what `save` wrote into `directory`."""
        load_weights_into(self.model, directory, self.backbones)
        scalars = json.loads((directory / STATE_FILE).read_text())
        device = next(self.model.parameters()).device
        tensors = {key: tensor.to(device) for key, tensor in load_file(directory / OPTIMIZER_FILE).items()}
        self.optimizer.load_state_dict(_optimizer_state(tensors, scalars["optimizer_param_groups"]))
        self.scheduler.load_state_dict(scalars["scheduler"])
        _restore_rng(load_file(directory / RNG_FILE), scalars["python_random"])
        self.position = Position(**scalars["trainer"])

    def save_modules(self, directory: Path, metrics) -> Path:
        """The module checkpoint with its metrics (best/, final/), swapped in whole."""

        def write(folder: Path) -> None:
            save_checkpoint(folder, self.model, self.backbones, self.provenance, self.workspace)
            (folder / METRICS_FILE).write_text(json.dumps(metrics, indent=1))

        return write_folder(directory, write)

    def load_modules(self, directory: Path) -> None:
        load_weights_into(self.model, directory, self.backbones)


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
