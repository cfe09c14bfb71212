"""prepare-splits: the DuckDB catalog (Karpathy splits, NoCaps domains, VG without COCO val/test images)."""

from prefect import flow

from flows.parameters import Dataset, Workspace, resolve_workspace
from storage.datasets import dataset_names
from tasks.data import build_catalog


@flow(name="prepare-splits", log_prints=True)
def prepare_splits(datasets: list[Dataset] = list(dataset_names()),
                   workspace: Workspace = None) -> dict[str, dict]:
    return build_catalog(resolve_workspace(workspace), list(datasets))
