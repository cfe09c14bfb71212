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
