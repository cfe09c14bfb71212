"""Flow parameter types. Prefect turns them into the deployment's parameter schema, so a run with a
bad value (an unknown preset or dataset, a negative size) is refused before any work starts."""

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from storage.manifests import DATASETS
from storage.workspace import workspace_root

PRESETS = tuple(sorted(path.stem for path in (Path(__file__).resolve().parent.parent / "configs").glob("*.yaml")))

Preset = Literal[PRESETS]  # one of configs/*.yaml
Dataset = Literal[DATASETS]
Source = Literal["synthetic", "download"]
Device = Annotated[str, Field(pattern=r"^(auto|cpu|cuda(:\d+)?|mps)$")]
Workspace = Annotated[str | None, Field(description="workspace folder; default ITUNING_WORKSPACE or ./workspace")]
ShardSize = Annotated[int, Field(ge=1, le=1_000_000)]
SyntheticImages = Annotated[int, Field(ge=15, le=100_000, description="images per synthetic dataset")]
Evaluation = Annotated[str, Field(pattern=r"^((coco|flickr30k|nocaps)/)?(val|test)$",
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
Corpora = Annotated[dict[Dataset, str] | None,
                    Field(description="per dataset, a folder already holding its files in the published layout "
                                      "(e.g. dataset_coco.json and its images), used in place")]
