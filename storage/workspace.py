"""Where the pipeline keeps its files (see the layout in README.md)."""

import os
from pathlib import Path

DEFAULT_WORKSPACE = Path("workspace")


def workspace_root(override: str | Path | None = None) -> Path:
    """The workspace folder: `override`, else $ITUNING_WORKSPACE, else ./workspace."""
    if override is not None:
        return Path(override)
    return Path(os.environ.get("ITUNING_WORKSPACE") or DEFAULT_WORKSPACE)


def downloads_dir(root: Path, dataset: str) -> Path:
    return root / "downloads" / dataset


def data_dir(root: Path, dataset: str) -> Path:
    return root / "data" / dataset


def catalog_path(root: Path) -> Path:
    return root / "catalog.duckdb"


LOCAL_DIR = "local-dir:"  # the open_clip prefix of a local folder (ituning.backbones.LOCAL_DIR)


def in_workspace_terms(value, root: str | Path):
    """`value` (a path, or a dict or list of them, nested) with every absolute path inside the
    workspace `root` written relative to it (also after `local-dir:`): what a record stores so that
    the workspace can be copied or moved. Other values stay as they are."""
    if isinstance(value, dict):
        return {key: in_workspace_terms(item, root) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(in_workspace_terms(item, root) for item in value)
    if isinstance(value, Path):
        return Path(in_workspace_terms(str(value), root))
    if not isinstance(value, str):
        return value
    prefix = LOCAL_DIR if value.startswith(LOCAL_DIR) else ""
    path = value[len(prefix):]
    if not os.path.isabs(path):
        return value
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    if relative.startswith(os.pardir):
        return value
    return prefix + relative


def in_workspace(path: str | Path, root: str | Path) -> Path:
    """A path a record names, in the workspace `root`: a relative one is taken from it."""
    return Path(root) / path
