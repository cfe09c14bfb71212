"""One writer at a time for each stage folder and each workspace step that writes shared state.

A second run (`ituning train`, `ituning pipeline`, a flow) that reaches a step another process is
doing says whom it waits for and waits up to the wait setting (`--wait SECONDS`, or ITUNING_WAIT;
DEFAULT_WAIT_S when neither is set), then goes on: it finds the step done and reuses it. When the
wait runs out it stops with StepBusy naming the holder. The locks are flock(2) locks
(storage/locks.py): a holder killed outright lets go at once.

Locked here: a training stage's folder, the demo's stand-in backbones and registering a model in
the registry. The feature cache's shards and the catalog have their own locks; an evaluation writes
into a folder of its own MLflow run, so no two runs share it.
"""

import os
from contextlib import contextmanager
from pathlib import Path

from storage.locks import one_writer

WAIT_ENV = "ITUNING_WAIT"
# Long enough for the short steps (stand-ins, registering) and the end of a stage another run is
# finishing; short enough that a scheduled run does not hang for hours behind a long training.
DEFAULT_WAIT_S = 600.0


def step_wait() -> float:
    """Seconds to wait for another process's step: ITUNING_WAIT (which --wait sets), else the default."""
    value = os.environ.get(WAIT_ENV, "").strip()
    if not value:
        return DEFAULT_WAIT_S
    try:
        seconds = float(value)
    except ValueError:
        raise ValueError(f"{WAIT_ENV}={value!r}: expected a number of seconds") from None
    if seconds < 0:
        raise ValueError(f"{WAIT_ENV}={value!r}: expected a number of seconds, 0 or more")
    return seconds


def set_step_wait(seconds: float | None) -> None:
    """What --wait sets, for this process's steps and the flow runs it starts."""
    if seconds is not None:
        os.environ[WAIT_ENV] = f"{seconds:g}"


@contextmanager
def folder_writer(folder: Path, doing: str):
    """The lock on a folder one step writes (a training stage's, the stand-in backbones'), beside it so
    that emptying the folder leaves it be."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with one_writer(folder.with_name(folder.name + ".lock"), f"{doing} in {folder}", step_wait()):
        yield


@contextmanager
def registry_writer(workspace: Path, name: str):
    """The lock on registering versions of the model `name` from this workspace: the check for a
    version with the same weights and the new version are one step."""
    locks = Path(workspace) / "locks"
    locks.mkdir(parents=True, exist_ok=True)
    safe = "".join(char if char.isalnum() or char in "._-" else "_" for char in name)
    with one_writer(locks / f"register-{safe}.lock", f"registering {name}", step_wait()):
        yield
