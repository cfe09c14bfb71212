"""Progress lines: what a flow run's log and a terminal without a bar show of long work."""

import logging

import pytest

from ituning import progress as progress_module
from ituning.progress import Progress


@pytest.fixture(autouse=True)
def progress_reaches_caplog(monkeypatch):
    """flows/run_logs.py keeps the progress logger apart from the root logger, where caplog listens."""
    monkeypatch.setattr(logging.getLogger("ituning.progress"), "propagate", True)


def test_progress_logs_share_rate_and_time_left_then_the_total(caplog, monkeypatch):
    clock = iter([0.0, 10.0, 20.0, 30.0, 30.0]).__next__
    monkeypatch.setattr(progress_module.time, "monotonic", clock)
    with caplog.at_level(logging.INFO, logger="ituning.progress"):
        with Progress(40, "finetune", "steps", log_every_s=15) as progress:
            progress.update(10)  # t=10: not yet due
            progress.update(10, loss=2.5)  # t=20: 20 steps in 20 s
            progress.update(20)  # t=30: due again only at 35
    assert [record.getMessage() for record in caplog.records] == [
        "finetune: 20/40 steps (50%), 1.0 steps/s, about 20 s left",
        "finetune: 40 steps in 30 s",
    ]


def test_disabled_progress_says_nothing(caplog):
    with caplog.at_level(logging.INFO, logger="ituning.progress"):
        with Progress(3, "quiet", enabled=False, log_every_s=0) as progress:
            progress.update(3)
    assert caplog.records == []


def test_durations_read_naturally():
    assert [progress_module._duration(s) for s in (4.4, 75, 3725)] == ["4 s", "1 min 15 s", "1 h 02 min"]


def run_in_terminal(command: list[str], cwd, env: dict, timeout_s: float = 900) -> str:
    """What a command writes to a real (pseudo-)terminal of 120 x 40 characters, as a user would see
    it; its exit status checked."""
    import fcntl
    import os
    import pty
    import struct
    import subprocess
    import termios
    import time

    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # rows, columns
    process = subprocess.Popen(command, cwd=cwd, env=env, stdin=follower, stdout=follower, stderr=follower)
    os.close(follower)
    chunks, deadline = [], time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            chunk = os.read(leader, 65536)
        except OSError:  # the command has exited and closed the terminal
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(leader)
    assert process.wait(timeout=60) == 0, b"".join(chunks).decode(errors="replace")[-3000:]
    return b"".join(chunks).decode(errors="replace")


@pytest.mark.slow
def test_a_terminal_gets_bars_with_rate_and_time_left(tmp_path):
    import os
    import re
    import sys
    from pathlib import Path

    from storage.synthetic import unpack_karpathy_coco, write_corpus

    karpathy_json = unpack_karpathy_coco(write_corpus(tmp_path / "corpus", images=40, seed=0, with_defects=False))
    command = [str(Path(sys.executable).parent / "ituning"), "standins", "--karpathy-json", str(karpathy_json),
               "--out", str(tmp_path / "backbones"), "--vision-steps", "12", "--language-steps", "12"]
    shown = run_in_terminal(command, tmp_path, dict(os.environ))
    for stand_in in ("vision stand-in", "language stand-in"):
        bars = [frame for frame in re.split(r"[\r\n]", shown) if frame.startswith(f"{stand_in}:")]
        rate = r"[\d.]+(?: steps/s|s/ steps)"  # tqdm shows seconds per step when a step takes over a second
        assert any(re.search(rf"100%\|█+\| 12/12 \[[\d:]+<[\d:]+, +{rate}", bar) for bar in bars), shown


def test_a_progress_bar_starts_no_thread():
    """tqdm's monitor thread would make the process count as multi-threaded, and its data loaders start
    their workers through the fork server instead of forking (ituning/data.py:worker_start_method)."""
    import threading

    before = threading.active_count()
    with Progress(10, "counting", "items") as progress:
        progress.update(3)
        assert threading.active_count() == before
