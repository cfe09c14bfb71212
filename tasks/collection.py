"""Tasks over pipeline/collection.py: one task per shard of a collection, so shards run side by side.

No Prefect cache: a shard's own Parquet file is its cache (caption_shard reuses one written with the
same settings digest), which survives whatever result storage a Dask worker has.
"""

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import collection
from pipeline.collection import CollectionSettings
from storage.collection_sources import Shard


@task(name="plan-collection", cache_policy=NO_CACHE)
def plan_collection(source: str, out: str, settings: CollectionSettings) -> dict:
    return collection.plan_collection(source, out, settings)


@task(name="caption-collection-shard", cache_policy=NO_CACHE, task_run_name="collection-{shard.name}")
def caption_shard(shard: Shard, plan: dict, settings: CollectionSettings) -> dict:
    return collection.caption_shard(shard, plan, settings)


@task(name="finish-collection", cache_policy=NO_CACHE)
def finish_collection(plan: dict, results: list[dict], seconds: float, settings: CollectionSettings) -> dict:
    return collection.finish_collection(plan, results, seconds, settings)
