"""Tasks for training, evaluation, the model registry and the MLflow parent run."""

from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from pipeline import evaluation, registry, tracking, training
from tasks.caching import PERSISTED, CatalogContents, expensive, in_this_workspace, relative_result, retry_transient

# A new pipeline run has a new MLflow parent run; the work it would redo is the same. The feature
# caches a task reads count by what they hold (InputContents), not by how finishing them went.
STAGE_CACHE = expensive(exclude=("parent_run_id", "features"))


def stage_splits(inputs: dict) -> list:
    return training.stage_splits(inputs["workspace"], inputs["config"], inputs["stage"])


TRAIN_CACHE = STAGE_CACHE + CatalogContents(splits=stage_splits)
EVALUATION_CACHE = STAGE_CACHE + CatalogContents()

TRACKING_RETRIES = dict(retries=3, retry_delay_seconds=[5, 20, 80], retry_jitter_factor=0.5,
                        retry_condition_fn=retry_transient)


# Never retried: a failed training run resumes from its own last checkpoint when run again.
@task(name="train-stage", cache_policy=TRAIN_CACHE, **PERSISTED, task_run_name="train-{stage}")
def train_stage(workspace: Path, config: str, stage: str, parent_run_id: str | None = None,
                init_from: str | None = None, device: str = "auto", features: list[dict] | None = None,
                previous: str | None = None) -> dict:
    """`features` (the finished feature caches this stage reads) orders it after them; `previous`
    is the checkpoint the stage before it produced."""
    return relative_result(workspace, training.train_stage(
        workspace, config, stage, parent_run_id=parent_run_id, init_from=init_from, device=device,
        previous=in_this_workspace(workspace, previous)))


@task(name="evaluate", cache_policy=EVALUATION_CACHE, **PERSISTED, task_run_name="evaluate-{dataset}-{split}")
def evaluate_checkpoint(workspace: Path, checkpoint: str, dataset: str, split: str, parent_run_id: str | None = None,
                        gallery_size: int = 50, device: str = "auto", features: list[dict] | None = None) -> dict:
    return relative_result(workspace, evaluation.evaluate(
        workspace, in_this_workspace(workspace, checkpoint), dataset, split, parent_run_id=parent_run_id,
        gallery_size=gallery_size, device=device))


@task(name="register-captioner", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def register_captioner(workspace: Path, checkpoint: str, run_id: str, name: str) -> dict:
    """Not cached: the registry itself answers with the existing version for weights it holds."""
    return registry.register_captioner(workspace, in_this_workspace(workspace, checkpoint), run_id, name=name)


@task(name="promote-if-better", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def promote_if_better(workspace: Path, name: str, version: str | None, evaluation: dict,
                      waiting: str | None = None) -> dict:
    return registry.promote_evaluated(workspace, name, version, evaluation, waiting)


@task(name="start-pipeline-run", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def start_pipeline_run(workspace: Path, name: str, parameters: dict) -> str:
    return tracking.start_pipeline_run(workspace, name, parameters)


@task(name="finish-pipeline-run", cache_policy=NO_CACHE, **TRACKING_RETRIES)
def finish_pipeline_run(workspace: Path, run_id: str, failed: bool = False, all_reused: bool = False) -> None:
    tracking.finish_pipeline_run(workspace, run_id, failed=failed, all_reused=all_reused)
