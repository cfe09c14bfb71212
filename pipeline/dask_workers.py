"""Where a flow's shards (feature-cache shards, caption-collection shards) run; flows/cache_features.py
makes the task runner:

- nothing set: on Prefect's thread pool, in the flow's own process;
- ITUNING_DASK_ADDRESS=HOST:PORT: on that running Dask scheduler's workers;
- ITUNING_DASK_WORKERS=N: on a local Dask cluster of N single-threaded worker processes, started for
  the flow run and closed after it. Where GPUs are visible, worker i sees only GPU i mod G (its
  CUDA_VISIBLE_DEVICES), so `cuda` in a worker is a GPU of its own;
- ITUNING_DASK_WORKERS=gpus: one such worker per visible GPU.
"""

import os

WORKERS_VARIABLE, ADDRESS_VARIABLE = "ITUNING_DASK_WORKERS", "ITUNING_DASK_ADDRESS"
ONE_PER_GPU = "gpus"


def visible_gpus() -> list[str]:
    """The GPUs this process may use, as CUDA names them: CUDA_VISIBLE_DEVICES's list where it is
    set, else every GPU torch counts."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [] if listed.strip() in ("", "-1") else [gpu.strip() for gpu in listed.split(",")]
    import torch

    return [str(index) for index in range(torch.cuda.device_count())]


def worker_count(setting: str, gpus: list[str]) -> int:
    """The number of workers ITUNING_DASK_WORKERS asks for."""
    if setting.strip().lower() == ONE_PER_GPU:
        if not gpus:
            raise ValueError(f"{WORKERS_VARIABLE}={setting}: no GPU is visible here; give a number of workers")
        return len(gpus)
    try:
        count = int(setting)
    except ValueError:
        raise ValueError(f"{WORKERS_VARIABLE}={setting!r}: a number of workers, or {ONE_PER_GPU!r}") from None
    if count < 1:
        raise ValueError(f"{WORKERS_VARIABLE}={setting}: at least 1 worker")
    return count


def worker_specs(workers: int, gpus: list[str]) -> dict:
    """distributed.SpecCluster's worker specs: single-threaded worker processes under nannies, each
    seeing one GPU (round robin) where there are GPUs."""
    def options(index: int) -> dict:
        pinned = {"env": {"CUDA_VISIBLE_DEVICES": gpus[index % len(gpus)]}} if gpus else {}
        return {"nthreads": 1, **pinned}

    return {f"worker-{index}": {"cls": "distributed.Nanny", "options": options(index)} for index in range(workers)}


def cluster_spec(workers: int, gpus: list[str]) -> dict:
    """Keyword arguments of distributed.SpecCluster for a local cluster of `workers` workers."""
    scheduler = {"cls": "distributed.Scheduler", "options": {"dashboard_address": ":0", "host": "127.0.0.1"}}
    return {"workers": worker_specs(workers, gpus), "scheduler": scheduler}
