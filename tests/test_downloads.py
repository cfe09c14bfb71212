import hashlib
import json
import os

import httpx
import pytest

from storage.downloads import DownloadError, Ledger, RetryPolicy, check_free_space, fetch_verified
from storage.manifests import ManifestError, RemoteFile, load_manifest
from tests.corpus_server import CorpusServer

QUICK = RetryPolicy(attempts=4, first_wait_s=0.01, max_wait_s=0.05)
SIZE = 3_000_000


@pytest.fixture
def served(tmp_path):
    folder = tmp_path / "served"
    folder.mkdir()
    payload = os.urandom(SIZE)
    (folder / "big.bin").write_bytes(payload)
    with CorpusServer(folder) as server:
        yield server, payload


def remote_for(server, payload, name="big.bin"):
    return RemoteFile(name, f"{server.url}/{name}", len(payload), hashlib.md5(payload).hexdigest())


def fetch(server, remote, target, ledger=None, timeout=5.0):
    with httpx.Client(timeout=timeout) as client:
        return fetch_verified(client, remote, target, ledger or Ledger(target.parent), QUICK)


def test_cut_connection_resumes_with_range_and_refetches_little(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["cut:2000000"]
    record = fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == payload
    assert [header for _, header in server.requests] == [None, "bytes=2000000-"]
    assert server.bytes_sent["big.bin"] - SIZE < SIZE // 100  # resumed, not restarted
    assert record.checksum == "md5:" + hashlib.md5(payload).hexdigest()
    assert not (tmp_path / "big.bin.part").exists()


def test_corrupted_file_is_detected_and_downloaded_again(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["corrupt"]
    fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == payload
    assert len(server.requests) == 2 and server.bytes_sent["big.bin"] == 2 * SIZE


def test_checksum_still_wrong_after_full_redownload_fails(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["corrupt", "corrupt"]
    with pytest.raises(DownloadError, match="big.bin: still wrong after a full re-download"):
        fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert not (tmp_path / "big.bin").exists() and not (tmp_path / "big.bin.part").exists()


def test_not_found_fails_fast_without_retrying(served, tmp_path):
    server, payload = served
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(server, remote_for(server, payload, "absent.bin"), tmp_path / "absent.bin")
    assert len(server.requests) == 1


def test_server_errors_are_retried_then_succeed(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["500", "500"]
    fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert len(server.requests) == 3 and (tmp_path / "big.bin").read_bytes() == payload


def test_persistent_server_errors_give_up_after_the_retry_budget(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["500"] * 10
    with pytest.raises(DownloadError, match=r"could not fetch http://127\.0\.0\.1:\d+/big\.bin after 4 attempts"):
        fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert len(server.requests) == 4


def test_timeout_is_retried(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["stall:1.0"]
    fetch(server, remote_for(server, payload), tmp_path / "big.bin", timeout=0.3)
    assert (tmp_path / "big.bin").read_bytes() == payload and len(server.requests) == 2


def test_server_ignoring_range_restarts_from_zero(served, tmp_path):
    server, payload = served
    server.faults["big.bin"] = ["cut:1000000", "ignore-range"]
    fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert (tmp_path / "big.bin").read_bytes() == payload


def test_file_already_in_place_with_the_right_checksum_is_not_fetched(served, tmp_path):
    server, payload = served
    (tmp_path / "big.bin").write_bytes(payload)
    record = fetch(server, remote_for(server, payload), tmp_path / "big.bin")
    assert server.requests == [] and record.bytes == SIZE


def test_verified_file_is_skipped_on_the_next_run(served, tmp_path):
    server, payload = served
    remote = remote_for(server, payload)
    ledger = Ledger(tmp_path)
    fetch(server, remote, tmp_path / "big.bin", ledger)
    ledger.save()
    fetch(server, remote, tmp_path / "big.bin", Ledger(tmp_path))
    assert len(server.requests) == 1
    assert json.loads((tmp_path / "verified.json").read_text())["big.bin"]["bytes"] == SIZE


def test_unknown_checksum_records_what_was_fetched(served, tmp_path):
    server, payload = served
    record = fetch(server, RemoteFile("big.bin", f"{server.url}/big.bin"), tmp_path / "big.bin")
    assert record.checksum == "sha256:" + hashlib.sha256(payload).hexdigest() and record.bytes == SIZE


def test_not_enough_disk_space_is_refused_before_starting(tmp_path):
    huge = RemoteFile("huge.zip", "http://127.0.0.1:9/huge.zip", bytes=10**18)
    with pytest.raises(DownloadError, match="not enough free space"):
        check_free_space(tmp_path, [huge], Ledger(tmp_path))


def test_manifest_errors_name_the_file_and_field(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"dataset": "coco", "files": [{"name": "a.zip"}]}))
    with pytest.raises(ManifestError, match=r"bad.json: missing field files\[0\].url"):
        load_manifest(path)
    path.write_text(json.dumps({"dataset": "coco", "files": [{"name": "a.zip", "url": "x", "bytes": "12"}]}))
    with pytest.raises(ManifestError, match=r"files\[0\].bytes must be an integer"):
        load_manifest(path)
