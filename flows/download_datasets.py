"""download-datasets: fetch, verify and unpack datasets side by side (or write the synthetic corpus)."""

from prefect import flow

from flows.parameters import (Corpora, Dataset, ImageArchives, Manifests, Source, SyntheticImages, Workspace,
                              resolve_workspace)
from flows.steps import DataSources, fetch_datasets
from storage.datasets import dataset_names


@flow(name="download-datasets", log_prints=True)
def download_datasets(datasets: list[Dataset] = list(dataset_names()), source: Source = "synthetic",
                      workspace: Workspace = None, synthetic_images: SyntheticImages = 600,
                      image_archives: ImageArchives = None, manifests: Manifests = None,
                      corpora: Corpora = None) -> list[dict]:
    data = DataSources(source, synthetic_images, image_archives or {}, manifests or {}, corpora or {})
    futures = fetch_datasets(resolve_workspace(workspace), list(datasets), data)
    return [future.result() for future in futures]
