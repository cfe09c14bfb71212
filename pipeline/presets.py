"""Which YAML file a config name means (a preset of configs/ or a path), and that config as a run
uses it, with backbones built in the workspace found there."""

import hashlib
from dataclasses import replace
from pathlib import Path

import yaml

from ituning.backbones import LOCAL_DIR
from ituning.config import ConfigError, RunConfig, apply_overrides, check_datasets, config_from_dict, load_config
from storage.atomic import write_atomically
from storage.datasets import evaluated_only, trained_on

CONFIG_DIR = Path(__file__).parents[1] / "configs"


def resolve_config(config: str, workspace: Path):
    """configs/<config>.yaml (or a YAML path) with local backbone paths made absolute: a relative
    one is taken from the workspace when it exists there (e.g. backbones/vision)."""
    run_config = load_run_config(config_file(config))
    return replace(run_config, model=replace(run_config.model, **_workspace_backbones(run_config.model, workspace)),
                   evaluation=workspace_clip_score_model(run_config.evaluation, workspace))


def with_known_datasets(run_config: RunConfig) -> RunConfig:
    """`run_config` when its stages train on datasets of the registry (storage/datasets/) with
    their splits; a ConfigError naming the stage's key otherwise."""
    return check_datasets(run_config, trained_on(), evaluated_only())


def load_run_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The YAML file's config (ituning.config.load_config), its datasets checked as well."""
    run_config = load_config(path, overrides)
    try:
        return with_known_datasets(run_config)
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def config_file(config: str) -> Path:
    """A preset's YAML file (configs/<config>.yaml), or the YAML file `config` names."""
    path = Path(config)
    return path if path.suffix else CONFIG_DIR / f"{config}.yaml"


def with_overrides(config: str, overrides: list[str], workspace: Path) -> str:
    """`config` itself when there are no overrides. Otherwise the config with the `KEY=VALUE`
    overrides applied and checked (ituning.config.apply_overrides), written to
    workspace/configs/<digest>/<file name of config>: a run reads it like any config file, and
    keeps the preset's name for its registered model. Raises ConfigError naming the bad key."""
    if not overrides:
        return config
    source = config_file(config)
    try:
        data = apply_overrides(yaml.safe_load(source.read_text()), list(overrides))
        with_known_datasets(config_from_dict(data))
    except ConfigError as error:
        raise ConfigError(f"{source}: {error}") from error
    text = yaml.safe_dump(data, sort_keys=False)
    target = Path(workspace) / "configs" / hashlib.sha256(text.encode()).hexdigest()[:12] / source.name
    target.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(target, f"# {source.name} with --set {' --set '.join(overrides)}\n{text}")
    return str(target)


def config_digest(config: str) -> str:
    """SHA-256 of the config's YAML file, or "missing"."""
    path = config_file(config)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"


def workspace_backbones(workspace: Path, config: str) -> dict:
    """The config's backbones as training and evaluation load them: local paths taken from the workspace."""
    return resolve_config(config, workspace).model.backbones().to_dict()


def workspace_clip_score_model(evaluation, workspace: Path):
    """The CLIPScore model's local-dir: path taken from the workspace like the backbones' (the demo's
    is its vision stand-in, a whole CLIP)."""
    name = evaluation.clip_score_model or ""
    folder = Path(workspace) / name[len(LOCAL_DIR):]
    if not name.startswith(LOCAL_DIR) or Path(name[len(LOCAL_DIR):]).is_absolute() or not folder.exists():
        return evaluation
    return replace(evaluation, clip_score_model=LOCAL_DIR + str(folder.resolve()))


def _workspace_backbones(model, workspace: Path) -> dict:
    return model.backbones().located(workspace).to_dict()
