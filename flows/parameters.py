"""Flow parameter types. Prefect turns them into the deployment's parameter schema, so a run with a
bad value (an unknown preset or dataset, a negative size) is refused before any work starts."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from storage.datasets import dataset_names, evaluated
from storage.workspace import workspace_root

PRESETS = tuple(sorted(path.stem for path in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))

Preset = Literal[PRESETS]  # one of configs/*.yaml
Dataset = Literal[dataset_names()]
Source = Literal["synthetic", "download"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
Workspace = Annotated[str | None, Field(description="workspace folder; default ITUNING_WORKSPACE or ./workspace")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000)]
SyntheticImages = Annotated[int, Field(ge=15, le=100_000, description="images per synthetic dataset")]
# `SPLIT` (of the final stage's dataset) or `DATASET/SPLIT`, for the registry's evaluated datasets
EVALUATION_PATTERN = (f"^(({'|'.join(dataset.name for dataset in evaluated())})/)?"
                      f"({'|'.join(sorted({split for dataset in evaluated() for split in dataset.evaluation_splits}))})$")
Evaluation = Annotated[str, Field(pattern=EVALUATION_PATTERN,
                                  description="`test` (the final stage's dataset) or `nocaps/val`")]
GallerySize = Annotated[int, Field(ge=0, le=10_000)]
BackboneSteps = Annotated[int, Field(ge=1, le=100_000, description="training steps of each demo stand-in backbone")]


def resolve_workspace(workspace: str | None) -> Path:
    return workspace_root(workspace).resolve()
ModelName = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")] | None
Overrides = Annotated[list[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_.\[\]]*=.*$")]] | None,
                      Field(description="KEY=VALUE changes to the preset, e.g. stages[0].epochs=3 (as `--set`)")]
Manifests = Annotated[dict[Dataset, str] | None,
                      Field(description="per dataset, a manifest JSON file replacing the built-in download list")]
ImageArchives = Annotated[dict[Dataset, str] | None,
                          Field(description="per dataset, the URL or local path of its image archive (for datasets "
                                            "whose images are handed out on request, e.g. Flickr30k)")]
Corpora = Annotated[dict[Dataset, str] | None,
                    Field(description="per dataset, a folder already holding its files in the published layout "
                                      "(e.g. dataset_coco.json and its images), used in place")]
