"""Fast paths that prove themselves on first use, and the record of those that fell back.

Five settings turn on code that pays off on a GPU: the compiled training loss (`compile`), compiled
beam decoding over a static key/value cache (`static_decoding`), nvJPEG on the device
(`device_decoding`, ituning/device_jpeg.py), training data held on the device (`data_on_device`)
and the memory probe behind `micro_batch_size: auto` (`micro_batch`). Each is a `FastPath`. In `auto`, the first time a
process would use one, one real batch goes through it and through the plain path, and the two
results are compared with the tolerance stated for that path; on an exception or a mismatch the
plain path is used from then on, one warning line names the path and the reason, and the fallback
is recorded here (the application turns the record into MLflow tags `fallback.<path>`). `always`
runs the same check and raises instead; `never` uses the plain path without a check. A failure
after the check (a recompilation error in a later epoch) falls back the same way where the plain
path can continue from the same state (`FastPath.failed_later`).

The outcome is per process: a path checked once is not checked again, by the same or a later run
in that process. `outcomes()` says for each path that was considered whether it runs.
"""

import logging
from collections.abc import Callable
from typing import Any

from ituning.fault_injection import injected, raise_if_injected

log = logging.getLogger(__name__)

MODES = ("auto", "always", "never")
ON = "on"


class FastPathFailed(RuntimeError):
    """A fast path set to `always` failed its check or later."""


def mode_of(setting: bool | str) -> str:
    """A setting as auto / always / never (true and false are always and never)."""
    if setting is True:
        return "always"
    if setting is False:
        return "never"
    if setting not in MODES:
        raise ValueError(f"a fast path's setting must be one of {', '.join(MODES)}, true or false; got {setting!r}")
    return setting


class FastPath:
    """One fast path: its name (`fallback.<name>`), what it is, and its outcome in this process."""

    def __init__(self, name: str, description: str):
        self.name, self.description = name, description
        self.outcome: str | None = None  # None: not checked yet; ON; else the reason it fell back

    @property
    def fell_back(self) -> bool:
        return self.outcome not in (None, ON)

    def available(self, here: bool) -> bool:
        """Whether `auto` turns the path on: `here` (the device offers it), or a test injects a fault into it."""
        return here or injected(self.name)

    def first_use(self, setting: bool | str, fast: Callable[[], Any], plain: Callable[[], Any],
                  difference: Callable[[Any, Any], str]) -> tuple[bool, Any]:
        """(whether the fast path takes over, this batch's result from the path chosen). The first
        time in a process, fast() and plain() both run and difference(fast's, plain's) must be ""."""
        mode = mode_of(setting)
        if mode == "never" or self.fell_back:
            return False, plain()
        if self.outcome == ON:
            return True, fast()
        try:
            raise_if_injected(self.name)
            fast_result = fast()
        except Exception as error:
            self.fall_back(mode, f"{type(error).__name__}: {error}", error)
            return False, plain()
        plain_result = plain()
        problem = difference(fast_result, plain_result)
        if problem:
            self.fall_back(mode, f"differs from the plain path: {problem}")
            return False, plain_result
        self.outcome = ON
        return True, fast_result

    def failed_later(self, setting: bool | str, error: Exception) -> None:
        """The path failed after its check: raise for `always`, else record it and go on with the
        plain path (the caller continues from the same state)."""
        self.fall_back(mode_of(setting), f"{type(error).__name__}: {error}", error)

    def fall_back(self, mode: str, reason: str, error: Exception | None = None) -> None:
        reason = " ".join(reason.split())[:300]
        if mode == "always":
            raise FastPathFailed(f"{self.description} ({self.name}) failed: {reason}; set it to auto to fall "
                                 f"back to the plain path, or never to skip it") from error
        if self.fell_back:  # already on the plain path: the first reason stands
            return
        log.warning("warning: %s (%s) fell back to the plain path: %s", self.description, self.name, reason)
        self.outcome = reason


COMPILE = FastPath("compile", "the compiled training loss")
STATIC_DECODING = FastPath("static_decoding", "compiled beam decoding over a static KV cache")
# Its setting and tag keep the name they were published under (fallback.device_decoding); the code's is device_jpeg.
DEVICE_JPEG = FastPath("device_decoding", "JPEG decoding on the device (nvJPEG)")
DATA_ON_DEVICE = FastPath("data_on_device", "training data held on the device")
MICRO_BATCH = FastPath("micro_batch", "the measured micro-batch (micro_batch_size: auto)")
PATHS = (COMPILE, STATIC_DECODING, DEVICE_JPEG, DATA_ON_DEVICE, MICRO_BATCH)


def outcomes() -> dict[str, str]:
    """Each path checked in this process: "on", or the reason it fell back."""
    return {path.name: path.outcome for path in PATHS if path.outcome is not None}


def fallbacks() -> dict[str, str]:
    """The reason of each path that fell back in this process."""
    return {path.name: path.outcome for path in PATHS if path.fell_back}


def forget_outcomes() -> None:
    """Check every path again at its next use (tests, or a process that changed its device)."""
    for path in PATHS:
        path.outcome = None
