"""What a user reads on the terminal from `ituning pipeline` (the command `make demo` runs, here on
the small corpus; the session's demo run, tests/flow_fixtures.py): what happened, step by step, and
nothing else.

The libraries underneath print their own chatter (the PTB tokenizer's line per call, transformers'
warnings, MLflow's download bars and registration lines, the tokenizer trainer's bar); it belongs in
the logs. Progress goes to stderr as time-stamped lines, the results to stdout.
"""

import re

import pytest

CHATTER = ("PTBTokenizer", "tokenized", "loss_type", "Downloading artifacts", "Successfully registered",
           "Created version", "Traceback", "Warning", "it/s]")
PROGRESS_LINE = re.compile(r"\d\d:\d\d:\d\d \| \S.*")
LONG_NUMBER = re.compile(r"\d\.\d{5,}")  # a score printed with all its digits


@pytest.mark.slow
@pytest.mark.timeout(1800)  # the session's demo run may start in this test: a few minutes on two cores
def test_the_terminal_shows_the_steps_the_scores_and_no_library_chatter(demo_run):
    out, err = demo_run.stdout, demo_run.stderr
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
def test_progress_reaches_the_terminal_as_time_stamped_lines(demo_run):
    lines = demo_run.stderr.splitlines()
    assert lines and all(PROGRESS_LINE.fullmatch(line) for line in lines), demo_run.stderr
    for step in ("vision stand-in", "encoding coco/train", "finetune", "captioning"):
        assert any(f"| {step}" in line for line in lines), f"no progress of {step}:\n{demo_run.stderr}"
