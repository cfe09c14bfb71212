"""Test-only fault injection into the fast paths (ituning/fast_paths.py). Not a setting for users.

The tests set ITUNING_TEST_FAULTS to a comma-separated list of fast-path names (`compile`,
`static_decoding`, `device_decoding`, `data_on_device`, `micro_batch`) in the environment of an
`ituning` subprocess. A named path is then taken as available on this device, so `auto` turns it
on even on a CPU, and its first-use check raises at once (no compile, no nvJPEG call): the run
meets the failure a broken fast path would give on a GPU and must fall back to the plain path.
Nothing else in the project reads this variable.
"""

import os

FAULTS_VARIABLE = "ITUNING_TEST_FAULTS"


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def injected(path: str) -> bool:
    """Whether the tests asked for `path` to fail."""
    return path in {name.strip() for name in os.environ.get(FAULTS_VARIABLE, "").split(",")}


def raise_if_injected(path: str) -> None:
    if injected(path):
        raise InjectedFault(f"fault injected into {path} by {FAULTS_VARIABLE} (tests only)")
