"""download-datasets: fetch, verify and unpack datasets side by side (or write the synthetic corpus)."""

from prefect import flow

from flows.parameters import Corpora, Dataset, Manifests, Source, SyntheticImages, Workspace, resolve_workspace
from flows.steps import DataSources, fetch_datasets
from storage.manifests import DATASETS


@flow(name="download-datasets", log_prints=True)
def download_datasets(datasets: list[Dataset] = list(DATASETS), source: Source = "synthetic",
                      workspace: Workspace = None, synthetic_images: SyntheticImages = 600,
                      flickr30k_images: str | None = None, manifests: Manifests = None,
                      corpora: Corpora = None) -> list[dict]:
    data = DataSources(source, synthetic_images, flickr30k_images, manifests or {}, corpora or {})
    futures = fetch_datasets(resolve_workspace(workspace), list(datasets), data)
    return [future.result() for future in futures]
