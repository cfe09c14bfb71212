"""The registry of datasets: one module per dataset in this package, each holding a `DATASET`.

A dataset's module says everything the rest of the project needs to know of it: its name and
display names, its catalog splits (and which one trains, validates and tests), its built-in
download manifest, how its published annotation files are read, where its images lie, which
datasets must be catalogued first, what its evaluation scores by (NoCaps domains) and how the
synthetic corpus writes it. The catalog build, the download command, run configs, the command
line, the flows' parameter schema and the model card read it from here; adding a dataset is adding
a module (see docs/architecture.md).
"""

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from storage.jsonfields import MalformedInput
from storage.manifests import Manifest
from storage.sources import SourceRecords


class MissingInput(FileNotFoundError):
    """A dataset whose annotation files (or the catalog rows it needs) are not in the workspace yet."""


class RegistryError(RuntimeError):
    """A dataset module that does not describe its dataset fully (a fault of the code, not the input)."""


class UnknownDataset(MalformedInput):
    """A dataset name the registry does not hold (the message lists those it does)."""


@dataclass(frozen=True)
class AnnotationFiles:
    """What a dataset's reader is given: its downloaded files, and the catalog as built so far."""

    find: Callable[[str], Path]  # the file matching a glob pattern; MissingInput when there is none
    catalogued: Callable[[str, tuple[str, ...]], dict[str, str]]  # another dataset's image id -> split


@dataclass(frozen=True)
class Dataset:
    name: str  # catalog, command-line and config name
    title: str  # what a model card calls it, e.g. "COCO (Karpathy splits)"
    format_name: str  # what its format is called, e.g. "COCO" (a model card: "synthetic (COCO format)")
    splits: tuple[str, ...]  # its catalog splits
    train_split: str | None  # the split a stage trains on; None: only evaluated
    val_split: str | None  # the split a stage validates on; None: none
    evaluation_splits: tuple[str, ...]  # the splits a checkpoint can be scored on (`DATASET/SPLIT`)
    manifest: Callable[[], Manifest]  # the built-in downloads
    read: Callable[[AnnotationFiles], SourceRecords]  # its published annotation files, read
    image_layout: str  # where its images lie under data/<name>/, for people
    write_synthetic: Callable  # (storage.synthetic.SyntheticWriter, images, corpus) -> SyntheticPart
    needs: tuple[str, ...] = ()  # datasets catalogued before it
    domains: tuple[str, ...] = ()  # groups its evaluation scores apart (NoCaps domains)
    server_only_split: str | None = None  # references private to an evaluation server: submit, do not score
    images_on_request: str | None = None  # a note when its images must come from the user (`--images`)

    def problems(self, known: set[str]) -> list[str]:
        """What is missing or inconsistent in this description, one line each."""
        found = [f"{self.name}: {key} is empty" for key in ("name", "title", "format_name", "image_layout")
                 if not getattr(self, key)]
        found += [f"{self.name}: {key} is not callable" for key in ("manifest", "read", "write_synthetic")
                  if not callable(getattr(self, key))]
        for key in ("train_split", "val_split", "server_only_split"):
            value = getattr(self, key)
            if value is not None and value not in self.splits:
                found.append(f"{self.name}: {key} {value!r} is not one of its splits {self.splits}")
        found += [f"{self.name}: evaluation split {split!r} is not one of its splits {self.splits}"
                  for split in self.evaluation_splits if split not in self.splits]
        if self.server_only_split is not None and self.server_only_split not in self.evaluation_splits:
            found.append(f"{self.name}: server_only_split is not one of its evaluation splits")
        if self.val_split is not None and self.train_split is None:
            found.append(f"{self.name}: a validation split without a training split")
        found += [f"{self.name}: needs unknown dataset {need!r}" for need in self.needs if need not in known]
        return found


def _modules() -> list[str]:
    return sorted(info.name for info in pkgutil.iter_modules(__path__) if not info.name.startswith("_"))


def _in_build_order(datasets: list[Dataset]) -> tuple[Dataset, ...]:
    """Each dataset after those it needs, otherwise by name."""
    ordered, placed, waiting = [], set(), list(datasets)
    while waiting:
        ready = [dataset for dataset in waiting if set(dataset.needs) <= placed]
        if not ready:
            raise RegistryError(f"datasets that need each other: {', '.join(d.name for d in waiting)}")
        ordered.append(ready[0])
        placed.add(ready[0].name)
        waiting.remove(ready[0])
    return tuple(ordered)


def check_registry(datasets: list[Dataset]) -> tuple[Dataset, ...]:
    """The datasets in build order; RegistryError naming every missing or inconsistent part."""
    names = [dataset.name for dataset in datasets]
    problems = [f"{name}: described by two modules" for name in sorted(set(names)) if names.count(name) > 1]
    for dataset in datasets:
        problems += dataset.problems(set(names))
    if problems:
        raise RegistryError("; ".join(problems))
    return _in_build_order(datasets)


def describe_module(module, name: str) -> Dataset:
    """The `DATASET` a registry module holds, named as its module is."""
    dataset = getattr(module, "DATASET", None)
    if not isinstance(dataset, Dataset):
        raise RegistryError(f"storage/datasets/{name}.py holds no DATASET (a storage.datasets.Dataset)")
    if dataset.name != name:
        raise RegistryError(f"storage/datasets/{name}.py describes {dataset.name!r}; name the module after it")
    return dataset


@cache
def all_datasets() -> tuple[Dataset, ...]:
    """Every dataset of the registry, each after those it needs."""
    return check_registry([describe_module(importlib.import_module(f"{__name__}.{name}"), name)
                           for name in _modules()])


def dataset_names() -> tuple[str, ...]:
    """Every dataset name, in build order."""
    return tuple(dataset.name for dataset in all_datasets())


def get_dataset(name: str) -> Dataset:
    for dataset in all_datasets():
        if dataset.name == name:
            return dataset
    raise UnknownDataset(f"unknown dataset {name!r}; choose one of {', '.join(dataset_names())}")


def built_in_manifest(name: str) -> Manifest:
    """The files a dataset downloads unless a manifest file replaces them."""
    return get_dataset(name).manifest()


def trained_on() -> dict[str, tuple[str, str | None]]:
    """name -> (training split, validation split or None) of every dataset a stage can train on."""
    return {dataset.name: (dataset.train_split, dataset.val_split) for dataset in all_datasets()
            if dataset.train_split is not None}


def evaluated_only() -> tuple[str, ...]:
    """The datasets that are only scored, never trained on."""
    return tuple(dataset.name for dataset in all_datasets() if dataset.train_split is None)


def evaluated() -> tuple[Dataset, ...]:
    """The datasets a checkpoint can be scored on."""
    return tuple(dataset for dataset in all_datasets() if dataset.evaluation_splits)
