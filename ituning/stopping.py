"""Stopping a training run from another thread: `request_stop()` (a Ctrl-C handler calls it) makes the
run in progress end after its current optimizer step, with the resumable checkpoint of that step
written, by raising TrainingInterrupted; `wait_for_stop` waits until it has."""

import threading
from contextlib import contextmanager
from pathlib import Path

from ituning.distributed import summed

STOP = threading.Event()  # set from any thread (a Ctrl-C handler); holds until a run honours it
_RUNNING = threading.Condition()  # guards _running_count: the stage runs in progress in this process
_running_count = 0


def request_stop() -> None:
    """Stop the training in progress after its current optimizer step: it writes the resumable
    checkpoint of that step, then raises TrainingInterrupted."""
    STOP.set()


def wait_for_stop(timeout_s: float) -> bool:
    """After `request_stop`: wait until no training run of this process is in progress, each having
    written the checkpoint it stopped at; False when `timeout_s` ran out first."""
    with _RUNNING:
        return _RUNNING.wait_for(lambda: _running_count == 0, timeout_s)


@contextmanager
def counted_as_running():
    """The block counts as a training run in progress, which `wait_for_stop` waits for."""
    global _running_count
    with _RUNNING:
        _running_count += 1
    try:
        yield
    finally:
        with _RUNNING:
            _running_count -= 1
            _RUNNING.notify_all()


def stop_requested() -> bool:
    """Whether a stop was requested, in any process of a torchrun launch: they all stop at the same step."""
    return summed(float(STOP.is_set())) > 0


class TrainingInterrupted(KeyboardInterrupt):
    """Training stopped on request (`request_stop`) between two optimizer steps, after writing the
    resumable checkpoint of `step`: a rerun continues from there. A KeyboardInterrupt, so that what
    handles Ctrl-C handles it the same way."""

    def __init__(self, step: int, checkpoint: Path):
        super().__init__(f"training stopped at step {step}; {checkpoint} resumes from there")
        self.step, self.checkpoint = step, checkpoint
