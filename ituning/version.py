"""The code version recorded in checkpoints and tracking runs."""

import subprocess
from functools import cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


@cache
def code_version() -> str:
    """The package version, plus the git commit (and '-dirty') when running from a checkout."""
    try:
        release = version("ituning")
    except PackageNotFoundError:
        release = "unknown"
    commit = _git("rev-parse", "--short=12", "HEAD")
    if not commit:
        return release
    dirty = "-dirty" if _git("status", "--porcelain", "--untracked-files=no") else ""
    return f"{release}+g{commit}{dirty}"


def _git(*args: str) -> str:
    try:
        result = subprocess.run(
            ["git", *args], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return result.stdout.strip() if result.returncode == 0 else ""
