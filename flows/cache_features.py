"""cache-features: encode splits into the HDF5 feature cache, one task per shard.

Shards run on threads by default. With ITUNING_DASK_ADDRESS (a running Dask scheduler) or
ITUNING_DASK_WORKERS (a local cluster of that many worker processes, or `gpus` for one per GPU) set
when the flow is loaded, they run on Dask through prefect-dask's DaskTaskRunner
(pipeline/dask_workers.py); Dask workers then need PREFECT_API_URL.
"""

import os

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.parameters import BackboneSteps, Dataset, Device, Preset, ShardSize, Workspace, resolve_workspace
from flows.steps import backbones_for, encode_splits
from pipeline.dask_workers import ADDRESS_VARIABLE, WORKERS_VARIABLE, cluster_spec, visible_gpus, worker_count
from tasks.caching import flow_result
from tasks.data import plan_pipeline


def shard_task_runner():
    """Threads, or Dask where the environment asks for it (pipeline/dask_workers.py)."""
    address, setting = os.environ.get(ADDRESS_VARIABLE), os.environ.get(WORKERS_VARIABLE)
    if not (address or setting):
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    gpus = visible_gpus()
    return DaskTaskRunner(cluster_class="distributed.SpecCluster",
                          cluster_kwargs=cluster_spec(worker_count(setting, gpus), gpus))


@flow(name="cache-features", log_prints=True, task_runner=shard_task_runner())
def cache_features(dataset: Dataset = "coco", splits: list[str] = ["train", "val", "test"], config: Preset = "demo",
                   workspace: Workspace = None, shard_size: ShardSize = 1024, device: Device = "auto",
                   backbone_steps: BackboneSteps = 100) -> dict[str, str]:
    root = resolve_workspace(workspace)
    plan = plan_pipeline(config, [])
    backbones, _ = backbones_for(root, config, plan["demo_backbones"], None, backbone_steps)
    entries = encode_splits(root, [[dataset, split] for split in splits], backbones, shard_size, device)
    return {f"{d}/{s}": flow_result(root, future.result()["entry"]) for (d, s), future in entries.items()}
