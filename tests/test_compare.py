"""`ituning compare`: evaluation runs side by side, as a user reads them in the HTML page, on the
terminal and in MLflow."""

import base64
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.compare import (CompareError, EvaluatedRun, build_comparison, metrics_table, per_image_cider,
                              rank_by_difference, text_table)

ITUNING = Path(sys.executable).with_name("ituning")
REFERENCES = {
    "far": ["two red circles on a white background", "a picture of two red circles"],
    "near": ["a blue square next to a yellow triangle", "there is a blue square and a yellow triangle"],
    "same": ["three green triangles", "a picture of three green triangles"],
}


def evaluated(name: str, captions: dict, metrics: dict | None = None, dataset: str = "coco", preset=None):
    return EvaluatedRun(f"{name:0<32}", name, dataset, "test", metrics or {}, captions, preset)


# ---- the pure parts ------------------------------------------------------------------------------


def test_metrics_table_has_a_row_per_metric_and_marks_the_best_run():
    runs = [{"CIDEr": 0.9, "BLEU-4": 0.30, "CLIP-S": 0.71, "in-domain/CIDEr": 0.5, "overall/CIDEr": 0.6},
            {"CIDEr": 1.1, "BLEU-4": 0.30, "CLIP-S": 0.69, "in-domain/CIDEr": 0.7},
            {"CIDEr": 1.1, "BLEU-4": 0.30, "METEOR": 0.25}]
    table = metrics_table(runs, paper=[{"CIDEr": 1.167, "SPICE": 0.218}])
    assert [row.metric for row in table] == ["BLEU-4", "METEOR", "CIDEr", "SPICE", "CLIP-S", "overall/CIDEr",
                                             "in-domain/CIDEr"]
    rows = {row.metric: row for row in table}
    assert rows["CIDEr"].values == (0.9, 1.1, 1.1) and rows["CIDEr"].best == {1, 2}  # a tie marks both
    assert rows["CLIP-S"].values == (0.71, 0.69, None) and rows["CLIP-S"].best == {0}
    assert rows["BLEU-4"].best == set()  # all equal: nothing to point out
    assert rows["METEOR"].best == set() and rows["overall/CIDEr"].best == set()  # one run alone has it
    assert rows["in-domain/CIDEr"].best == {1}
    assert rows["CIDEr"].paper == (1.167,) and rows["SPICE"].values == (None, None, None)
    assert rows["SPICE"].paper == (0.218,) and rows["BLEU-4"].paper == (None,)


def test_images_are_ranked_by_how_far_apart_their_per_image_cider_is():

    from ituning.evaluation import score_captions

    first = {"far": "two red circles on a white background", "near": "a blue square next to a yellow circle",
             "same": "three green squares"}
    second = {"far": "a dog", "near": "a blue circle next to a red circle", "same": "three green squares"}
    per_image = per_image_cider([first, second], REFERENCES)
    ranked = rank_by_difference(per_image)
    assert [image_id for image_id, _ in ranked] == ["far", "near", "same"]
    assert ranked[2][1] == 0.0 and ranked[0][1] == per_image[0]["far"] - per_image[1]["far"] > 0
    for captions, scores in zip((first, second), per_image):  # per image, they average to the run's CIDEr
        assert sum(scores.values()) / len(scores) == pytest.approx(score_captions(captions, REFERENCES,
                                                                                  ["CIDEr"])["CIDEr"])


def test_ranking_spans_every_run_and_breaks_ties_by_image_id():
    per_image = [{"a": 0.1, "b": 0.5, "c": 0.2}, {"a": 0.9, "b": 0.5, "c": 0.2}, {"a": 0.3, "b": 0.1, "c": 0.2}]
    assert rank_by_difference(per_image) == [("a", pytest.approx(0.8)), ("b", pytest.approx(0.4)), ("c", 0.0)]
    assert rank_by_difference([{"y": 1.0, "x": 1.0}, {"y": 0.0, "x": 0.0}]) == [("x", 1.0), ("y", 1.0)]


def test_comparison_puts_the_largest_difference_first_and_adds_the_papers_column():
    first = evaluated("first", {"far": REFERENCES["far"][0], "same": "three green squares", "only": "a cat"},
                      {"CIDEr": 1.3}, preset="coco-gpt2")
    second = evaluated("second", {"far": "a dog", "same": "three green squares"}, {"CIDEr": 0.4}, preset="demo")
    comparison = build_comparison([first, second], REFERENCES, {}, limit=5)
    assert comparison.shared == 2 and [row.image_id for row in comparison.images] == ["far", "same"]
    assert comparison.images[0].captions == (REFERENCES["far"][0], "a dog")
    assert comparison.images[0].references == tuple(REFERENCES["far"])
    assert [(column.preset, column.task) for column in comparison.paper] == [("coco-gpt2", "coco/test")]
    table = text_table(comparison)
    assert re.search(r"^CIDEr\s+1\.3000\*\s+0\.4000\s+1\.1670$", table, re.MULTILINE), table
    assert len(build_comparison([first, second], REFERENCES, {}, limit=1).images) == 1


def test_columns_are_named_by_the_settings_that_differ_between_the_runs():
    from pipeline.compare_settings import column_names, run_settings

    def settings(preset, checkpoint, beams, **more):
        return run_settings({"checkpoint": checkpoint, "decoding.num_beams": beams, "decoding.max_length": "20",
                             **more}, preset)

    here, there = "/ws/runs/demo/finetune/best", "/ws/runs/coco-gpt2/finetune/best"
    ids = ["a" * 32, "b" * 32, "c" * 32]
    assert column_names([settings("demo", here, "5"), settings("coco-gpt2", there, "5")], ["x", "y"], ids) == \
        ["demo · demo/finetune/best", "coco-gpt2 · coco-gpt2/finetune/best"]
    assert column_names([settings("demo", here, "5"), settings("demo", here, "1", **{"decoding.rerank": "clip"})],
                        ["x", "y"], ids) == ["beams 5 · rerank –", "beams 1 (greedy) · rerank clip"]
    alike = [settings("demo", here, "5")] * 3  # nothing differs: the run name and id, as before
    assert column_names(alike, ["evaluate-coco-test aaaaaaaa", "evaluate-coco-test bbbbbbbb", "z"], ids) == \
        ["evaluate-coco-test aaaaaaaa", "evaluate-coco-test bbbbbbbb", "z"]


def test_runs_that_cannot_be_compared_are_refused():
    one = evaluated("one", {"far": "a dog"})
    with pytest.raises(CompareError, match="at least two evaluation runs"):
        build_comparison([one], REFERENCES, {})
    with pytest.raises(CompareError, match="share no images"):
        build_comparison([one, evaluated("two", {"near": "a dog"})], REFERENCES, {})
    with pytest.raises(CompareError, match="share no images"):  # the same id in another dataset is another image
        build_comparison([one, evaluated("two", {"far": "a dog"}, dataset="nocaps")], REFERENCES, {})


# ---- end to end: real runs in a real store, the installed command --------------------------------


def log_evaluation_run(workspace: Path, split: str, captions: dict, parent: str | None = None,
                       checkpoint: str = "checkpoints/elsewhere", beams: int = 5) -> str:
    """An evaluation run as pipeline.evaluation.evaluate logs one (its run name, params, scores,
    captions and gallery, through the same functions), with chosen captions in place of a
    captioner's: the stand-in captioner's captions of the tiny corpus all score 0, leaving nothing
    to rank, and captioning them takes most of a minute. METEOR is left out (its Java start takes
    seconds); the other metrics are scored as evaluate scores them."""
    from dataclasses import asdict

    from ituning.decoding import DecodingConfig
    from ituning.evaluation import score_captions
    from pipeline.data import open_catalog, split_images
    from pipeline.report import write_report
    from pipeline.tracking import ExperimentTracker
    from pipeline.training import child_run

    with open_catalog(workspace) as catalog:
        references = catalog.captions("coco", split)
    scores = score_captions(captions, references, ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "ROUGE-L", "CIDEr"])
    settings = {"checkpoint": checkpoint, "dataset": "coco", "split": split,
                "decoding": asdict(DecodingConfig(num_beams=beams)),
                "backbones": {"vision_model": "ViT-B-16", "vision_pretrained": "openai", "language_model": "gpt2"}}
    tracker = ExperimentTracker(workspace=workspace)
    with child_run(tracker, parent, f"evaluate-coco-{split}", f"evaluate-coco-{split}", settings) as run_id:
        report = write_report(workspace / "evaluations" / run_id, f"coco {split}", captions, scores, references,
                              dict(split_images(workspace, "coco", split)), None, 3)
        tracker.log_evaluation(run_id, f"coco_{split}", captions, scores, report.gallery, report.heatmaps)
    return run_id


@pytest.fixture(scope="module")
def evaluations(tmp_path_factory):
    """Two evaluations of the tiny corpus's coco/test by the same checkpoint of a pipeline run of the
    coco-gpt2 preset, with beam search (5 beams) and greedy, and one of coco/val on its own."""
    from pipeline import data
    from pipeline.tracking import ExperimentTracker

    with pytest.MonkeyPatch.context() as patch:
        patch.delenv("MLFLOW_TRACKING_URI", raising=False)
        workspace = tmp_path_factory.mktemp("workspace")
        manifests = data.write_demo_corpus(workspace, images=30, seed=1)
        data.download(workspace, "coco", manifests["coco"])
        data.build_catalog(workspace, ["coco"])
        with data.open_catalog(workspace) as catalog:
            references = catalog.captions("coco", "test")
            val_images = sorted(catalog.captions("coco", "val"))
        ids = sorted(references)
        assert len(ids) == 6
        first = {key: references[key][0] if index < 3 else "a small picture" for index, key in enumerate(ids)}
        second = {ids[0]: "a small picture", ids[1]: first[ids[1]], ids[2]: references[ids[2]][1],
                  ids[3]: references[ids[3]][0], ids[4]: references[ids[4]][2], ids[5]: "a small picture"}
        tracker = ExperimentTracker(workspace=workspace)
        parent = tracker.start_pipeline("full-pipeline-coco-gpt2", {"config": "coco-gpt2"})
        first_run = log_evaluation_run(workspace, "test", first, parent)
        second_run = log_evaluation_run(workspace, "test", second, parent, beams=1)
        tracker.finish(parent)
        val_run = log_evaluation_run(workspace, "val", {key: "a small picture" for key in val_images})
        yield {"workspace": workspace, "tracker": tracker, "parent": parent, "runs": [first_run, second_run],
               "val": val_run, "captions": [first, second], "references": references}


def ituning(*args, cwd: Path) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING")}
    return subprocess.run([ITUNING, *map(str, args)], capture_output=True, text=True, env=environment, cwd=cwd)


def invoke(*args):
    """The command in this process (as tests/test_bad_inputs.py runs commands), for the checks
    after the subprocess one: each new process spends seconds importing MLflow."""
    from typer.testing import CliRunner

    from cli.main import app

    return CliRunner().invoke(app, [str(arg) for arg in args])


def cider_apart(captions: list[dict], references: dict) -> dict[str, float]:
    """Per-image CIDEr differences straight from pycocoevalcap (the captions here are lowercase
    words without punctuation, which the PTB tokenizer leaves as they are)."""
    from pycocoevalcap.cider.cider import Cider

    image_ids = sorted(captions[0])
    scores = [Cider().compute_score({key: references[key] for key in image_ids},
                                    {key: [run[key]] for key in image_ids})[1] for run in captions]
    return {key: abs(scores[0][index] - scores[1][index]) for index, key in enumerate(image_ids)}


def metric_cells(page: str, metric: str) -> list[tuple[str, str]]:
    row = re.search(rf'<tr><th class="metric">{re.escape(metric)}</th>(.*?)</tr>', page).group(1)
    return re.findall(r'<td class="([^"]*)">([^<]*)</td>', row)


@pytest.mark.slow
def test_compare_writes_one_page_with_metrics_captions_and_thumbnails_and_logs_it(evaluations, tmp_path):
    workspace, tracker, runs = evaluations["workspace"], evaluations["tracker"], evaluations["runs"]
    out = tmp_path / "report.html"
    result = ituning("compare", *runs, "--workspace", workspace, "--out", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(out) and "logged to MLflow run" in lines[-1]
    page = out.read_text(encoding="utf-8")

    logged = [tracker.client.get_run(run_id).data.metrics for run_id in runs]
    for metric in ("BLEU-1", "BLEU-4", "ROUGE-L", "CIDEr"):
        values = [metrics[f"coco_test/{metric}"] for metrics in logged]
        cells = metric_cells(page, metric)
        assert [text for _, text in cells[:2]] == [f"{value:.4f}" for value in values]
        marked = [index for index, (css, _) in enumerate(cells[:2]) if "best" in css]
        assert marked == ([values.index(max(values))] if values[0] != values[1] else [])
        table_row = next(line for line in lines if line.startswith(f"{metric} "))
        assert table_row.split()[1:3] == [f"{value:.4f}" + ("*" if value == max(values) and values[0] != values[1]
                                                             else "") for value in values]
    assert metric_cells(page, "CIDEr")[2] == ("number paper", "1.1670")  # the coco-gpt2 run's preset
    assert "paper: coco-gpt2" in page and all(run_id in page for run_id in runs)
    # the columns are named by what differs between the runs, the decoding: not by their shared run name
    assert [f"<th>beams {beams}<br><code>{run_id}</code></th>" in page for beams, run_id in
            zip(("5", "1 (greedy)"), runs)] == [True, True] and "evaluate-coco-test" not in page
    assert re.search(r"^\s+beams 5\s+beams 1 \(greedy\)\s+paper coco-gpt2$", lines[1]), lines[1]
    assert re.search(r"^beams\s+5\s+1 \(greedy\)$", result.stdout, re.MULTILINE), result.stdout
    assert re.search(r"^max length\s+20\s+20$", result.stdout, re.MULTILINE), result.stdout
    assert '<tr class="setting differs"><th class="metric">beams</th><td>5</td><td>1 (greedy)</td>' in page
    assert '<tr class="setting"><th class="metric">max length</th><td>20</td><td>20</td>' in page
    assert '<tr class="setting"><th class="metric">checkpoint</th><td>checkpoints/elsewhere</td>' in page

    apart = cider_apart(evaluations["captions"], evaluations["references"])
    shown = re.findall(r'<tr class="image" id="image-([^"]+)">', page)
    assert shown == sorted(apart, key=lambda key: (-round(apart[key], 6), key))  # largest difference first
    assert apart[shown[-1]] == 0.0  # the image both runs captioned alike comes last
    for image_id in shown:
        row = re.search(rf'<tr class="image" id="image-{image_id}">(.*?)</tr>', page).group(1)
        assert f"difference {apart[image_id]:.4f}" in row
        for captions in evaluations["captions"]:
            assert f"<td>{captions[image_id]}<br>" in row or f'<td class="best">{captions[image_id]}<br>' in row
        assert all(f"<li>{text}</li>" in row for text in evaluations["references"][image_id])
    assert_thumbnails_embedded(page, len(shown))

    [compare_run] = tracker.client.search_runs([tracker.experiment_id], "tags.`ituning.step` = 'compare'")
    assert compare_run.data.tags["ituning.compared_runs"] == ",".join(runs)
    assert compare_run.info.status == "FINISHED" and compare_run.info.run_id in lines[-1]
    artifact = tracker.client.download_artifacts(compare_run.info.run_id, "compare/report.html", str(tmp_path / "down"))
    assert Path(artifact).read_text(encoding="utf-8") == page


def assert_thumbnails_embedded(page: str, images: int):
    sources = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(sources) == images
    for source in sources:
        assert source.startswith("data:image/jpeg;base64,")  # nothing the artifact viewer would have to fetch
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as thumbnail:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 160


@pytest.mark.slow
def test_compare_logs_to_a_given_run_or_not_at_all(evaluations, tmp_path, monkeypatch):
    workspace, tracker, runs = evaluations["workspace"], evaluations["tracker"], evaluations["runs"]
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    before = len(tracker.client.search_runs([tracker.experiment_id]))
    to_parent = invoke("compare", *runs, "--workspace", workspace, "--out", tmp_path / "a.html", "--images", "2",
                       "--log-to", evaluations["parent"])
    assert to_parent.exit_code == 0, to_parent.output
    listed = {item.path for item in tracker.client.list_artifacts(evaluations["parent"], "compare")}
    assert listed == {"compare/a.html"}
    assert (tmp_path / "a.html").read_text().count('<tr class="image"') == 2
    unlogged = invoke("compare", *runs, "--workspace", workspace, "--no-log")
    assert unlogged.exit_code == 0, unlogged.output
    default = workspace / "reports" / f"compare-{runs[0][:8]}-{runs[1][:8]}.html"
    assert unlogged.stdout.splitlines()[0] == str(default) and default.is_file()
    assert len(tracker.client.search_runs([tracker.experiment_id])) == before


def assert_one_error_line(result, message: str):
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith("error: ") and len(result.stderr.splitlines()) == 1, result.stderr
    assert message in result.stderr and "Traceback" not in result.output


@pytest.mark.slow
@pytest.mark.parametrize("arguments, message", [
    (lambda e: [e["runs"][0]], "give at least two evaluation runs to compare, not 1"),
    (lambda e: [e["runs"][0], "0" * 32], f"unknown run {'0' * 32}: no run with this id"),
    (lambda e: [e["runs"][0], "no-such-run"], "unknown run 'no-such-run': no run with this id or name"),
    (lambda e: [e["runs"][0], "evaluate-coco-test"], "2 runs are named 'evaluate-coco-test'; give a run id"),
    (lambda e: [e["runs"][0], "full-pipeline-coco-gpt2"], "(full-pipeline-coco-gpt2) is not an evaluation run"),
    (lambda e: [e["runs"][0], e["runs"][0]], "is given more than once"),
    (lambda e: [e["runs"][0], e["val"]], "the runs share no images"),
    (lambda e: [*e["runs"], "--log-to", "0" * 32], f"--log-to: unknown run {'0' * 32}"),
])
def test_runs_that_cannot_be_compared_end_the_command_with_one_error_line(evaluations, arguments, message,
                                                                         monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert_one_error_line(invoke("compare", *arguments(evaluations), "--workspace", evaluations["workspace"],
                                 *(["--no-log"] if "--log-to" not in arguments(evaluations) else [])), message)


def test_a_workspace_without_a_tracking_store_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = invoke("compare", "a" * 32, "b" * 32, "--workspace", tmp_path / "empty", "--no-log")
    assert_one_error_line(result, f"error: no MLflow store at {tmp_path / 'empty' / 'mlflow.db'}: pass the "
                                  "--workspace the runs were tracked in")
    assert not (tmp_path / "empty").exists()
