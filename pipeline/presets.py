"""Which YAML file a config name means (a preset of configs/ or a path), and that config as a run
uses it, with backbones built in the workspace found there."""

import hashlib
from dataclasses import replace
from pathlib import Path

from ituning.backbones import LOCAL_DIR
from ituning.config import load_config

CONFIG_DIR = Path(__file__).parents[1] / "configs"


def resolve_config(config: str, workspace: Path):
    """configs/<config>.yaml (or a YAML path) with local backbone paths made absolute: a relative
    one is taken from the workspace when it exists there (e.g. backbones/vision)."""
    run_config = load_config(config_file(config))
    return replace(run_config, model=replace(run_config.model, **_workspace_backbones(run_config.model, workspace)))


def config_file(config: str) -> Path:
    """A preset's YAML file (configs/<config>.yaml), or the YAML file `config` names."""
    path = Path(config)
    return path if path.suffix else CONFIG_DIR / f"{config}.yaml"


def config_digest(config: str) -> str:
    """SHA-256 of the config's YAML file, or "missing"."""
    path = config_file(config)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def workspace_backbones(workspace: Path, config: str) -> dict:
    """The config's backbones as training and evaluation load them: local paths taken from the workspace."""
    return resolve_config(config, workspace).model.backbones().to_dict()


def _workspace_backbones(model, workspace: Path) -> dict:
    def located(path: str) -> str | None:
        candidate = Path(workspace) / path
        return str(candidate.resolve()) if not Path(path).is_absolute() and candidate.exists() else None

    changed = {}
    if model.vision_model.startswith(LOCAL_DIR) and located(model.vision_model[len(LOCAL_DIR):]):
        changed["vision_model"] = LOCAL_DIR + located(model.vision_model[len(LOCAL_DIR):])
    if model.vision_pretrained and located(model.vision_pretrained):
        changed["vision_pretrained"] = located(model.vision_pretrained)
    if located(model.language_model):
        changed["language_model"] = located(model.language_model)
    return changed
