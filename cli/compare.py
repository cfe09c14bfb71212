"""`ituning compare`: evaluation runs side by side, as one HTML page and a table on the terminal."""

import os
from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail, on_one_line

def default_report(workspace: Path, run_ids: list[str]) -> Path:
    names = "-".join(run_id[:8] for run_id in run_ids)
    return workspace / "reports" / f"compare-{names}.html"


def compare(
    runs: Annotated[list[str], typer.Argument(metavar="RUN", help="two or more evaluation runs: MLflow run "
                                                                  "ids, or run names where a name is unique")],
    workspace: Annotated[Path | None, typer.Option(help="whose tracking store and catalog the runs are in "
                                                        "(default $MLFLOW_TRACKING_URI for the store, "
                                                        "else $ITUNING_WORKSPACE or ./workspace)")] = None,
    out: Annotated[Path | None, typer.Option(help="the HTML file; default "
                                                  "WORKSPACE/reports/compare-<run ids>.html")] = None,
    images: Annotated[int, typer.Option(min=0, help="images shown with every run's caption, those the runs "
                                                    "differ most on by per-image CIDEr first")] = 50,
    log: Annotated[bool, typer.Option("--log/--no-log", help="log the page to MLflow as the artifact "
                                                             "compare/<file name> of a new run \"compare\", "
                                                             "tagged ituning.compared_runs")] = True,
    log_to: Annotated[str | None, typer.Option(help="log the page to this existing run instead")] = None,
):
    """Compare evaluation runs: a metrics table (a column per run, the best of each row marked,
    the paper's numbers beside where the preset and split match) and each run's captions of the
    images the runs share, beside thumbnails and references, the largest per-image CIDEr
    differences first. Writes one self-contained HTML file, prints its path and the table, and
    logs the file to MLflow (--no-log to skip)."""
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one line of output per outcome
    from mlflow.exceptions import MlflowException

    from pipeline import compare as comparing
    from storage.workspace import workspace_root

    workspace = workspace_root(workspace)
    if log_to and not log:
        fail("give --log-to RUN_ID or --no-log, not both")
    try:
        if log_to:
            comparing.require_run(workspace, log_to)
        comparison = comparing.compare_runs(workspace, runs, images)
        run_ids = [run.run_id for run in comparison.runs]
        report = comparing.write_html(comparison, out or default_report(workspace, run_ids))
        typer.echo(str(report))
        typer.echo(comparing.text_table(comparison), nl=False)
        for note in comparison.notes:
            typer.echo(f"note: {note}", err=True)
        if log:
            logged = comparing.log_report(workspace, report, run_ids, log_to)
            typer.echo(f"logged to MLflow run {logged} as compare/{report.name}")
    except (OSError, ValueError, RuntimeError, MlflowException) as error:
        fail(on_one_line(error))  # unknown runs, too few, nothing shared: input it cannot use
