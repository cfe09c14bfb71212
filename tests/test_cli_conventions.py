"""The command line as a user starts it: the installed `ituning` script in a fresh process."""

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ITUNING = Path(sys.executable).with_name("ituning")
HEAVY = ("torch", "transformers", "open_clip", "mlflow", "prefect")
MODULES_AFTER = """
import json, sys
sys.argv = ["ituning", *json.loads(sys.argv[1])]
from cli.main import main
try:
    main()
except SystemExit:
    pass
print(json.dumps(sorted(sys.modules)), file=sys.stderr)
"""


def test_version_names_the_release():
    result = subprocess.run([ITUNING, "--version"], capture_output=True, text=True, check=True)
    assert result.stdout.startswith(f"ituning {version('ituning')}")
    as_module = subprocess.run([sys.executable, "-m", "cli", "--version"], capture_output=True, text=True, cwd=ROOT)
    assert as_module.stdout == result.stdout


def loaded_by(*args: str) -> set[str]:
    result = subprocess.run([sys.executable, "-c", MODULES_AFTER, json.dumps(args)], cwd=ROOT, capture_output=True,
                            text=True, check=True)
    return {name.split(".")[0] for name in json.loads(result.stderr.splitlines()[-1])}


@pytest.mark.parametrize("args", [("--help",), ("--version",), ("catalog", "query", "--help"), ("train", "--help")])
def test_help_and_version_load_no_heavy_library(args):
    assert loaded_by(*args) & set(HEAVY) == set()


def test_a_catalog_query_loads_duckdb_and_nothing_heavy(tmp_path):
    from storage.catalog import Catalog

    Catalog(tmp_path / "catalog.duckdb").close()
    loaded = loaded_by("catalog", "query", "SELECT count(*) FROM images", "--workspace", str(tmp_path))
    assert "duckdb" in loaded and loaded & set(HEAVY) == set()


def ituning(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING")}
    return subprocess.run([ITUNING, *args], capture_output=True, text=True, env={**environment, **(env or {})},
                          cwd=ROOT)


@pytest.fixture
def shape_file(tmp_path):
    from tests.scene_images import shape_image

    (tmp_path / "served").mkdir()
    path = tmp_path / "served" / "red circle.png"
    shape_image("red", "circle").save(path)
    return path


def test_caption_takes_an_image_url_as_it_takes_a_file(standin_checkpoint, shape_file):
    from tests.corpus_server import CorpusServer

    common = ["--checkpoint", str(standin_checkpoint), "--beams", "2", "--max-length", "6", "--device", "cpu"]
    from_file = ituning("caption", str(shape_file), *common)
    assert from_file.returncode == 0, from_file.stderr
    with CorpusServer(shape_file.parent) as server:
        url, missing = f"{server.url}/red%20circle.png", f"{server.url}/nothing.jpg"
        result = ituning("caption", url, missing, *common)
    assert result.returncode == 1
    assert result.stdout == from_file.stdout.replace(str(shape_file), url)
    assert result.stderr.strip().splitlines()[-1] == f"error: {missing}: HTTP 404 Not Found"


def test_caption_takes_a_registered_model_as_it_takes_its_checkpoint(standin_checkpoint, shape_file, tmp_path):
    from pipeline import registry
    from pipeline.tracking import ExperimentTracker

    workspace = tmp_path / "ws"
    tracker = ExperimentTracker(workspace=workspace)
    with tracker.pipeline_run("caption") as parent, tracker.step_run(parent, "finetune", stage="finetune") as run_id:
        model = registry.register_captioner(workspace, str(standin_checkpoint), run_id)
    registry.promote_if_better(model["name"], model["version"], value=1.0, workspace=workspace)
    common = ["--beams", "2", "--max-length", "6", "--device", "cpu"]
    from_checkpoint = ituning("caption", str(shape_file), "--checkpoint", str(standin_checkpoint), *common)
    result = ituning("caption", str(shape_file), "--model", "models:/ituning-captioner@champion", "--workspace",
                     str(workspace), *common)
    assert (result.returncode, result.stdout) == (0, from_checkpoint.stdout), result.stderr
    unknown = ituning("caption", str(shape_file), "--model", "models:/ituning-captioner@nobody",
                      "--workspace", str(workspace), *common)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: ") and "nobody" in unknown.stderr
    neither = ituning("caption", str(shape_file), *common)
    assert neither.returncode == 2 and "either --checkpoint FOLDER or --model URI" in neither.stderr


def test_pipeline_takes_the_flows_parameters_and_its_schema_checks_them(tmp_path):
    help_text = ituning("pipeline", "--help").stdout
    assert all(option in help_text for option in ("--evaluate-on", "--shard-size", "--gallery-size", "--backbone-steps"))
    too_small = ituning("pipeline", "--shard-size", "0", "--workspace", str(tmp_path / "ws"))
    assert too_small.returncode == 2 and "--shard-size" in too_small.stderr


@pytest.mark.slow
def test_pipeline_refuses_a_split_the_flow_cannot_evaluate_on(tmp_path):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("PREFECT_")}
    result = subprocess.run([ITUNING, "pipeline", "--evaluate-on", "coco/train", "--workspace", str(tmp_path / "ws")],
                            capture_output=True, text=True, env=environment, cwd=tmp_path)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert any(line.startswith("error: ") and "evaluate_on" in line for line in result.stderr.splitlines()), \
        result.stderr
