"""Where a dataset comes from besides the built-in downloads: the workspace's earlier verified
download (reused, not fetched again from the built-in URLs) and a local corpus used in place."""

import json
import shutil

import pytest

from pipeline import data
from storage.acquire import RECORDED_MANIFEST, choose_manifest
from storage.catalog import Catalog
from storage.datasets import built_in_manifest
from storage.synthetic import write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), images=20, seed=2)


@pytest.fixture
def downloaded(corpus, tmp_path):
    workspace = tmp_path / "workspace"
    report = data.download(workspace, "coco", str(corpus.manifests["coco"]))
    assert report["fetched"] and not report["failures"]
    return workspace


def test_a_verified_download_is_reused_when_no_manifest_is_given(corpus, downloaded):
    recorded = json.loads((downloaded / "downloads" / "coco" / RECORDED_MANIFEST).read_text())
    assert recorded == json.loads(corpus.manifests["coco"].read_text()) | {"image_lists": []}
    chosen = choose_manifest(downloaded, "coco")
    assert [item.url for item in chosen.files] == [item["url"] for item in recorded["files"]]
    # The built-in URLs cannot be reached from here: reuse is what lets this finish.
    again = data.download(downloaded, "coco")
    assert again["fetched"] == [item["name"] for item in recorded["files"]] and not again["failures"]


def test_a_download_no_longer_verified_is_not_reused(downloaded):
    first = json.loads((downloaded / "downloads" / "coco" / RECORDED_MANIFEST).read_text())["files"][0]["name"]
    (downloaded / "downloads" / "coco" / first).unlink()
    assert choose_manifest(downloaded, "coco") == built_in_manifest("coco")


def test_a_given_manifest_wins_over_the_recorded_one(corpus, downloaded):
    with pytest.raises(ValueError, match="describes 'nocaps', not 'coco'"):
        choose_manifest(downloaded, "coco", corpus.manifests["nocaps"])


def test_a_local_corpus_is_used_in_place_and_catalogued(downloaded, tmp_path):
    """A folder in the Karpathy layout (dataset_coco.json, images at <filepath>/<filename>), as a user
    with their own data set has it."""
    folder = tmp_path / "my-corpus"
    shutil.copytree(downloaded / "data" / "coco", folder)
    workspace = tmp_path / "other"
    report = data.use_local_corpus(workspace, "coco", str(folder))
    assert report["corpus"] == str(folder.resolve()) and (workspace / "data" / "coco").resolve() == folder.resolve()
    summaries = data.build_catalog(workspace, ["coco"])
    expected = data.build_catalog(downloaded, ["coco"])
    assert summaries["coco"]["by_split"] == expected["coco"]["by_split"] and summaries["coco"]["usable"] > 0
    with Catalog(workspace / "catalog.duckdb", read_only=True) as catalog:
        assert all(str(image.path).startswith(str(workspace / "data" / "coco")) or
                   image.path.resolve().is_relative_to(folder.resolve())
                   for image in catalog.usable_images("coco", "train"))
    assert data.use_local_corpus(workspace, "coco", str(folder))["digest"] == report["digest"]
    (folder / "dataset_coco.json").write_text((folder / "dataset_coco.json").read_text() + " ")
    assert data.use_local_corpus(workspace, "coco", str(folder))["digest"] != report["digest"]


def test_a_local_corpus_never_replaces_downloaded_files(downloaded, tmp_path):
    with pytest.raises(FileExistsError, match="already holds downloaded files"):
        data.use_local_corpus(downloaded, "coco", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        data.use_local_corpus(tmp_path / "ws", "coco", str(tmp_path / "nowhere"))


@pytest.mark.slow
def test_a_failed_download_ends_the_pipeline_command_with_one_clear_line(tmp_path):
    """`ituning pipeline --source download` as a user runs it, with a manifest whose file is not on
    the (loopback) server: the error names the file and the URL and says what to do; no traceback."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.corpus_server import CorpusServer

    (tmp_path / "served").mkdir()
    with CorpusServer(tmp_path / "served") as server:
        url = f"{server.url}/train2014.zip"
        manifest = tmp_path / "coco.json"
        manifest.write_text(json.dumps({"dataset": "coco", "files": [{"name": "train2014.zip", "url": url}]}))
        environment = {key: value for key, value in os.environ.items()
                       if not key.startswith(("PREFECT_", "MLFLOW_TRACKING_URI"))}
        command = [str(Path(sys.executable).with_name("ituning")), "pipeline", "--source", "download",
                   "--manifest", f"coco={manifest}", "--workspace", str(tmp_path / "ws")]
        result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [f"error: train2014.zip: HTTP 404 from {url} (not retried); correct the URL, or give a "
                      f"manifest naming a mirror or a local copy"], result.stderr
    assert len(result.stderr.strip().splitlines()) <= 6, result.stderr


def test_the_catalog_tells_the_synthetic_corpus_from_the_dataset_whichever_way_it_came(corpus, downloaded, tmp_path):
    """Downloaded from its (synthetic) manifest, or used in place by its own marked files: synthetic.
    The same files without the marks, as a real dataset's are: not synthetic."""
    data.build_catalog(downloaded, ["coco"])
    folder = tmp_path / "my-corpus"
    shutil.copytree(downloaded / "data" / "coco", folder)
    data.use_local_corpus(tmp_path / "in-place", "coco", str(folder))
    data.build_catalog(tmp_path / "in-place", ["coco"])
    assert data.is_synthetic(tmp_path / "in-place", "coco")  # no manifest there: the file's own mark
    karpathy = folder / "dataset_coco.json"
    unmarked = {key: value for key, value in json.loads(karpathy.read_text()).items() if key != "synthetic"}
    karpathy.write_text(json.dumps(unmarked))
    data.build_catalog(tmp_path / "in-place", ["coco"])
    assert [data.is_synthetic(downloaded, "coco"), data.is_synthetic(tmp_path / "in-place", "coco")] == [True, False]
    with Catalog(downloaded / "catalog.duckdb", read_only=True) as catalog:
        assert catalog.query("SELECT dataset, synthetic FROM builds")[1] == [("coco", True)]


def test_a_manifests_synthetic_mark_must_be_true_or_false(corpus, tmp_path):
    from storage.manifests import ManifestError, load_manifest

    raw = json.loads(corpus.manifests["vg"].read_text())
    assert raw["synthetic"] is True and load_manifest(corpus.manifests["vg"]).synthetic
    (tmp_path / "m.json").write_text(json.dumps({**raw, "synthetic": "yes"}))
    with pytest.raises(ManifestError, match="field synthetic must be true or false, not 'yes'"):
        load_manifest(tmp_path / "m.json")
