"""Pieces the flows share. Each only submits tasks and wires their futures; no work happens here."""

from dataclasses import dataclass, field
from pathlib import Path

from prefect import unmapped
from prefect.futures import PrefectFuture, wait

from tasks.data import (build_catalog, build_demo_backbones, configured_backbones, download_dataset, use_local_corpus,
                        write_demo_corpus)
from tasks.features import cache_feature_shard, feature_shards, finish_feature_cache
from tasks.reports import advance_progress, open_progress
from tasks.training import evaluate_checkpoint, train_stage


def was_cached(future: PrefectFuture) -> bool:
    future.wait()
    return future.state.name == "Cached"


@dataclass(frozen=True)
class DataSources:
    """Where a flow's datasets come from: the synthetic corpus or the downloads (built-in manifests,
    or the workspace's earlier verified download of a dataset), with manifests and local corpora
    given per dataset taking their place."""

    source: str = "synthetic"
    synthetic_images: int = 600
    image_archives: dict[str, str] = field(default_factory=dict)  # dataset -> its image archive's URL or path
    manifests: dict[str, str] = field(default_factory=dict)
    corpora: dict[str, str] = field(default_factory=dict)

    def parameters(self) -> dict:
        return {"source": self.source, "synthetic_images": self.synthetic_images, "manifests": self.manifests,
                "corpora": self.corpora}


def fetch_datasets(workspace: Path, datasets: list[str], data: DataSources) -> list[PrefectFuture]:
    """One download (or local corpus) per dataset, side by side; the synthetic corpus first when that
    is the source."""
    manifests = write_demo_corpus(workspace, data.synthetic_images) if data.source == "synthetic" else {}
    manifests = {**manifests, **data.manifests}
    return [use_local_corpus.submit(workspace, dataset, data.corpora[dataset]) if dataset in data.corpora else
            download_dataset.submit(workspace, dataset, manifest=manifests.get(dataset),
                                    images=data.image_archives.get(dataset))
            for dataset in datasets]


def prepare(workspace: Path, datasets: list[str], downloads: list[PrefectFuture]) -> PrefectFuture:
    """The catalog once every download has finished; a failed download stops the run with its own error."""
    for future in downloads:
        future.result()
    return build_catalog.submit(workspace, datasets, downloads=downloads)


def backbones_for(workspace: Path, config: str, demo: bool, catalog: PrefectFuture | None,
                  steps: int = 100) -> tuple[dict, PrefectFuture | None]:
    """The backbones to encode and train with, and the task that built them (the demo's stand-ins)."""
    if not demo:
        return configured_backbones(workspace, config), None
    built = build_demo_backbones.submit(workspace, catalog, steps=steps)
    return built.result(), built


class FeatureEntries(dict):
    """(dataset, split) -> the task that finishes the split's feature cache (its entry point), with
    `shard_tasks[(dataset, split)]`, the tasks that encoded or reused its shards."""

    def __init__(self, entries: dict, shard_tasks: dict):
        super().__init__(entries)
        self.shard_tasks = shard_tasks


def encode_splits(workspace: Path, splits: list[list[str]], backbones: dict, shard_size: int, device: str,
                  catalog: PrefectFuture | None = None) -> FeatureEntries:
    """Every shard of every split mapped at once (threads, or Dask workers); one entry point per split."""
    listings = {(d, s): feature_shards.submit(workspace, d, s, shard_size, catalog=catalog) for d, s in splits}
    shard_futures = {key: cache_feature_shard.map(unmapped(workspace), unmapped(key[0]), unmapped(key[1]),
                                                  unmapped(backbones), listing.result(), unmapped(shard_size),
                                                  device=unmapped(device))
                     for key, listing in listings.items()}
    _report_shard_progress(shard_futures)
    return FeatureEntries({key: finish_feature_cache.submit(workspace, key[0], key[1], backbones, shard_size,
                                                            shard_files=futures, device=device)
                           for key, futures in shard_futures.items()}, shard_futures)


def _report_shard_progress(shard_futures: dict) -> None:
    every = [future for futures in shard_futures.values() for future in futures]
    progress = open_progress(f"feature shards: {len(every)}")
    remaining = set(every)
    while remaining:
        finished, remaining = wait(list(remaining), timeout=5)
        if finished:
            advance_progress(progress, len(every) - len(remaining), len(every))


def train_in_order(workspace: Path, config: str, stages: list[dict], entries: dict, parent_run_id: str | None,
                   device: str, init_from: str | None = None, refresh_last: bool = False) -> list[PrefectFuture]:
    """Stages one after the other, each starting from the previous one's checkpoint (the first from
    `init_from` when given); `refresh_last` trains the last one again even if its inputs are unchanged."""
    futures, previous = [], None
    for index, stage in enumerate(stages):
        features = [entries[(stage["dataset"], split)] for split in stage["splits"]]
        refresh = refresh_last and index == len(stages) - 1
        future = train_stage.with_options(refresh_cache=refresh or None).submit(
            workspace, config, stage["name"], parent_run_id=parent_run_id, init_from=init_from if index == 0 else None,
            device=device, features=features, previous=previous)
        previous = future.result()["checkpoint"]
        futures.append(future)
    return futures


def evaluate_all(workspace: Path, checkpoint: str, evaluations: list[list[str]], entries: dict,
                 parent_run_id: str | None, gallery_size: int, device: str, refresh: bool = False) -> list[PrefectFuture]:
    evaluate = evaluate_checkpoint.with_options(refresh_cache=refresh or None)
    return [evaluate.submit(workspace, checkpoint, dataset, split, parent_run_id=parent_run_id,
                            gallery_size=gallery_size, device=device, features=[entries[(dataset, split)]])
            for dataset, split in evaluations]


def step_record(step: str, future: PrefectFuture) -> dict:
    """What the summary shows of a finished task: whether it ran, its figures and its MLflow run."""
    result = future.result()
    found = result if isinstance(result, dict) else {}
    metrics = {name: value for name, value in step_figures(result).items()
               if isinstance(value, (int, float)) and not isinstance(value, bool)}
    return {"step": step, "cached": was_cached(future), "metrics": metrics, "run_id": found.get("run_id"),
            "already_done": found.get("trained_now") is False, "fallbacks": found.get("fallbacks") or {}}


def step_figures(result) -> dict:
    """An evaluation's metrics, a training stage's best CIDEr and steps, a download's images, a
    catalog's usable images per dataset; nothing for a feature cache's entry point."""
    if not isinstance(result, dict):
        return {}
    if "metrics" in result or "best_cider" in result:
        return result.get("metrics") or {"best CIDEr": result.get("best_cider"), "steps": result.get("steps")}
    if "fetched" in result:
        return {"images fetched": result.get("images"), "files": len(result.get("fetched") or [])}
    if result and all(isinstance(summary, dict) and "usable" in summary for summary in result.values()):
        return {f"{dataset} usable images": summary["usable"] for dataset, summary in result.items()}
    return {}


def data_records(datasets: list[str], downloads: list[PrefectFuture], catalog: PrefectFuture,
                 backbones: PrefectFuture | None, entries: dict) -> list[dict]:
    """Summary rows of the steps before training: downloads, the catalog, the demo's backbones, the feature caches."""
    records = [step_record(f"download {dataset}", future) for dataset, future in zip(datasets, downloads)]
    records.append(step_record("catalog", catalog))
    if backbones is not None:
        records.append(step_record("stand-in backbones", backbones))
    return records + [feature_record(key, entries) for key in entries]


def feature_record(key: tuple[str, str], entries: FeatureEntries) -> dict:
    """A split's feature cache counts as reused when every one of its shard tasks was and finishing
    the entry point (which always runs) encoded nothing; as rebuilt when that finish encoded again
    shards damaged since they were written."""
    record = step_record(f"features {key[0]}/{key[1]}", entries[key])
    shards = entries.shard_tasks.get(key, [])
    all_cached = bool(shards) and all(was_cached(future) for future in shards)
    rebuilt = bool(entries[key].result()["encoded_shards"])
    record["cached"], record["rebuilt"] = all_cached and not rebuilt, all_cached and rebuilt
    return record
