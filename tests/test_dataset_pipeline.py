"""The real path, offline: synthetic corpus served over HTTP -> download -> unpack -> split -> catalog."""

import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import duckdb
import pytest
from typer.testing import CliRunner

from cli.main import app
from storage.acquire import download_dataset
from storage.catalog import Catalog
from pipeline.data import build_dataset
from storage.catalog_build import BUILD_ORDER
from storage.downloads import RetryPolicy
from storage.extract import UnsafeArchive
from storage.manifests import Manifest, RemoteFile, load_manifest
from storage.synthetic import UNUSABLE, write_corpus
from tests.corpus_server import CorpusServer

QUICK = RetryPolicy(attempts=4, first_wait_s=0.01, max_wait_s=0.05)
IMAGES = 30
REAL_NOCAPS_TEST_INFO = Path(__file__).parent / "data" / "nocaps" / "nocaps_test_image_info.excerpt.json"


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    served = tmp_path_factory.mktemp("served")
    root = tmp_path_factory.mktemp("workspace")
    with CorpusServer(served) as server:
        corpus = write_corpus(served, IMAGES, base_url=server.url, seed=3)
        server.faults["coco/val2014.zip"] = ["cut:20000"]
        server.faults["vg/images.zip"] = ["corrupt"]
        server.faults[f"nocaps/test/{_first_nocaps_file(served)}"] = ["500"]
        reports = {name: download_dataset(load_manifest(corpus.manifests[name]), root, QUICK, concurrency=4)
                   for name in BUILD_ORDER}
        with Catalog(root / "catalog.duckdb") as catalog:
            summaries = {name: build_dataset(root, name, catalog, workers=1) for name in BUILD_ORDER}
        yield corpus, root, server, reports, summaries


def _first_nocaps_file(served: Path) -> str:
    return json.loads((served / "nocaps/nocaps_test_image_info.json").read_text())["images"][0]["file_name"]


def test_interrupted_and_corrupted_downloads_recover(pipeline):
    corpus, root, server, reports, _ = pipeline
    val_zip = (corpus.root / "coco/val2014.zip").stat().st_size
    assert server.bytes_sent["coco/val2014.zip"] - val_zip < val_zip // 10
    assert ("coco/val2014.zip", "bytes=20000-") in server.requests
    assert server.bytes_sent["vg/images.zip"] == 2 * (corpus.root / "vg/images.zip").stat().st_size
    assert (root / "downloads/vg/images.zip").read_bytes() == (corpus.root / "vg/images.zip").read_bytes()
    assert reports["nocaps"].images == 2 * IMAGES and not reports["nocaps"].failures


def test_counts_per_split_match_the_karpathy_files(pipeline):
    corpus, root, _, _, summaries = pipeline
    unusable = {image_id for image_id, defect in corpus.defects.items() if defect in UNUSABLE}
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        for dataset in ("coco", "flickr30k", "flickr8k", "nocaps"):
            for split, ids in corpus.splits[dataset].items():
                usable = [image.image_id for image in catalog.usable_images(dataset, split)]
                assert usable == sorted(set(ids) - unusable), (dataset, split)
                if (dataset, split) == ("nocaps", "test"):  # its references are private
                    assert catalog.captions(dataset, split) == {}
                    continue
                captions = catalog.captions(dataset, split)
                assert set(captions) == set(usable)
                assert {len(texts) for texts in captions.values()} == {10 if dataset == "nocaps" else 5}
        assert sum(summaries["coco"].by_split.values()) == IMAGES - len(unusable)


def test_bad_images_are_recorded_with_reasons(pipeline):
    corpus, root, _, _, _ = pipeline
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        _, rows = catalog.query("SELECT image_id, status, reason FROM images WHERE dataset = 'coco'")
    by_id = {image_id: (status, reason) for image_id, status, reason in rows}
    expected = {"truncated": ("unreadable", "truncated"), "not-an-image": ("unreadable", "not an image"),
                "missing": ("missing", "no such file"), "grayscale": ("ok", "L image converted to RGB"),
                "cmyk": ("ok", "CMYK image converted to RGB"), "png-named-jpg": ("ok", "PNG content in a .jpg file")}
    for image_id, defect in corpus.defects.items():
        status, reason = by_id[image_id]
        assert status == expected[defect][0] and expected[defect][1] in reason, (defect, status, reason)
    assert sum(status != "ok" for status, _ in by_id.values()) == 3


def test_visual_genome_excludes_coco_val_and_test_images(pipeline):
    corpus, root, _, _, summaries = pipeline
    assert summaries["vg"].excluded == len(corpus.vg_held_out) == 4
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        usable = {image.image_id for image in catalog.usable_images("vg", "pretrain")}
        phrases = catalog.captions("vg", "pretrain")
        _, rows = catalog.query("SELECT excluded FROM builds WHERE dataset = 'vg'")
    assert usable == set(corpus.splits["vg"]["pretrain"]) - set(corpus.vg_held_out)
    assert set(phrases) == usable and all(len(texts) == 3 for texts in phrases.values())
    assert rows == [(4,)]


def test_nocaps_images_carry_their_domain(pipeline):
    corpus, root, _, _, _ = pipeline
    for split in ("val", "test"):  # as in the real files, the image info names no domain
        info = json.loads((corpus.root / "nocaps" / f"nocaps_{split}_image_info.json").read_text())
        assert not any("domain" in image for image in info["images"])
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        images = catalog.usable_images("nocaps", "val")
        test_domains = {image.domain for image in catalog.usable_images("nocaps", "test")}
    assert {image.domain for image in images} == {"in-domain", "near-domain", "out-domain"}
    assert all(image.path.is_file() and image.width == 64 for image in images)
    assert test_domains == {None}


@pytest.mark.parametrize("val_domains", [True, False])
def test_real_nocaps_image_info_builds_the_catalog(tmp_path, val_domains):
    """The verbatim head of the real nocaps_test_image_info.json, and val image info in the same
    layout whose domains come, if at all, with the images of the val captions file."""
    folder = tmp_path / "data" / "nocaps"
    folder.mkdir(parents=True)
    shutil.copy(REAL_NOCAPS_TEST_INFO, folder / "nocaps_test_image_info.json")
    real = json.loads(REAL_NOCAPS_TEST_INFO.read_text())
    val_images = [{**image, "id": number, "coco_url": image["coco_url"].replace("/test/", "/val/")}
                  for number, image in enumerate(real["images"][:3])]
    (folder / "nocaps_val_image_info.json").write_text(json.dumps({**real, "images": val_images}))
    domains = ["in-domain", "near-domain", "out-domain"] if val_domains else [None] * 3
    captions = {**real, "images": [{**image, "domain": domain} if domain else image
                                   for image, domain in zip(val_images, domains)],
                "annotations": [{"image_id": i, "id": 10 * i + k, "caption": f"caption {k} of image {i} "}
                                for i in range(3) for k in range(2)]}
    (folder / "nocaps_val_4500_captions.json").write_text(json.dumps(captions))
    result = CliRunner().invoke(app, ["catalog", "build", "nocaps", "--workspace", str(tmp_path), "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert "nocaps: 8 images (0 usable: val 0, test 0), 6 captions" in result.output
    with Catalog(tmp_path / "catalog.duckdb", read_only=True) as catalog:
        _, rows = catalog.query("SELECT split, image_id, domain, path, width, status FROM images "
                                "ORDER BY split, image_id")
        _, texts = catalog.query("SELECT DISTINCT text FROM captions WHERE image_id = '2' ORDER BY text")
    assert [row[:3] for row in rows] == [("test", str(i), None) for i in range(4500, 4505)] + \
        [("val", str(i), domain) for i, domain in enumerate(domains)]
    # stored relative to the workspace, so that a copied or moved workspace keeps its catalog
    assert rows[0][3:] == ("data/nocaps/test/0003d84e0165d630.jpg", 1024, "missing")
    assert texts == [("caption 0 of image 2",), ("caption 1 of image 2",)]


def test_catalog_records_verified_downloads_and_fingerprints_image_lists(pipeline):
    _, root, _, _, _ = pipeline
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        _, rows = catalog.query("SELECT name, bytes, checksum FROM downloads WHERE dataset = 'coco' ORDER BY name")
        fingerprint = catalog.image_list_fingerprint("coco", "test")
        assert fingerprint == catalog.image_list_fingerprint("coco", "test") != catalog.image_list_fingerprint("coco", "val")
    assert [name for name, _, _ in rows] == ["annotations_trainval2014.zip", "caption_datasets.zip",
                                              "train2014.zip", "val2014.zip"]
    assert all(checksum.startswith("md5:") for _, _, checksum in rows)


def test_readme_queries_run_on_the_catalog(pipeline):
    _, root, _, _, _ = pipeline
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("```sql\n", 1)[1].split("```", 1)[0]
    statements = [s.strip() for s in block.split(";") if s.strip()]
    assert len(statements) >= 3
    with Catalog(root / "catalog.duckdb", read_only=True) as catalog:
        results = [catalog.query(statement)[1] for statement in statements]
    assert all(results)  # every query finds rows in the synthetic catalog


def test_catalog_build_skips_what_was_not_downloaded_unless_named(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["catalog", "build", "--workspace", str(tmp_path)])
    assert result.exit_code == 0 and "coco: skipped (coco: no dataset_coco.json" in result.output
    result = runner.invoke(app, ["catalog", "build", "nocaps", "--workspace", str(tmp_path)])
    assert result.exit_code == 2 and "run `ituning download nocaps` first" in result.output


def test_catalog_query_command_is_read_only(pipeline):
    _, root, _, _, _ = pipeline
    runner = CliRunner()
    result = runner.invoke(app, ["catalog", "query", "--workspace", str(root),
                                 "SELECT split, count(*) AS n FROM images WHERE dataset = 'flickr30k' GROUP BY split ORDER BY split"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0] == "split\tn" and len(result.output.splitlines()) == 4
    result = runner.invoke(app, ["catalog", "query", "--workspace", str(root), "DELETE FROM images"])
    assert result.exit_code == 2 and "read-only" in result.output
    duckdb_cli = Path(sys.executable).parent / "duckdb"
    output = subprocess.run([str(duckdb_cli), "-readonly", "-csv", str(root / "catalog.duckdb"),
                             "-c", "SELECT count(*) FROM images WHERE dataset = 'coco'"],
                            capture_output=True, text=True, check=True).stdout
    assert output.split() == ["count_star()", str(IMAGES)]


def test_second_download_run_fetches_nothing(pipeline):
    corpus, root, server, _, _ = pipeline
    before = len(server.requests)
    with CorpusServer(corpus.root) as fresh:  # a server on another port: a refetch would fail
        report = download_dataset(load_manifest(corpus.manifests["coco"]), root, QUICK)
        assert fresh.requests == []
    assert len(report.fetched) == 4 and report.unpacked == [] and len(server.requests) == before


def test_archive_with_parent_entry_is_refused(tmp_path):
    evil = tmp_path / "served" / "evil.zip"
    evil.parent.mkdir()
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("train2014/ok.jpg", b"x")
        archive.writestr("../outside.txt", b"x")
    with CorpusServer(evil.parent) as server:
        manifest = Manifest("coco", (RemoteFile("evil.zip", f"{server.url}/evil.zip"),))
        with pytest.raises(UnsafeArchive, match="evil.zip: entry '../outside.txt' would be written outside"):
            download_dataset(manifest, tmp_path / "ws", QUICK)
    assert not (tmp_path / "ws" / "data" / "outside.txt").exists()
    assert not (tmp_path / "ws" / "data" / "coco" / "train2014").exists()


def test_missing_nocaps_image_is_reported_and_the_rest_fetched(tmp_path):
    corpus = write_corpus(tmp_path / "served", 15, seed=1)
    info = corpus.root / "nocaps" / "nocaps_val_image_info.json"
    (corpus.root / "nocaps" / "val" / json.loads(info.read_text())["images"][0]["file_name"]).unlink()
    report = download_dataset(load_manifest(corpus.manifests["nocaps"]), tmp_path / "ws", QUICK)
    assert report.images == 29 and len(report.failures) == 1 and "no such file" in report.failures[0]


def test_cli_runs_synthetic_download_and_build(tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["synthetic", "--out", str(tmp_path / "corpus"), "--images", "15"])
    assert result.exit_code == 0, result.output
    workspace = ["--workspace", str(tmp_path / "ws")]
    for line in result.output.splitlines():
        download = runner.invoke(app, line.split()[1:] + workspace + ["--no-progress"])
        assert download.exit_code == 0, download.output
    build = runner.invoke(app, ["catalog", "build", *workspace, "--workers", "1"])
    assert build.exit_code == 0, build.output
    assert "vg: 15 images (11 usable: pretrain 11), 33 captions, 4 excluded" in build.output
    assert duckdb.connect(str(tmp_path / "ws" / "catalog.duckdb"), read_only=True).execute(
        "SELECT count(*) FROM images").fetchone() == (15 * (len(BUILD_ORDER) + 1),)  # NoCaps: val and test


def test_flickr30k_images_from_a_local_archive(tmp_path):
    corpus = write_corpus(tmp_path / "served", 15, seed=2)
    captions_only = tmp_path / "flickr30k.json"
    manifest = json.loads(corpus.manifests["flickr30k"].read_text())
    manifest["files"] = [entry for entry in manifest["files"] if entry["name"] == "caption_datasets.zip"]
    captions_only.write_text(json.dumps(manifest))
    workspace = ["--workspace", str(tmp_path / "ws")]
    runner = CliRunner()
    result = runner.invoke(app, ["download", "flickr30k", "--manifest", str(captions_only), "--no-progress",
                                 "--images", str(corpus.root / "flickr30k" / "flickr30k-images.zip"), *workspace])
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["catalog", "build", "flickr30k", *workspace])
    assert "flickr30k: 15 images (15 usable: train 10, val 3, test 2)" in result.output, result.output


def test_image_list_names_cannot_leave_the_data_folder(tmp_path):
    corpus = write_corpus(tmp_path / "served", 15, seed=1)
    info = corpus.root / "nocaps" / "nocaps_val_image_info.json"
    content = json.loads(info.read_text())
    content["images"][3]["file_name"] = "../../escape.jpg"
    info.write_text(json.dumps(content))
    manifest = load_manifest(corpus.manifests["nocaps"])
    manifest = Manifest("nocaps", tuple(RemoteFile(f.name, f.url) for f in manifest.files), manifest.image_lists)
    with pytest.raises(UnsafeArchive, match="entry '../../escape.jpg' would be written outside"):
        download_dataset(manifest, tmp_path / "ws", QUICK)
