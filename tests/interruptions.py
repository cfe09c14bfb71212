"""Killing a process at a chosen file-system step, to test that every interruption point of a write
leaves something the next run recovers from.

A step is one call that changes files under a root folder: a file written (safetensors or text), a
rename or replace, a folder tree removed. `FileSystemSteps` records them in order and, given
`kill_at`, raises `Killed` at that step: before it, or after doing half of it (half a file written,
part of a tree removed), as a kill during the call would leave it.
"""

import os
import shutil
from pathlib import Path

import safetensors.torch


class Killed(BaseException):
    """The process died here. A BaseException, like KeyboardInterrupt: no `except Exception` stops it."""


WRITE, RENAME, REMOVE = "write", "rename", "remove"
HALVES = (WRITE, REMOVE)  # the steps a kill can cut in half; a rename happens whole or not at all


class FileSystemSteps:
    def __init__(self, root: Path, kill_at: int | None = None, halfway: bool = False):
        self.root, self.kill_at, self.halfway = Path(root).resolve(), kill_at, halfway
        self.steps: list[tuple[str, str]] = []  # (kind, path under root)

    def install(self, monkeypatch, modules=()) -> "FileSystemSteps":
        """Patch the file-system calls; `modules` are those that imported safetensors' save_file by name."""
        rename, write_text, replace, rmtree = Path.rename, Path.write_text, os.replace, shutil.rmtree
        save_file = safetensors.torch.save_file

        def saved(tensors, filename, metadata=None):
            return self.step(WRITE, filename, lambda: save_file(tensors, filename, metadata),
                             lambda: _truncated(lambda: save_file(tensors, filename, metadata), filename))

        monkeypatch.setattr(Path, "rename", lambda path, target: self.step(RENAME, path, lambda: rename(path, target)))
        monkeypatch.setattr(Path, "write_text", lambda path, text, *args, **kwargs: self.step(
            WRITE, path, lambda: write_text(path, text, *args, **kwargs),
            lambda: write_text(path, text[: len(text) // 2], *args, **kwargs)))
        monkeypatch.setattr(os, "replace", lambda source, target: self.step(RENAME, source, lambda: replace(source, target)))
        monkeypatch.setattr(shutil, "rmtree", lambda path, *args, **kwargs: self.step(
            REMOVE, path, lambda: rmtree(path, *args, **kwargs), lambda: _remove_one_file(path)))
        for module in (safetensors.torch, *modules):
            monkeypatch.setattr(module, "save_file", saved)
        return self

    def step(self, kind: str, path, do, do_half=None):
        path = Path(path).resolve()
        if not path.is_relative_to(self.root):
            return do()
        self.steps.append((kind, str(path.relative_to(self.root))))
        if len(self.steps) - 1 == self.kill_at:
            if self.halfway and do_half is not None:
                do_half()
            raise Killed(f"killed {'halfway through' if self.halfway else 'before'} step {self.kill_at}: "
                         f"{kind} {path}")
        return do()


def _truncated(write, filename) -> None:
    write()
    size = os.path.getsize(filename)
    with open(filename, "r+b") as file:
        file.truncate(size // 2)


def _remove_one_file(folder) -> None:
    for parent, _, names in sorted(os.walk(folder)):
        if names:
            os.unlink(os.path.join(parent, sorted(names)[0]))
            return
