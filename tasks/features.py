"""Tasks over the HDF5 feature cache: one task per shard, so shards run side by side."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import features
from tasks.caching import EXPENSIVE, PERSISTED, CatalogContents, relative_result

# A shard reads its split's image list; the captions do not change its tokens.
SHARD_CACHE = EXPENSIVE + CatalogContents(captions=False)


@task(name="list-feature-shards", cache_policy=NO_CACHE, task_run_name="shards-{dataset}-{split}")
def feature_shards(workspace: Path, dataset: str, split: str, shard_size: int, catalog: dict | None = None) -> list[int]:
    """`catalog` orders this after the catalog build."""
    return features.feature_shards(workspace, dataset, split, shard_size=shard_size)


@task(name="cache-feature-shard", cache_policy=SHARD_CACHE, **PERSISTED,
      task_run_name="features-{dataset}-{split}-{shard}")
def cache_feature_shard(workspace: Path, dataset: str, split: str, backbones: dict, shard: int, shard_size: int,
                        device: str = "auto") -> str:
    return relative_result(workspace, features.cache_feature_shard(workspace, dataset, split, backbones, shard,
                                                                   shard_size=shard_size, device=device))


@task(name="finish-feature-cache", cache_policy=NO_CACHE, task_run_name="features-{dataset}-{split}")
def finish_feature_cache(workspace: Path, dataset: str, split: str, backbones: dict, shard_size: int,
                         shard_files: list[str], device: str = "auto") -> dict:
    """Cheap (reuses every shard), so it always runs and re-checks the entry point (encoding again
    a shard damaged since it was written). {"entry": features.json path, "encoded_shards": [...]}."""
    return relative_result(workspace, features.completed_feature_cache(workspace, dataset, split, backbones,
                                                                       shard_size=shard_size, device=device))
