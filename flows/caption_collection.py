"""caption-collection: every shard of a collection a Prefect task, each writing one Parquet file.

Shards run on threads by default; with ITUNING_DASK_ADDRESS (a running Dask scheduler) or
ITUNING_DASK_WORKERS (a local cluster of that many worker processes; `gpus`: one per GPU), on Dask, as the feature
cache's shards do (flows/cache_features.py). A worker lost mid-shard leaves no file for it: Dask runs
the shard again elsewhere, and a rerun of the flow redoes only the shards without a file.
"""

import time

from prefect import flow

from flows.cache_features import shard_task_runner
from pipeline.collection import CollectionSettings
from pipeline.step_locks import folder_writer
from tasks.collection import caption_shard, finish_collection, plan_collection


@flow(name="caption-collection", log_prints=True, task_runner=shard_task_runner())
def caption_collection(source: str, model: str, out: str, workspace: str | None = None, beams: int = 5,
                       max_length: int = 20, clip: str | None = None, clip_pretrained: str | None = None,
                       rerank: str = "none", shard_size: int = 1000, batch_size: int = 32, decode_workers: int = 2,
                       device: str = "auto", allow_private_urls: bool = False) -> dict:
    settings = CollectionSettings(model, beams, max_length, rerank=rerank, clip_model=clip,
                                  clip_pretrained=clip_pretrained, shard_size=shard_size, batch_size=batch_size,
                                  decode_workers=decode_workers, device=device, workspace=workspace,
                                  allow_private_urls=allow_private_urls)
    started = time.monotonic()
    with folder_writer(out, "captioning a collection"):
        # ---- list the source and claim the output folder for these settings
        plan = plan_collection(source, out, settings)
        # ---- one task per shard; finished shards are reused
        shards = [caption_shard.submit(shard, plan, settings) for shard in plan["shards"]]
        results = [future.result() for future in shards]
        # ---- the summary and the MLflow run
        summary = finish_collection(plan, results, time.monotonic() - started, settings)
    print(f"{summary['images']} images in {summary['shards']} shards: {summary['statuses']}")
    return summary
