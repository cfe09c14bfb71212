"""What a user reads on the terminal from `ituning pipeline` (the command `make demo` runs, here on
the small corpus): what happened, step by step, and nothing else.

The libraries underneath print their own chatter (the PTB tokenizer's line per call, transformers'
warnings, MLflow's download bars and registration lines, the tokenizer trainer's bar); it belongs in
the logs. Progress goes to stderr as time-stamped lines, the results to stdout.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.flow_fixtures import SMALL_RUN

ROOT = Path(__file__).resolve().parent.parent
ITUNING = str(Path(sys.executable).parent / "ituning")
CHATTER = ("PTBTokenizer", "tokenized", "loss_type", "Downloading artifacts", "Successfully registered",
           "Created version", "Traceback", "Warning", "it/s]")
PROGRESS_LINE = re.compile(r"\d\d:\d\d:\d\d \| \S.*")
LONG_NUMBER = re.compile(r"\d\.\d{5,}")  # a score printed with all its digits


@pytest.fixture(scope="module")
def demo_output(tmp_path_factory):
    workspace = tmp_path_factory.mktemp("terminal") / "ws"
    environment = {name: value for name, value in os.environ.items()
                   if not name.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
    options = [f"--{key.replace('_', '-')}={value}" for key, value in SMALL_RUN.items()]
    result = subprocess.run([ITUNING, "pipeline", *options, "--workspace", str(workspace)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the pipeline runs in the fixture: about 3 min on two idle cores
def test_the_terminal_shows_the_steps_the_scores_and_no_library_chatter(demo_output):
    out, err = demo_output.stdout, demo_output.stderr
    for chatter in CHATTER:
        assert chatter not in out + err, f"{chatter!r} on the terminal:\n{out}\n{err}"
    assert "" not in out.splitlines(), f"empty lines on stdout:\n{out}"
    assert not LONG_NUMBER.search(out), out

    steps = [line.split()[:3] for line in out.splitlines() if line.startswith("  ") and "\t" not in line]
    shown = {" ".join(words[:2]) if words[0] in ("download", "features", "evaluate", "stand-in") else words[0]
             for words in steps}
    assert {"download coco", "catalog", "stand-in backbones", "features coco/train", "finetune",
            "evaluate coco/test"} <= shown, out
    assert re.search(r"^  CIDEr +\d+\.\d{4}$", out, re.MULTILINE), out
    assert re.search(r"^Registered ituning-demo version 1 ", out, re.MULTILINE), out


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_progress_reaches_the_terminal_as_time_stamped_lines(demo_output):
    lines = demo_output.stderr.splitlines()
    assert lines and all(PROGRESS_LINE.fullmatch(line) for line in lines), demo_output.stderr
    for step in ("vision stand-in", "encoding coco/train", "finetune", "captioning"):
        assert any(f"| {step}" in line for line in lines), f"no progress of {step}:\n{demo_output.stderr}"
