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
