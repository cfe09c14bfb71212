"""Builds started side by side in separate processes: one at a time where they would collide,
named clearly to the one that has to stop; side by side where they do not (parts of a cache)."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from ituning.standins import save_vision_standin
from ituning.backbones import BackboneSpec
from storage.acquire import download_dataset
from storage.catalog import Catalog
from pipeline.data import build_dataset
from ituning.encoding import EncodeSettings
from pipeline.features import split_cache_dir
from storage.manifests import load_manifest
from storage.synthetic import write_corpus
from storage.workspace import catalog_path

START_TIMEOUT_S = 120  # two interpreters importing torch on a busy machine
ITUNING = str(Path(sys.executable).with_name("ituning"))


def held_cli(target: str, pass_first: int = 0) -> str:
    """A script running `ituning ARGS` in which `target` (module:attribute), called once more than
    `pass_first` times, marks HOLD/<pid>.working and waits for HOLD/go: whoever gets there holds its
    locks until the test says."""
    module, _, attribute = target.partition(":")
    return textwrap.dedent(f"""
        import os, sys, time
        from pathlib import Path
        import {module}

        hold, work, calls = Path(sys.argv[1]), {module}.{attribute}, []

        def held(*args, **kwargs):
            calls.append(1)
            if len(calls) > {pass_first}:
                (hold / f"{{os.getpid()}}.working").touch()
                while not (hold / "go").exists():
                    time.sleep(0.05)
            return work(*args, **kwargs)

        {module}.{attribute} = held
        sys.argv = ["ituning", *sys.argv[2:]]
        from cli.main import main
        main()
    """)


def start_together(target: str, hold: Path, *commands: list[str], pass_first: int = 0) -> list[subprocess.Popen]:
    hold.mkdir(exist_ok=True)
    return [subprocess.Popen([sys.executable, "-c", held_cli(target, pass_first), str(hold), *command], text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE) for command in commands]


def wait_until(condition, timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if found := condition():
            return found
        time.sleep(0.1)
    return None


def finish(processes: list[subprocess.Popen], hold: Path) -> dict[subprocess.Popen, tuple[str, str]]:
    (hold / "go").touch()
    return {process: process.communicate(timeout=START_TIMEOUT_S) for process in processes}


def first_exited(processes):
    return wait_until(lambda: next((process for process in processes if process.poll() is not None), None))


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error: ")]


@pytest.fixture
def downloaded(tmp_path) -> Path:
    """A workspace holding the synthetic corpus's COCO download, not yet catalogued."""
    root = tmp_path / "workspace"
    corpus = write_corpus(tmp_path / "corpus", 15, seed=1)
    download_dataset(load_manifest(corpus.manifests["coco"]), root)
    return root


@pytest.fixture
def catalogued(downloaded) -> Path:
    with Catalog(catalog_path(downloaded)) as catalog:
        build_dataset(downloaded, "coco", catalog, workers=1)
    return downloaded


# ---- the lock file ----------------------------------------------------------------------------


def test_a_lock_is_named_while_held_and_free_the_moment_its_holder_is_killed(tmp_path):
    """Even while a child the holder forked (as a DataLoader forks its workers) lives on."""
    from storage.locks import FileLock, read_holder

    path = tmp_path / "thing.lock"
    script = textwrap.dedent(f"""
        import os, time
        from storage.locks import FileLock
        lock = FileLock({str(path)!r})
        assert lock.acquire()
        started, ready = os.pipe()
        child = os.fork()
        if child == 0:  # fork's hooks have run (the lock's copy closed) once the child runs its own code
            os.write(ready, b"x")
            time.sleep(60)
            os._exit(0)
        os.read(started, 1)
        print(child, flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    child = int(holder.stdout.readline())
    try:
        assert not FileLock(path).acquire()
        named = read_holder(path)
        assert (named.pid, named.host) == (holder.pid, socket.gethostname())
        holder.kill()
        holder.wait()
        assert Path(f"/proc/{child}").exists()  # the forked child still runs
        with FileLock(path) as lock:
            assert lock.acquire()  # at once: no wait for the child
            assert read_holder(path).pid == os.getpid()
            assert not FileLock(path).acquire()  # another thread of this process is refused too
        assert not path.exists()  # the last holder removes its file
    finally:
        os.kill(child, signal.SIGKILL)


# ---- the feature cache ------------------------------------------------------------------------


def feature_command(workspace: Path, vision: str, *extra: str, batch_size: int = 2) -> list[str]:
    return ["features", "--dataset", "coco", "--split", "train", "--workspace", str(workspace), "--vision", vision,
            "--vision-pretrained", "none", "--device", "cpu", "--batch-size", str(batch_size), "--workers", "0",
            "--shard-size", "2", *extra]


@pytest.mark.slow
def race(hook: str, hold: Path, command: list[str]):
    """Two copies of `command` started together, held at `hook`: one must stop at once (exit 2, one
    line, no traceback) instead of doing the same work; returns (winner, loser's stderr, outputs)."""
    processes = start_together(hook, hold, command, command)
    try:
        loser = first_exited(processes)
    finally:
        outputs = finish(processes, hold)
    assert loser is not None, outputs
    [winner] = [process for process in processes if process is not loser]
    _, loser_err = outputs[loser]
    assert loser.returncode == 2 and "Traceback" not in loser_err, loser_err
    return winner, loser_err, outputs


def test_a_second_features_run_on_the_same_split_stops_naming_the_first(catalogued, tmp_path):
    vision = save_vision_standin(tmp_path / "vision", seed=0)
    command = feature_command(catalogued, vision)
    winner, loser_err, outputs = race("ituning.backbones:VisionEncoder.forward", tmp_path / "hold", command)
    [line] = error_lines(loser_err)
    assert line.startswith(f"error: another process is building this split: PID {winner.pid} on "
                           f"{socket.gethostname()} since "), loser_err
    assert winner.returncode == 0, outputs[winner]
    verified = CliRunner().invoke(app, ["features", "verify", *command[1:13]])
    assert verified.exit_code == 0 and verified.output.endswith("ok\n"), verified.output


@pytest.mark.slow
def test_a_run_started_while_another_is_mid_shard_stops_and_leaves_its_work_alone(catalogued, tmp_path):
    vision = save_vision_standin(tmp_path / "vision", seed=0)
    command, hold = feature_command(catalogued, vision, batch_size=1), tmp_path / "hold"  # two batches a shard
    cache = split_cache_dir(catalogued, "coco", "train", BackboneSpec(vision, None), EncodeSettings(device="cpu"))
    forward = "ituning.backbones:VisionEncoder.forward"
    processes = start_together(forward, hold, command, pass_first=1)  # one batch written to its temporary file
    try:
        mid_shard = wait_until(lambda: list(hold.glob("*.working")) and list(cache.glob("shard-00000.h5.tmp-*")))
        if mid_shard:
            processes += start_together(forward, hold, command, pass_first=1)
            second_exited = wait_until(lambda: processes[1].poll() is not None)
    finally:
        outputs = finish(processes, hold)
    assert mid_shard, outputs
    first, second = processes
    assert first.returncode == 0, outputs[first]  # its temporary file was left alone
    assert second_exited and second.returncode == 2, outputs
    [line] = error_lines(outputs[second][1])
    assert line.startswith(f"error: another process is building this split: PID {first.pid} on "), line


@pytest.mark.slow
def test_parts_of_one_cache_are_built_side_by_side(catalogued, tmp_path):
    vision = save_vision_standin(tmp_path / "vision", seed=0)
    hold = tmp_path / "hold"
    processes = start_together("ituning.backbones:VisionEncoder.forward", hold,
                               feature_command(catalogued, vision, "--part", "0/2"),
                               feature_command(catalogued, vision, "--part", "1/2"))
    try:
        both_encoding = wait_until(lambda: len(list(hold.glob("*.working"))) == 2)  # each holding its shards
    finally:
        outputs = finish(processes, hold)
    assert both_encoding, outputs
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert "shards encoded [0, 2]" in outputs[processes[0]][0] and "shards encoded [1]" in outputs[processes[1]][0]
    verified = CliRunner().invoke(app, ["features", "verify", *feature_command(catalogued, vision)[1:13]])
    assert verified.exit_code == 0 and verified.output.endswith("ok\n"), verified.output


# ---- the catalog ------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_second_catalog_build_waits_then_stops_naming_the_first(downloaded, tmp_path):
    command = ["catalog", "build", "coco", "--workspace", str(downloaded), "--workers", "1"]
    winner, loser_err, outputs = race("pipeline.data:inspect_images", tmp_path / "hold", command)
    [line] = error_lines(loser_err)
    assert line.startswith(f"error: another process is building the catalog: PID {winner.pid} on "
                           f"{socket.gethostname()} since "), loser_err
    assert winner.returncode == 0 and "coco: " in outputs[winner][0], outputs[winner]
    with Catalog(catalog_path(downloaded), read_only=True) as catalog:
        assert len(catalog.usable_images("coco", "train")) == 6


@pytest.mark.slow
def test_a_second_catalog_build_given_time_runs_after_the_first(downloaded, tmp_path):
    hold = tmp_path / "hold"
    command = ["catalog", "build", "coco", "--workspace", str(downloaded), "--workers", "1", "--wait", "300"]
    processes = start_together("pipeline.data:inspect_images", hold, command, command)
    try:
        assert wait_until(lambda: list(hold.glob("*.working")))
        time.sleep(1.0)  # the other one is waiting for the build lock by now
        assert all(process.poll() is None for process in processes)
    finally:
        outputs = finish(processes, hold)
    assert [process.returncode for process in processes] == [0, 0], outputs
    assert len(list(hold.glob("*.working"))) == 2  # one after the other


@pytest.mark.slow
def test_reading_the_catalog_while_it_is_built_names_the_build(catalogued, tmp_path):
    hold = tmp_path / "hold"
    [builder] = start_together("pipeline.data:inspect_images", hold,
                               ["catalog", "build", "coco", "--workspace", str(catalogued), "--workers", "1"])
    reader = ["features", "verify", "--dataset", "coco", "--split", "train", "--workspace", str(catalogued)]
    try:
        assert wait_until(lambda: list(hold.glob("*.working")))  # the build has the catalog open
        refused = CliRunner().invoke(app, reader)
    finally:
        outputs = finish([builder], hold)
    assert refused.exit_code == 2 and isinstance(refused.exception, SystemExit), refused.output
    [line] = error_lines(refused.output)
    assert line.startswith(f"error: the catalog {catalog_path(catalogued)} is being built by another process: "
                           f"PID {builder.pid} on {socket.gethostname()} since "), refused.output
    assert builder.returncode == 0, outputs
    after = CliRunner().invoke(app, reader)
    assert after.exit_code == 1 and "no entry point" in after.output  # the catalog reads again; no cache yet


# ---- training stages --------------------------------------------------------------------------


def train_command(workspace: Path, config: Path, wait: float) -> list[str]:
    return ["train", "--config", str(config), "--workspace", str(workspace), "--device", "cpu", "--wait", f"{wait:g}"]


def start_logged(command: list[str], log: Path, python: bool = True) -> subprocess.Popen:
    """A process (a Python script's, unless python is False) whose stderr goes to `log`, read while it runs."""
    with log.open("w") as stderr:
        return subprocess.Popen([sys.executable, *command] if python else command, text=True,
                                stdout=subprocess.PIPE, stderr=stderr)


@pytest.mark.slow
def test_a_second_training_of_a_stage_waits_for_the_first_names_it_and_reuses_its_checkpoint(
        catalogued, standin_backbones, tmp_path, monkeypatch):
    """A holds the stage (held before its first step); B, allowed 1 s, stops naming A; C waits for A
    and takes over the moment A is killed (kill -9 leaves no stale lock); D waits for C, then reuses
    the checkpoint C trained instead of training again."""
    from tests.test_cli_training import write_config

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config, hold = write_config(tmp_path / "run.yaml", standin_backbones), tmp_path / "hold"
    hook, stage = "ituning.training:train_run", catalogued / "runs" / "cli" / "finetune"
    [holder_a] = start_together(hook, hold, train_command(catalogued, config, 0))
    logs = {name: tmp_path / f"{name}.err" for name in "CD"}
    try:
        assert wait_until(lambda: list(hold.glob(f"{holder_a.pid}.working"))), holder_a.stderr
        refused = subprocess.run([ITUNING, *train_command(catalogued, config, 1)],
                                 capture_output=True, text=True, timeout=START_TIMEOUT_S * 3)
        second = start_logged(["-c", held_cli(hook), str(hold), *train_command(catalogued, config, 600)], logs["C"])
        assert wait_until(lambda: f"waiting up to 600 s for PID {holder_a.pid} on " in logs["C"].read_text())
        holder_a.kill()
        assert wait_until(lambda: list(hold.glob(f"{second.pid}.working")))  # at once: no stale lock
        third = start_logged([ITUNING, *train_command(catalogued, config, 600)], logs["D"], python=False)
        assert wait_until(lambda: f"waiting up to 600 s for PID {second.pid} on " in logs["D"].read_text())
    finally:
        (hold / "go").touch()
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr
    assert f"training cli/finetune in {stage}: waiting up to 1 s for PID {holder_a.pid}" in refused.stderr
    [line] = error_lines(refused.stderr)
    assert line.startswith(f"error: training cli/finetune in {stage}: still held after 1 s by PID {holder_a.pid} "
                           f"on {socket.gethostname()} since "), line
    assert f"(ituning train --config {config} " in line, line  # what the holder runs
    assert second.wait(timeout=START_TIMEOUT_S * 3) == 0, logs["C"].read_text()
    trained = {path.name: path.stat().st_mtime_ns for path in stage.rglob("*") if path.is_file()}
    out, _ = third.communicate(timeout=START_TIMEOUT_S * 3)
    assert third.returncode == 0 and "finetune: modules at " in out, logs["D"].read_text()
    assert {path.name: path.stat().st_mtime_ns for path in stage.rglob("*") if path.is_file()} == trained
    assert not list(stage.parent.glob("*.lock"))  # the last holder removed its file
