"""Tasks that put the datasets in place: the synthetic corpus, downloads, the catalog, the demo backbones."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import data, presets
from tasks.caching import EXPENSIVE, PERSISTED, CatalogContents, in_this_workspace, relative_result, retry_transient
from pipeline.plan import plan_for_config


@task(name="apply-config-overrides", cache_policy=NO_CACHE)
def apply_config_overrides(config: str, overrides: list[str], workspace: Path) -> str:
    """The config file a run with `--set` overrides reads (the preset itself without any)."""
    return presets.with_overrides(config, overrides, workspace)


@task(name="plan-pipeline", cache_policy=NO_CACHE)
def plan_pipeline(config: str, evaluate_on: list[str]) -> dict:
    """Which datasets, splits and stages the run configuration needs."""
    return plan_for_config(config, evaluate_on).to_dict()


@task(name="write-demo-corpus", cache_policy=EXPENSIVE, **PERSISTED)
def write_demo_corpus(workspace: Path, images: int, seed: int = 0) -> dict[str, str]:
    return relative_result(workspace, data.write_demo_corpus(workspace, images=images, seed=seed))


@task(name="download-dataset", cache_policy=EXPENSIVE, **PERSISTED, retries=3,
      retry_delay_seconds=[10, 40, 160], retry_jitter_factor=0.5, retry_condition_fn=retry_transient,
      task_run_name="download-{dataset}")
def download_dataset(workspace: Path, dataset: str, manifest: str | None = None, images: str | None = None) -> dict:
    return relative_result(workspace, data.download(workspace, dataset, manifest=in_this_workspace(workspace, manifest),
                                                    images=images))


@task(name="use-local-corpus", cache_policy=NO_CACHE, task_run_name="corpus-{dataset}")
def use_local_corpus(workspace: Path, dataset: str, folder: str) -> dict:
    return data.use_local_corpus(workspace, dataset, folder)


@task(name="build-catalog", cache_policy=EXPENSIVE, **PERSISTED)
def build_catalog(workspace: Path, datasets: list[str], downloads: list[dict] | None = None) -> dict[str, dict]:
    """`downloads` only orders this after the downloads and keys the cache on what they fetched."""
    return relative_result(workspace, data.build_catalog(workspace, datasets))


def standin_split(inputs: dict) -> list:
    return [data.STANDIN_SPLIT]


@task(name="build-demo-backbones", cache_policy=EXPENSIVE + CatalogContents(splits=standin_split), **PERSISTED)
def build_demo_backbones(workspace: Path, catalog: dict, seed: int = 0, steps: int = 100) -> dict:
    return relative_result(workspace, data.build_demo_backbones(workspace, seed=seed, vision_steps=steps,
                                                                language_steps=steps))


@task(name="configured-backbones", cache_policy=NO_CACHE)
def configured_backbones(workspace: Path, config: str) -> dict:
    """The config's backbones, its relative local paths taken from the workspace (the demo's stand-ins)."""
    return presets.workspace_backbones(workspace, config)
