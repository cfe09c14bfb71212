"""Progress of long work, shown where the user is looking.

On a terminal, a tqdm bar with the rate and the time left (no bar when stderr is not a terminal,
so logs hold no carriage returns). And always, every `log_every_s` seconds and once at the end,
one INFO line on the `ituning.progress` logger, e.g.

    finetune: 40/120 steps (33%), 2.1 steps/s, about 38 s left

The pipeline's flow runs carry that logger into their logs, which is how a run shows its progress
in the Prefect UI; `ituning` commands print it on the terminal when no bar can be drawn.
"""

import logging
import time

from tqdm.auto import tqdm

LOG = logging.getLogger("ituning.progress")
LOG_EVERY_S = 15.0


class Bar(tqdm):
    # No monitor thread: a second thread in the process makes data loaders start their workers through
    # the fork server (ituning.data.worker_start_method), seconds of imports slower than a fork.
    monitor_interval = 0


class Progress:
    """`with Progress(total, "finetune", "steps") as progress: ... progress.update()`."""

    def __init__(self, total: int | None, description: str, unit: str = "items", initial: int = 0,
                 enabled: bool = True, log_every_s: float = LOG_EVERY_S):
        self.total, self.description, self.unit = total, description, unit
        self.done, self.started_with = initial, initial
        self.enabled, self.log_every_s = enabled, log_every_s
        self.started = self.last_logged = time.monotonic()
        self.bar = Bar(total=total, initial=initial, desc=description, unit=f" {unit}", disable=None if enabled else True,
                        dynamic_ncols=True)

    def update(self, count: int = 1, **shown) -> None:
        """`count` more done; `shown` (e.g. loss=2.31) goes beside the bar."""
        self.done += count
        self.bar.update(count)
        if shown:
            self.bar.set_postfix(shown, refresh=False)
        now = time.monotonic()
        if self.enabled and now - self.last_logged >= self.log_every_s:
            self.last_logged = now
            LOG.info("%s", self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.started, 1e-9)
        rate = (self.done - self.started_with) / elapsed
        if not self.total:
            return f"{self.description}: {self.done} {self.unit}, {rate:.1f} {self.unit}/s"
        share = f"{self.done}/{self.total} {self.unit} ({100 * self.done / self.total:.0f}%)"
        left = (self.total - self.done) / rate if rate > 0 else None
        eta = f", about {_duration(left)} left" if left is not None and self.done < self.total else ""
        return f"{self.description}: {share}, {rate:.1f} {self.unit}/s{eta}"

    def close(self) -> None:
        self.bar.close()
        if self.enabled:
            LOG.info("%s: %d %s in %s", self.description, self.done - self.started_with, self.unit,
                     _duration(time.monotonic() - self.started))

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes} min {seconds:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"
