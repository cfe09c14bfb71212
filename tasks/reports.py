"""Tasks that put results where people look: Prefect artifacts and the run's log."""

from pathlib import Path
from uuid import UUID

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from prefect.cache_policies import NO_CACHE

from pipeline.run_summary import pipeline_markdown


@task(name="publish-report", cache_policy=NO_CACHE)
def publish_report(title: str, records: list[dict], workspace: Path, samples: list[list[str]] = (),
                   notes: list[str] = (), key: str = "pipeline-summary") -> str:
    """A markdown artifact (metrics per stage, MLflow links) and one log line per reused stage."""
    logger = get_run_logger()
    for record in records:
        if record["cached"]:
            logger.info("%s: finished in an earlier run with the same inputs; reused, not re-run", record["step"])
    markdown = pipeline_markdown(title, records, workspace, samples, notes)
    create_markdown_artifact(markdown, key=key, description=title)
    return markdown


@task(name="open-progress", cache_policy=NO_CACHE)
def open_progress(description: str) -> str:
    return str(create_progress_artifact(0.0, description=description))


@task(name="advance-progress", cache_policy=NO_CACHE)
def advance_progress(artifact_id: str, done: int, total: int) -> None:
    update_progress_artifact(UUID(artifact_id), 100.0 * done / max(total, 1))
