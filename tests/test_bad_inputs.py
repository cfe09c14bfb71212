"""Bad input files end every user-facing command with one `error:` line naming the file and field, exit 2."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.main import app
from tests.corpus_server import CorpusServer

CONFIG = Path(__file__).parents[1] / "configs" / "demo.yaml"
MD5 = "0123456789abcdef0123456789abcdef"


def assert_one_error_line(result, *fragments):
    """Exit 2 from the command itself (not an exception escaping it) and one `error:` line."""
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def invoke(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


@pytest.fixture
def served(tmp_path):
    (tmp_path / "served").mkdir()
    (tmp_path / "served" / "a.zip").write_bytes(b"not the published file")
    with CorpusServer(tmp_path / "served") as server:
        yield server


@pytest.mark.parametrize("field, value, message", [
    ("md5", 12345, "files[0].md5 must be 32 hexadecimal digits, not 12345"),
    ("md5", "not-a-md5", "files[0].md5 must be 32 hexadecimal digits, not 'not-a-md5'"),
    ("sha256", MD5, "files[0].sha256 must be 64 hexadecimal digits"),
    ("bytes", -5, "files[0].bytes must be an integer of at least 0, not -5"),
    ("bytes", True, "files[0].bytes must be an integer of at least 0, not True"),
    ("unpack", "yes", "files[0].unpack must be true or false, not 'yes'"),
])
def test_bad_manifest_field_is_refused_before_anything_is_fetched(served, tmp_path, field, value, message):
    manifest = tmp_path / "mirror.json"
    entry = {"name": "a.zip", "url": f"{served.url}/a.zip", field: value}
    manifest.write_text(json.dumps({"dataset": "coco", "files": [entry]}))
    result = invoke("download", "coco", "--manifest", manifest, "--workspace", tmp_path / "ws", "--no-progress")
    assert_one_error_line(result, f"{manifest}: field {message}")
    assert served.requests == []


def test_manifest_that_is_not_an_object_is_refused(tmp_path):
    manifest = tmp_path / "mirror.json"
    manifest.write_text("[]")
    result = invoke("download", "coco", "--manifest", manifest, "--workspace", tmp_path / "ws")
    assert_one_error_line(result, f"{manifest}: expected a JSON object at the top level, found list")


def test_manifest_image_list_stays_in_the_data_folder(tmp_path):
    manifest = tmp_path / "mirror.json"
    manifest.write_text(json.dumps({"dataset": "nocaps", "files": [],
                                    "image_lists": [{"info": "../../info.json", "into": "val"}]}))
    result = invoke("download", "nocaps", "--manifest", manifest, "--workspace", tmp_path / "ws")
    assert_one_error_line(result, "image_lists[0].info must be a plain file name, not '../../info.json'")
    manifest.write_text(json.dumps({"dataset": "nocaps", "files": [],
                                    "image_lists": [{"info": "info.json", "into": "../val"}]}))
    result = invoke("download", "nocaps", "--manifest", manifest, "--workspace", tmp_path / "ws")
    assert_one_error_line(result, "image_lists[0].into must be a folder inside the data folder, not '../val'")


def test_damaged_verified_list_is_named(tmp_path):
    folder = tmp_path / "ws" / "downloads" / "coco"
    folder.mkdir(parents=True)
    (folder / "verified.json").write_text('{"a.zip": [1, 2]')
    manifest = tmp_path / "mirror.json"
    manifest.write_text(json.dumps({"dataset": "coco", "files": [{"name": "a.zip", "url": str(tmp_path / "a")}]}))
    result = invoke("download", "coco", "--manifest", manifest, "--workspace", tmp_path / "ws")
    assert_one_error_line(result, f"{folder / 'verified.json'}: damaged", "delete it")


def karpathy_file(path: Path, **changes) -> Path:
    image = {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "val",
             "sentences": [{"raw": "a cat", "sentid": 7}]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"images": [{**image, **changes}]}))
    return path


@pytest.mark.parametrize("changes, message", [
    ({"sentences": [{"raw": "a cat", "sentid": "7"}]}, "images[0].sentences[0].sentid must be int, not str"),
    ({"sentences": [{"raw": "a cat", "sentid": 2**63}]}, "images[0].sentences[0].sentid is 9223372036854775808"),
    ({"filepath": "../../.."}, "images[0].filepath is '../../..'; expected a path inside the data folder"),
    ({"filepath": "/etc"}, "images[0].filepath is '/etc'"),
    ({"filename": "../../../secret.jpg"}, "images[0].filename is '../../../secret.jpg'"),
])
def test_bad_karpathy_file_stops_the_catalog_build(tmp_path, changes, message):
    path = karpathy_file(tmp_path / "data" / "coco" / "dataset_coco.json", **changes)
    result = invoke("catalog", "build", "coco", "--workspace", tmp_path, "--no-check-images")
    assert_one_error_line(result, f"{path}: field {message}")


def test_nocaps_file_name_outside_the_data_folder_stops_the_catalog_build(tmp_path):
    folder = tmp_path / "data" / "nocaps"
    folder.mkdir(parents=True)
    images = [{"id": 0, "file_name": "../../../../etc/hostname", "coco_url": "https://example.org/a.jpg"}]
    for split in ("val", "test"):
        (folder / f"nocaps_{split}_image_info.json").write_text(json.dumps({"images": images}))
    (folder / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": [], "annotations": []}))
    result = invoke("catalog", "build", "nocaps", "--workspace", tmp_path, "--no-check-images")
    assert_one_error_line(result, "nocaps_val_image_info.json: field images[0].file_name is '../../../../etc/hostname'")


@pytest.mark.parametrize("content, message", [
    ([], "expected a JSON object at the top level, found list"),
    ({"images": {}}, "field images must be list, not dict"),
    ("{", "not valid JSON"),
])
def test_bad_karpathy_json_given_to_train_and_standins(tmp_path, content, message):
    path = tmp_path / "corpus.json"
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    result = invoke("train", "--config", CONFIG, "--karpathy-json", path, "--out", tmp_path / "run", "--device", "cpu")
    assert_one_error_line(result, f"{path}: {message}")
    result = invoke("standins", "--karpathy-json", path, "--out", tmp_path / "bb")
    assert_one_error_line(result, f"{path}: {message}")
    assert not (tmp_path / "run").exists() and not (tmp_path / "bb").exists()


def test_installed_command_prints_no_traceback(tmp_path):
    """The same check through the installed `ituning` script, as a user runs it."""
    manifest = tmp_path / "mirror.json"
    manifest.write_text(json.dumps({"dataset": "coco", "files": [{"name": "a.zip", "url": str(tmp_path / "a"),
                                                                   "md5": 12345}]}))
    command = [str(Path(sys.executable).with_name("ituning")), "download", "coco", "--manifest", str(manifest),
               "--workspace", str(tmp_path / "ws")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.splitlines() == [
        f"error: {manifest}: field files[0].md5 must be 32 hexadecimal digits, not 12345"]
