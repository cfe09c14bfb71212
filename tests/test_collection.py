"""caption-collection: a folder, a Parquet URL list and WebDataset tars (local and served from
127.0.0.1) captioned into Parquet shards, read back through DuckDB: every image exactly once, with
its status. The captioner is the session's stand-in checkpoint; the CLIP, the stand-in CLIP."""

import io
import json
import os
import shutil
import signal
import subprocess
import tarfile
import time
from pathlib import Path

import duckdb
import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.collection_fetch import FetchSettings, fetch_all
from storage.collection_sources import CollectionSourceError, list_collection, tar_samples
from storage.downloads import RetryPolicy
from tests.corpus_server import CorpusServer
from tests.harness import BIN, ROOT
from tests.scene_images import shape_image
from tests.test_captioner_model import png_claiming

QUICK = RetryPolicy(attempts=3, first_wait_s=0.01, max_wait_s=0.05)
COLOURS, SHAPES = ("red", "blue", "green"), ("circle", "square", "triangle")
FAST_DECODING = ["--beams", "3", "--max-length", "5", "--device", "cpu", "--workers", "1"]


def jpeg(number: int) -> bytes:
    buffer = io.BytesIO()
    shape_image(COLOURS[number % 3], SHAPES[number // 3 % 3], size=64).save(buffer, "JPEG")
    return buffer.getvalue()


def photo_folder(folder: Path, images: int) -> dict[str, str]:
    """`images` good photos (some in a subfolder, one PNG named .dat) and four bad files; {key: expected status}."""
    (folder / "trip").mkdir(parents=True)
    expected = {}
    for number in range(images):
        key = f"trip/{number:04d}.jpg" if number % 2 else f"{number:04d}.jpg"
        (folder / key).write_bytes(jpeg(number))
        expected[key] = "ok"
    shape_image("red", "circle", size=64).save(folder / "scan.dat", "PNG")  # an image by content, not by name
    (folder / "cut.jpg").write_bytes(jpeg(0)[:300])  # a truncated JPEG: its header reads, its pixels do not
    (folder / "noise.jpg").write_bytes(os.urandom(2000))  # named like an image, not one
    (folder / "bomb.png").write_bytes(png_claiming(30_000, 30_000))  # 900 million pixels claimed
    (folder / "notes.txt").write_text("not an image, not listed")
    expected.update({"scan.dat": "ok", "cut.jpg": "unreadable", "noise.jpg": "unreadable", "bomb.png": "too-large"})
    return expected


def webdataset_tar(path: Path, first: int, samples: int) -> dict[str, str]:
    """A tar as img2dataset writes it (KEY.jpg, KEY.json, KEY.txt), plus a sample without an image and a
    decompression bomb; {key: expected status}."""
    expected = {}
    with tarfile.open(path, "w") as archive:
        def add(name: str, data: bytes):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))

        for number in range(first, first + samples):
            key = f"{number:09d}"
            add(f"{key}.jpg", jpeg(number))
            add(f"{key}.json", json.dumps({"key": key, "caption": f"photo {number}", "status": "success"}).encode())
            add(f"{key}.txt", f"photo {number}".encode())
            expected[key] = "ok"
        add(f"{first + samples:09d}.json", b'{"status": "failed_to_download"}')
        add(f"{first + samples + 1:09d}.png", png_claiming(30_000, 30_000))
    expected.update({f"{first + samples:09d}": "missing", f"{first + samples + 1:09d}": "too-large"})
    return expected


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Images, a tar and a Parquet URL list (img2dataset's columns) served from 127.0.0.1."""
    folder = tmp_path_factory.mktemp("served")
    for number in range(4):
        (folder / f"{number}.jpg").write_bytes(jpeg(number))
    (folder / "bomb.png").write_bytes(png_claiming(30_000, 30_000))
    (folder / "big.jpg").write_bytes(jpeg(0) + bytes(20_000))  # over a 10 kB limit
    tar_expected = webdataset_tar(folder / "00000.tar", 0, 5)
    with CorpusServer(folder) as server:
        urls = {"a": ("0.jpg", "ok"), "b": ("1.jpg", "ok"), "c": ("2.jpg", "ok"), "flaky": ("3.jpg", "ok"),
                "dead": ("gone.jpg", "fetch-failed"), "bomb": ("bomb.png", "too-large"),
                "big": ("big.jpg", "too-large")}
        table = pa.table({"url": [f"{server.url}/{name}" for name, _ in urls.values()], "key": list(urls),
                          "caption": [f"alt text {key}" for key in urls]})
        pq.write_table(table, folder / "urls.parquet")
        yield {"server": server, "folder": folder, "tar_expected": tar_expected,
               "url_expected": {key: status for key, (_, status) in urls.items()}}


def rows_of(out: Path, query: str = "SELECT key, status, reason, caption FROM '{out}/*.parquet'") -> list[tuple]:
    with duckdb.connect() as connection:
        return connection.execute(query.format(out=out)).fetchall()


def check_every_image_once(out: Path, expected: dict[str, str]) -> None:
    rows = rows_of(out)
    assert sorted(key for key, *_ in rows) == sorted(expected)  # each key once
    assert {key: status for key, status, *_ in rows} == expected
    for key, status, reason, caption in rows:
        assert (caption is not None) == (status == "ok") and (reason is None) == (status == "ok"), (key, reason)


# ---- listing, without a model ----------------------------------------------------------------------


def test_sources_are_listed_by_content_and_cut_into_shards(tmp_path, served):
    expected = photo_folder(tmp_path / "photos", 5)
    folder = list_collection(str(tmp_path / "photos"), shard_size=3)
    assert [len(shard.items) for shard in folder.shards] == [3, 3, 3]
    assert sorted(item.key for shard in folder.shards for item in shard.items) == sorted(expected)
    listed = list_collection(str(served["folder"] / "urls.parquet"), shard_size=4)
    assert [item.key for item in listed.shards[0].items] == ["a", "b", "c", "flaky"]
    assert listed.shards[0].items[0].given_caption == "alt text a"
    (tmp_path / "list.csv").write_text("path,caption\nphotos/0000.jpg,a red circle\n")
    [item] = list_collection(str(tmp_path / "list.csv")).shards[0].items
    assert (item.key, item.source) == ("000000000", str(tmp_path / "photos" / "0000.jpg"))
    for name in ("00000.tar", "00001.tar"):
        shutil.copy(served["folder"] / "00000.tar", tmp_path / name)
    tars = list_collection(str(tmp_path / "{00000..00001}.tar"))
    assert [shard.tar for shard in tars.shards] == [str(tmp_path / "00000.tar"), str(tmp_path / "00001.tar")]
    assert tars.fingerprint() != folder.fingerprint()
    with pytest.raises(CollectionSourceError, match="no such tar shard"):
        list_collection(str(tmp_path / "{00000..00002}.tar"))
    with open(tmp_path / "00001.tar", "rb") as file:
        samples = list(tar_samples(file, max_image_bytes=10_000))
    assert [(s.key, s.given_caption, s.image is not None, s.too_large) for s in samples][-3:] == [
        ("000000004", "photo 4", True, False), ("000000005", None, False, False), ("000000006", None, True, False)]
    with open(tmp_path / "00001.tar", "rb") as file:
        assert [s.too_large for s in tar_samples(file, max_image_bytes=200)] == [True] * 5 + [False, False]


def test_urls_are_fetched_from_public_hosts_only_with_retries_and_a_size_limit(tmp_path, served):
    server = served["server"]
    server.faults["3.jpg"] = ["500", "500"]  # transient: fetched on the third try
    urls = {name: f"{server.url}/{name}" for name in ("0.jpg", "3.jpg", "gone.jpg", "big.jpg")}
    fetched = fetch_all(urls, tmp_path, FetchSettings(max_bytes=10_000, allow_private=True, retry=QUICK))
    assert fetched["0.jpg"].path.read_bytes() == (served["folder"] / "0.jpg").read_bytes()
    assert fetched["3.jpg"].path is not None and server.requests.count(("3.jpg", None)) == 3
    assert fetched["gone.jpg"].error.reason == "the server answered HTTP 404"
    assert fetched["big.jpg"].error.reason == "too large" and not list(tmp_path.glob("*-0003"))
    refused = fetch_all({"x": f"{server.url}/0.jpg"}, tmp_path, FetchSettings(retry=QUICK))["x"]
    assert refused.error.reason == "not a public address"
    assert server.requests.count(("0.jpg", None)) == 1  # the refused fetch sent nothing


# ---- the command line, in a subprocess -------------------------------------------------------------


def run_cli(*arguments, check: bool = True) -> subprocess.CompletedProcess:
    environment = {name: value for name, value in os.environ.items() if not name.startswith("MLFLOW_TRACKING_URI")}
    result = subprocess.run([str(BIN / "ituning"), "caption-collection", *map(str, arguments)], cwd=ROOT,
                            env=environment, capture_output=True, text=True, timeout=1200)
    if check:
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.mark.slow
def test_cli_captions_a_folder_and_a_url_list_into_parquet_duckdb_reads(tmp_path, served, standin_checkpoint,
                                                                        standin_backbones):
    from mlflow import MlflowClient

    expected = photo_folder(tmp_path / "photos", 1996)
    out, workspace = tmp_path / "captions", tmp_path / "ws"
    common = ["--model", standin_checkpoint, "--workspace", workspace, *FAST_DECODING]
    first = run_cli(tmp_path / "photos", "--out", out, "--shard-size", 500, *common)
    check_every_image_once(out, expected)
    assert "2000 images in 4 shards (1997 ok, 2 unreadable, 1 too-large)" in first.stdout
    assert " INFO " not in first.stderr, first.stderr[-2000:]  # no library chatter
    [(shards, beams, digests)] = rows_of(out, """
        SELECT count(DISTINCT shard), min(len(beams)), count(DISTINCT settings_digest)
        FROM '{out}/*.parquet' WHERE status = 'ok'""")
    assert (shards, beams, digests) == (4, 3, 1)
    reasons = dict(rows_of(out, "SELECT key, reason FROM '{out}/*.parquet' WHERE status != 'ok'"))
    assert "900000000 pixels" in reasons["bomb.png"] and reasons["noise.jpg"] == "not an image file"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["statuses"] == {"ok": 1997, "unreadable": 2, "missing": 0, "too-large": 1, "fetch-failed": 0}
    assert summary["clip_s"]["images"] == 0  # no CLIP given
    run = MlflowClient(f"sqlite:///{workspace / 'mlflow.db'}").get_run(first.stdout.split("MLflow run ")[1].strip())
    assert run.data.metrics["images_ok"] == 1997 and run.data.metrics["images_too-large"] == 1
    [(digest,)] = rows_of(out, "SELECT any_value(settings_digest) FROM '{out}/*.parquet'")
    assert run.data.params["settings_digest"] == digest
    written = {path.name: path.read_bytes() for path in out.glob("*.parquet")}

    again = run_cli(tmp_path / "photos", "--out", out, "--shard-size", 500, *common)
    assert "this run: 0 images" in again.stdout and "4 shards reused" in again.stdout
    assert {path.name: path.read_bytes() for path in out.glob("*.parquet")} == written
    other = run_cli(tmp_path / "photos", "--out", out, "--shard-size", 500, *common[:-8], "--beams", "2",
                    *FAST_DECODING[2:], check=False)
    assert other.returncode == 2 and "captions made with other settings" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1

    served["server"].faults["3.jpg"] = ["503"]
    listed = run_cli(served["folder"] / "urls.parquet", "--out", tmp_path / "from-urls", "--allow-private-urls",
                     "--max-image-mb", 0.01, "--clip", standin_backbones.vision_model, "--rerank", "clip", *common)
    assert "--allow-private-urls" in listed.stderr
    check_every_image_once(tmp_path / "from-urls", served["url_expected"])
    [(beams, reranked)] = rows_of(tmp_path / "from-urls", """
        SELECT min(len(beams)), bool_and(clip_s = list_max(list_transform(beams, b -> b.clip_s)))
        FROM '{out}/*.parquet' WHERE status = 'ok'""")
    assert (beams, reranked) == (3, True)
    clip_s = json.loads((tmp_path / "from-urls" / "summary.json").read_text())["clip_s"]
    assert clip_s["images"] == 4 and sum(bucket["images"] for bucket in clip_s["histogram"]) == 4
    given = dict(rows_of(tmp_path / "from-urls", "SELECT key, given_caption FROM '{out}/*.parquet'"))
    assert given["a"] == "alt text a"
    query = "SELECT status, count(*) FROM '{out}/*.parquet' GROUP BY status ORDER BY status"
    shown = subprocess.run([str(BIN / "duckdb"), "-csv", "-noheader", "-c", query.format(out=tmp_path / "from-urls")],
                           capture_output=True, text=True, check=True).stdout.split()
    assert shown == ["fetch-failed,1", "ok,4", "too-large,2"]


@pytest.mark.slow
def test_a_run_killed_mid_way_and_rerun_gives_the_files_of_an_uninterrupted_run(tmp_path, standin_checkpoint):
    expected = photo_folder(tmp_path / "photos", 14)
    options = ["--model", standin_checkpoint, "--workspace", tmp_path / "ws", "--shard-size", 3, *FAST_DECODING]
    run_cli(tmp_path / "photos", "--out", tmp_path / "whole", *options)
    killed = subprocess.Popen([str(BIN / "ituning"), "caption-collection", str(tmp_path / "photos"), "--out",
                               str(tmp_path / "resumed"), *map(str, options)], cwd=ROOT, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not list((tmp_path / "resumed").glob("shard-*.parquet")) and killed.poll() is None:
        time.sleep(0.05)
    os.killpg(killed.pid, signal.SIGKILL)  # the command and its decoding processes, at once
    killed.wait()
    interrupted = sorted(path.name for path in (tmp_path / "resumed").glob("shard-*.parquet"))
    assert 1 <= len(interrupted) < 6, interrupted
    rerun = run_cli(tmp_path / "photos", "--out", tmp_path / "resumed", *options)
    assert f"{len(interrupted)} shards reused" in rerun.stdout
    assert not list((tmp_path / "resumed").glob("*.tmp-*"))
    whole = {path.name: path.read_bytes() for path in (tmp_path / "whole").glob("shard-*.parquet")}
    assert {path.name: path.read_bytes() for path in (tmp_path / "resumed").glob("shard-*.parquet")} == whole
    check_every_image_once(tmp_path / "resumed", expected)


# ---- the flow, on threads and on Dask ----------------------------------------------------------------


@pytest.mark.slow
def test_flow_captions_tars_over_http_and_refuses_private_urls(prefect_api, tmp_path, served, standin_checkpoint):
    from flows.caption_collection import caption_collection

    common = {"model": str(standin_checkpoint), "workspace": str(tmp_path / "ws"), "beams": 3, "max_length": 5,
              "device": "cpu", "decode_workers": 0}
    server = served["server"]
    summary = caption_collection(source=f"{server.url}/00000.tar", out=str(tmp_path / "tar"), **common)
    check_every_image_once(tmp_path / "tar", served["tar_expected"])
    assert summary["statuses"]["ok"] == 5 and summary["shards"] == 1
    sources = dict(rows_of(tmp_path / "tar", "SELECT key, source FROM '{out}/*.parquet'"))
    assert sources["000000001"] == f"{server.url}/00000.tar#000000001.jpg"
    assert rows_of(tmp_path / "tar", "SELECT given_caption FROM '{out}/*.parquet' WHERE key = '000000002'") == [
        ("photo 2",)]
    fetched_before = len(server.requests)
    caption_collection(source=str(served["folder"] / "urls.parquet"), out=str(tmp_path / "urls"), **common)
    refused = rows_of(tmp_path / "urls", "SELECT DISTINCT status, reason FROM '{out}/*.parquet'")
    assert [(status, "not a public address" in reason) for status, reason in refused] == [("fetch-failed", True)]
    assert len(server.requests) == fetched_before  # nothing was sent to the loopback host


@pytest.mark.slow
def test_shards_on_dask_finish_every_image_exactly_once_when_a_worker_is_killed(prefect_api, tmp_path, monkeypatch,
                                                                                standin_checkpoint):
    import threading

    from distributed import Client, LocalCluster

    from flows.caption_collection import caption_collection
    from flows.cache_features import shard_task_runner

    expected = photo_folder(tmp_path / "photos", 20)
    arguments = {"source": str(tmp_path / "photos"), "model": str(standin_checkpoint), "out": str(tmp_path / "out"),
                 "workspace": str(tmp_path / "ws"), "beams": 3, "max_length": 5, "device": "cpu",
                 "decode_workers": 0, "shard_size": 2}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True) as cluster, Client(cluster) as client:
        victim = next(iter(client.run(os.getpid).values()))
        monkeypatch.setenv("ITUNING_DASK_ADDRESS", cluster.scheduler_address)

        def kill_after_the_first_shard():
            while not list((tmp_path / "out").glob("shard-*.parquet")):
                time.sleep(0.05)
            os.kill(victim, signal.SIGKILL)

        killer = threading.Thread(target=kill_after_the_first_shard, daemon=True)
        killer.start()
        runner = caption_collection.with_options(task_runner=shard_task_runner())
        state = runner(**arguments, return_state=True)
        killer.join(timeout=600)
        if not state.is_completed():  # the run may fail with the worker: a rerun finishes it
            state = runner(**arguments, return_state=True)
    assert state.is_completed() and not psutil.pid_exists(victim)  # the worker died mid-run
    check_every_image_once(tmp_path / "out", expected)
    assert len(list((tmp_path / "out").glob("shard-*.parquet"))) == 12
