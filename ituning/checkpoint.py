"""Self-describing checkpoints: the trainable weights in safetensors plus a JSON config.

    adapter_model.safetensors   the I-Tuning module weights only, keyed layers.<i>.<parameter>
    adapter_config.json         backbones, r, λ, dropped layers, shapes, code version, and where
                                a trained checkpoint comes from (ituning/provenance.py)

A checkpoint written inside a workspace names the backbones the workspace holds relative to it
(`local-dir:backbones/vision`) and records where the workspace lies from the checkpoint's folder
(`"workspace": "../../.."`), so a copied or moved workspace loads its checkpoints as they are.
Absolute paths, of checkpoints written before or outside a workspace, load as they are too.
Loading checks the config against the model it is loaded into and refuses a different backbone.
Nothing is unpickled. A checkpoint folder that is written again (a training run's `last`, `best` and
`final`) is swapped in whole (`write_folder`), so that a kill at any point leaves a complete one.
"""

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path

from safetensors.torch import load_file, save_file

from ituning.backbones import BackboneSpec
from ituning.model import ITuningCaptioner, ITuningConfig
from ituning.provenance import Provenance, provenance_of
from ituning.version import code_version

WEIGHTS_FILE = "adapter_model.safetensors"
CONFIG_FILE = "adapter_config.json"
FORMAT = "ituning-adapter/1"


class IncompatibleCheckpoint(ValueError):
    """A checkpoint made for other backbones or another module layout."""


def describe(model: ITuningCaptioner, backbones: BackboneSpec) -> dict:
    """The checkpoint config, also logged as run parameters."""
    lm_config = model.language_model.config
    return {
        "format": FORMAT,
        "backbones": backbones.to_dict(),
        "ituning": {**asdict(model.config), "bottleneck": model.bottleneck},
        "architecture": {
            "language_model_layers": lm_config.n_layer,
            "language_model_width": lm_config.n_embd,
            "vocab_size": lm_config.vocab_size,
            "visual_width": model.visual_width,
            "module_layers": sorted(model.wrapped_layers),
        },
        "code_version": code_version(),
    }


def save_checkpoint(directory: str | Path, model: ITuningCaptioner, backbones: BackboneSpec,
                    provenance: Provenance | None = None, workspace: str | Path | None = None) -> Path:
    """Write weights and config (with `provenance` when known); each file appears only once completely
    written. Backbones inside `workspace` are named relative to it (see the module docstring)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    weights = {key: tensor.detach().cpu().contiguous() for key, tensor in model.ituning_state_dict().items()}
    _write_atomically(directory / WEIGHTS_FILE, lambda path: save_file(weights, path, metadata={"format": FORMAT}))
    config = describe(model, backbones)
    if provenance is not None:
        config["provenance"] = provenance.to_dict()
    if workspace is not None:
        config["backbones"] = backbones.relative_to(workspace).to_dict()
        config["workspace"] = os.path.relpath(os.path.realpath(workspace), os.path.realpath(directory))
    config_text = json.dumps(config, indent=2)
    _write_atomically(directory / CONFIG_FILE, lambda path: Path(path).write_text(config_text))
    return directory


def read_config(directory: str | Path) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(f"not an I-Tuning checkpoint: {path} is missing")
    config = json.loads(path.read_text())
    if config.get("format") != FORMAT:
        raise IncompatibleCheckpoint(f"{path}: format {config.get('format')!r}, expected {FORMAT!r}")
    return config


def read_provenance(directory: str | Path) -> Provenance | None:
    """What a checkpoint records of where it comes from; None when it records nothing."""
    return provenance_of(read_config(directory))


def backbones_of(config: dict, directory: str | Path | None = None) -> BackboneSpec:
    """The backbones to load. Those a checkpoint in `directory` names relative to its workspace are
    taken from the workspace it records the way up to, wherever that now lies, or else from the nearest
    folder above the checkpoint that holds them (a checkpoint folder copied to another depth)."""
    backbones = BackboneSpec(**config["backbones"])
    if directory is None or "workspace" not in config:
        return backbones
    directory = Path(directory)
    for base in (directory / config["workspace"], *directory.resolve().parents):
        located = backbones.located(base)
        if located != backbones:
            return located
    return backbones


def ituning_config_of(config: dict) -> ITuningConfig:
    names = {field.name for field in fields(ITuningConfig)}
    return ITuningConfig(**{key: value for key, value in config["ituning"].items() if key in names})


def load_weights_into(model: ITuningCaptioner, directory: str | Path, backbones: BackboneSpec) -> None:
    """Load a checkpoint's module weights, refusing one made for different backbones."""
    saved = read_config(directory)
    saved["backbones"] = backbones_of(saved, directory).to_dict()
    current = describe(model, backbones)
    mismatches = [
        f"{section}.{key}: checkpoint {saved[section].get(key)!r}, model {value!r}"
        for section in ("backbones", "architecture")
        for key, value in current[section].items()
        if saved[section].get(key) != value
    ]
    if mismatches:
        raise IncompatibleCheckpoint(
            f"checkpoint {directory} was made for other backbones: " + "; ".join(mismatches)
        )
    model.load_ituning_state_dict(load_file(Path(directory) / WEIGHTS_FILE))


def write_folder(target: str | Path, write: Callable[[Path], object]) -> Path:
    """Fill <target>.partial with `write`, then swap it in for `target`.

    At every moment `target` is complete (the old folder or the new one), except between the two
    renames, when the old one waits at <target>.previous. Whatever a kill leaves, `settle_folder`
    (run here first) turns back into one complete `target`, or none when there never was one.
    """
    target = Path(target)
    partial, previous = _beside(target, "partial"), _beside(target, "previous")
    settle_folder(target)
    write(partial)
    if target.exists():
        target.rename(previous)
    partial.rename(target)
    _remove(previous)
    return target


def settle_folder(target: str | Path) -> None:
    """Finish what a kill left of a `write_folder`: drop the half-written <target>.partial and, of a
    swap cut short, keep the newest complete folder under the name `target`."""
    target = Path(target)
    previous = _beside(target, "previous")
    _remove(_beside(target, "partial"))
    if target.exists():
        _remove(previous)  # the swap got as far as renaming the new folder in
    elif previous.exists():
        previous.rename(target)  # killed between the two renames: the old folder is the newest whole one


def _beside(target: Path, role: str) -> Path:
    return target.with_name(f"{target.name}.{role}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(f".{path.name}.tmp")
    write(str(temporary))
    os.replace(temporary, path)
