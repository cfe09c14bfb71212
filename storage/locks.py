"""Lock files: one process at a time builds a thing (a feature shard, the catalog).

A lock is an exclusive flock(2) on a small file holding a line about its holder, `PID HOST
START`, and a second line saying what it is doing (by default its command line), so whoever finds
it taken can say who has it. The kernel lets go of the lock when the
holder exits, however it ends: the file a killed holder leaves behind, with its dead PID, is simply
taken over by the next one. The holder removes the file when it lets go.

Threads of one process each open their own file, so they exclude one another too. A child forked
while a lock is held (a DataLoader worker) closes its copy at once: the lock stays its parent's and
ends with the parent, not with the last child to exit.
"""

import fcntl
import os
import socket
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

_HELD: dict[int, "FileLock"] = {}  # id -> lock held by this process, for closing in forked children


@dataclass(frozen=True)
class Holder:
    pid: int
    host: str
    since: str  # local time the lock was taken, to the second
    doing: str = ""  # what it holds the lock for: its command line, or the step it runs

    def __str__(self) -> str:
        return f"PID {self.pid} on {self.host} since {self.since}" + (f" ({self.doing})" if self.doing else "")


class LockHeld(RuntimeError):
    """Another process (or thread) holds the lock."""

    def __init__(self, message: str, holder: Holder | None = None):
        super().__init__(message)
        self.holder = holder


class StepBusy(LockHeld):
    """Another process held a step's lock for longer than the wait allowed."""


def command_line() -> str:
    """This process's command line as a person would type it, shortened to fit a lock file's line."""
    words = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    text = " ".join(" ".join(words).split())
    return text if len(text) <= 200 else text[:199] + "…"


class FileLock:
    def __init__(self, path: Path, doing: str | None = None):
        self.path = Path(path)
        self.doing = " ".join((doing or command_line()).split())
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, wait: float = 0.0) -> bool:
        """Take the lock, waiting up to `wait` seconds for its holder to let go; False if it did not."""
        deadline = time.monotonic() + wait
        while not self._try():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(0.1, max(0.0, deadline - time.monotonic())))
        return True

    def release(self) -> None:
        if self._fd is None:
            return
        self.path.unlink(missing_ok=True)  # while still holding it: the next holder starts a new file
        os.close(self._fd)
        _HELD.pop(id(self), None)
        self._fd = None

    def holder(self) -> Holder | None:
        """Who holds the lock now, as its file says; None when it cannot be told."""
        return read_holder(self.path)

    def _try(self) -> bool:
        if self._fd is not None:
            return True
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            if _same_file(fd, self.path):
                break
            os.close(fd)  # its last holder removed the file between our open and flock: take the new one
        started = datetime.now().isoformat(sep=" ", timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {socket.gethostname()} {started}\n{self.doing}\n".encode())
        self._fd = fd
        _HELD[id(self)] = self
        return True

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def read_holder(path: Path, attempts: int = 5) -> Holder | None:
    """The holder line of a lock file (retried briefly: a new holder writes it just after locking)."""
    for attempt in range(attempts):
        try:
            first, _, doing = Path(path).read_text().partition("\n")
            pid, host, since = first.split(maxsplit=2)
            return Holder(int(pid), host, since.strip(), doing.strip())
        except (OSError, ValueError):
            if attempt + 1 < attempts:
                time.sleep(0.02)
    return None


@contextmanager
def one_writer(path: Path, doing: str, wait: float, announce=None):
    """Hold the lock at `path` for `doing`; while another process holds it, say once whom it waits for
    (through `announce`, a function taking one line; default stderr) and wait up to `wait` seconds,
    then raise StepBusy naming the holder. The lock goes with this process, however it ends."""
    with FileLock(path) as lock:  # its holder line names the command that holds it
        if not lock.acquire(0):
            holder = lock.holder()
            line = f"{doing}: waiting up to {wait:g} s for {holder or 'another process'} to finish"
            (announce or _to_stderr)(line)
            if not lock.acquire(wait):
                holder = lock.holder() or holder
                raise StepBusy(f"{doing}: still held after {wait:g} s by {holder or 'another process'}; run again "
                               f"when it has finished, or with a longer --wait", holder)
        yield lock


def _to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def alive_elsewhere(holder: Holder | None) -> bool:
    """Whether a holder line names another process that is still running (on this host; one on
    another host is taken as running)."""
    if holder is None or (holder.host == socket.gethostname() and holder.pid == os.getpid()):
        return False
    if holder.host != socket.gethostname():
        return True
    try:
        os.kill(holder.pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == os.stat(path).st_ino
    except FileNotFoundError:
        return False


def _close_in_child() -> None:
    for lock in list(_HELD.values()):
        os.close(lock._fd)
        lock._fd = None
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)
