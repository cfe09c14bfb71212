"""cache-features: encode splits into the HDF5 feature cache, one task per shard.

Shards run on threads by default. With ITUNING_DASK_ADDRESS (a running Dask scheduler) or
ITUNING_DASK_WORKERS (a local cluster of that many worker processes) set when the flow is loaded,
they run on Dask through prefect-dask's DaskTaskRunner; Dask workers then need PREFECT_API_URL.
"""

import os

from prefect import flow
from prefect.task_runners import ThreadPoolTaskRunner

from flows.parameters import BackboneSteps, Dataset, Device, Preset, ShardSize, Workspace, resolve_workspace
from flows.steps import backbones_for, encode_splits
from tasks.caching import flow_result
from tasks.data import plan_pipeline


def shard_task_runner():
    address, workers = os.environ.get("ITUNING_DASK_ADDRESS"), os.environ.get("ITUNING_DASK_WORKERS")
    if not (address or workers):
        return ThreadPoolTaskRunner()
    from prefect_dask import DaskTaskRunner

    if address:
        return DaskTaskRunner(address=address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": int(workers), "threads_per_worker": 1, "processes": True})


@flow(name="cache-features", log_prints=True, task_runner=shard_task_runner())
def cache_features(dataset: Dataset = "coco", splits: list[str] = ["train", "val", "test"], config: Preset = "demo",
                   workspace: Workspace = None, shard_size: ShardSize = 1024, device: Device = "auto",
                   backbone_steps: BackboneSteps = 100) -> dict[str, str]:
    root = resolve_workspace(workspace)
    plan = plan_pipeline(config, [])
    backbones, _ = backbones_for(root, config, plan["demo_backbones"], None, backbone_steps)
    entries = encode_splits(root, [[dataset, split] for split in splits], backbones, shard_size, device)
    return {f"{d}/{s}": flow_result(root, future.result()["entry"]) for (d, s), future in entries.items()}
