"""Ctrl-C during `ituning pipeline`, as a terminal sends it: SIGINT to the whole process group (the
command and the temporary Prefect server it started). Training runs in a worker thread of the flow,
which the interrupt does not reach by itself; it stops at its next step with a checkpoint, the command
says from which step a rerun resumes (exit 130, no traceback or Prefect crash report), and the rerun
resumes there. On a copy of the session's demo run, with the stage's settings changed, so that only
the stage trains again."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.training import checkpoint_step
from tests.flow_fixtures import SMALL_RUN

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
ITUNING = str(Path(sys.executable).parent / "ituning")
EPOCHS = 30  # 3 steps an epoch: the first checkpoint comes at step 3 or 4, long before the last
LONGER_STAGE = [f"--set=stages[0].epochs={EPOCHS}", "--set=stages[0].batch_size=8", "--set=stages[0].micro_batch_size=8",
                "--set=stages[0].checkpoint_every_steps=4", "--set=stages[0].val_split=null"]
NOISE = ("Traceback", "ValueError", "Crash detected", "Task run failed", "Aborted", "Finished in state")


def pipeline_command(workspace: Path) -> list[str]:
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
    return [ITUNING, "pipeline", *options, *LONGER_STAGE, "--workspace", str(workspace)]


def environment() -> dict[str, str]:
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("PREFECT_", "MLFLOW_TRACKING_URI", "ITUNING_WORKSPACE"))}


def step_written_since(stage: Path, moment: float) -> int:
    """The step of the stage's last checkpoint when it was written after `moment`, else 0."""
    state = stage / "last" / "trainer_state.json"
    try:
        return checkpoint_step(stage) if state.stat().st_mtime > moment else 0
    except FileNotFoundError:  # between a checkpoint's swap and the next
        return 0


@pytest.mark.timeout(2400)  # the session's demo run may start here
def test_ctrl_c_stops_the_pipelines_training_says_where_a_rerun_resumes_and_the_rerun_does(demo_workspace_copy):
    workspace = demo_workspace_copy
    stage = workspace / "runs" / "demo" / "finetune"
    started = time.time()
    running = subprocess.Popen(pipeline_command(workspace), cwd=ROOT, env=environment(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    while running.poll() is None and not step_written_since(stage, started):
        time.sleep(0.2)
    os.killpg(running.pid, signal.SIGINT)
    stdout, stderr = running.communicate(timeout=900)
    step = checkpoint_step(stage)
    assert running.returncode == 130, stdout[-2000:] + stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == f"interrupted; rerun to resume from step {step}", stderr
    assert step > 0
    for noise in NOISE:
        assert noise not in stderr, stderr

    rerun = subprocess.run(pipeline_command(workspace), cwd=ROOT, env=environment(), capture_output=True, text=True,
                           timeout=1800)
    assert rerun.returncode == 0, rerun.stdout[-2000:] + rerun.stderr[-3000:]
    client = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}")
    [experiment] = [item for item in client.search_experiments() if item.name == "ituning"]
    stage_runs = client.search_runs([experiment.experiment_id], "tags.`ituning.stage` = 'finetune'",
                                    order_by=["attributes.start_time DESC"])
    resumed = [metric.step for metric in client.get_metric_history(stage_runs[0].info.run_id, "loss")]
    assert min(resumed) == step + 1, resumed
