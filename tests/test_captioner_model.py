import base64
import io
import json
import os
import shutil
import struct
import sys
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import mlflow
import pytest

from ituning.captioner import Captioner
from ituning.decoding import DecodingConfig
from pipeline.tracking import ExperimentTracker
from tests.harness import BIN, running
from tests.ports import free_port
from tests.scene_images import shape_image

DECODING = DecodingConfig(num_beams=2, max_length=8)
REGISTERED = "ituning-captioner"


def png_base64(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@pytest.fixture(scope="module")
def logged_model(standin_backbones, standin_checkpoint, tmp_path_factory):
    """The model logged from copies of the backbones and checkpoint that are deleted afterwards,
    so loading can only succeed from what the run holds."""
    from ituning.checkpoint import CONFIG_FILE

    scratch = tmp_path_factory.mktemp("scratch")
    shutil.copytree(Path(standin_backbones.language_model).parent, scratch / "backbones")
    shutil.copytree(standin_checkpoint, scratch / "checkpoint")
    config = json.loads((scratch / "checkpoint" / CONFIG_FILE).read_text())
    config["backbones"] = {"vision_model": f"local-dir:{scratch / 'backbones' / 'vision'}", "vision_pretrained": None,
                           "language_model": str(scratch / "backbones" / "language")}
    (scratch / "checkpoint" / CONFIG_FILE).write_text(json.dumps(config))
    workspace = tmp_path_factory.mktemp("workspace")
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    tracker = ExperimentTracker(workspace=workspace)
    with tracker.pipeline_run("serve") as parent, tracker.step_run(parent, "finetune") as run_id:
        model_uri = tracker.log_captioner_model(run_id, scratch / "checkpoint", REGISTERED, DECODING)
    shutil.rmtree(scratch)
    yield tracker, run_id, model_uri
    if saved_uri is not None:
        os.environ["MLFLOW_TRACKING_URI"] = saved_uri


@pytest.fixture(scope="module")
def expected_caption(standin_checkpoint):
    captioner = Captioner.from_checkpoint(standin_checkpoint, device="cpu")
    return captioner.caption_images([shape_image("red", "circle")], DECODING)[0]


@pytest.fixture
def model_store(logged_model, monkeypatch):
    """MLflow's module-level API pointed at the test store, for loading by runs:/ URI."""
    saved = mlflow.get_tracking_uri()
    # set_tracking_uri also writes $MLFLOW_TRACKING_URI; monkeypatch puts the variable back as it was.
    monkeypatch.setenv("MLFLOW_TRACKING_URI", logged_model[0].uri)
    mlflow.set_tracking_uri(logged_model[0].uri)
    yield
    mlflow.set_tracking_uri(saved)


def test_logged_model_is_registered_and_bundles_its_backbones(logged_model, model_store, tmp_path):
    tracker, run_id, model_uri = logged_model
    assert model_uri == f"runs:/{run_id}/model"
    versions = tracker.client.search_model_versions(f"name='{REGISTERED}'")
    assert [(str(v.version), v.run_id) for v in versions] == [("1", run_id)]
    assert tracker.client.get_run(run_id).info.status == "FINISHED"
    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(tmp_path), tracking_uri=tracker.uri))
    files = {str(path.relative_to(local)) for path in local.rglob("*") if path.is_file()}
    assert {"artifacts/checkpoint/adapter_model.safetensors", "artifacts/checkpoint/adapter_config.json",
            "artifacts/vision_backbone/open_clip_config.json", "artifacts/language_backbone/config.json",
            "code/ituning/captioner.py", "captioner_model.py"} <= files
    assert not any(name.endswith((".pkl", ".pickle")) for name in files)


def test_loaded_model_captions_like_the_captioner(logged_model, model_store, expected_caption):
    _, _, model_uri = logged_model
    model = mlflow.pyfunc.load_model(model_uri)
    image = png_base64(shape_image("red", "circle"))
    assert model.predict([image, image]) == [expected_caption, expected_caption]
    with pytest.raises(mlflow.exceptions.MlflowException, match="base64"):
        model.predict(["/etc/hostname"])  # paths are refused unless logged with accept_file_paths


def post(url: str, body: dict):
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def served_model(logged_model, tmp_path_factory):
    """`mlflow models serve` on the logged model (a server of this module's own model), for the module."""
    tracker, run_id, _ = logged_model
    port = free_port()
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
           "MLFLOW_TRACKING_URI": tracker.uri, "MLFLOW_DISABLE_TELEMETRY": "true"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"runs:/{run_id}/model", "--env-manager",
               "local", "-h", "127.0.0.1", "-p", str(port)]
    log = tmp_path_factory.mktemp("served") / "server.log"
    with running(command, f"http://127.0.0.1:{port}/ping", log, env) as server:
        yield server.url


@pytest.mark.slow
def test_served_model_returns_captions_over_rest(served_model, expected_caption):
    image = png_base64(shape_image("red", "circle"))
    assert post(f"{served_model}/invocations", {"inputs": [image]}) == {"predictions": [expected_caption]}
    with pytest.raises(urllib.error.HTTPError) as error:
        post(f"{served_model}/invocations", {"inputs": ["not an image"]})
    assert error.value.code == 400


def test_images_arrive_as_base64_and_paths_only_when_allowed(tmp_path):
    from pipeline.captioner_model import decode_image

    image = shape_image("blue", "square")
    image.save(tmp_path / "shape.png")
    assert decode_image(png_base64(image), accept_file_paths=False).tobytes() == image.convert("RGB").tobytes()
    assert decode_image(str(tmp_path / "shape.png"), accept_file_paths=True).tobytes() == image.tobytes()
    with pytest.raises(mlflow.exceptions.MlflowException):
        decode_image(str(tmp_path / "shape.png"), accept_file_paths=False)


def test_only_bundled_backbones_are_relocated():
    from pipeline.captioner_model import LANGUAGE_FOLDER, relocate_backbones

    hub = {"vision_model": "ViT-B-16", "vision_pretrained": "openai", "language_model": "gpt2"}
    assert relocate_backbones(hub, {"checkpoint": "/m/checkpoint"}) == hub
    assert relocate_backbones(hub, {LANGUAGE_FOLDER: "/m/language_backbone"}) == {**hub,
                                                                                  "language_model": "/m/language_backbone"}


def test_bundle_holds_the_adapter_and_each_local_backbone_under_its_role(standin_checkpoint, tmp_path):
    from ituning.checkpoint import CONFIG_FILE
    from pipeline.captioner_model import CHECKPOINT, VISION_WEIGHTS
    from pipeline.tracking import bundled_artifacts

    checkpoint = tmp_path / "checkpoint"
    shutil.copytree(standin_checkpoint, checkpoint)
    (checkpoint / "optimizer.pt").write_bytes(b"not bundled")
    (tmp_path / "weights.safetensors").write_bytes(b"vision weights")
    config = json.loads((checkpoint / CONFIG_FILE).read_text())
    config["backbones"] = {"vision_model": "ViT-B-16", "vision_pretrained": str(tmp_path / "weights.safetensors"),
                           "language_model": "gpt2"}
    (checkpoint / CONFIG_FILE).write_text(json.dumps(config))
    (tmp_path / "staging").mkdir()
    artifacts = bundled_artifacts(checkpoint, tmp_path / "staging")
    assert set(artifacts) == {CHECKPOINT, VISION_WEIGHTS}
    assert Path(artifacts[VISION_WEIGHTS]).name == "vision_weights.safetensors"
    assert Path(artifacts[VISION_WEIGHTS]).read_bytes() == b"vision weights"
    assert sorted(p.name for p in Path(artifacts[CHECKPOINT]).iterdir()) == ["adapter_config.json",
                                                                            "adapter_model.safetensors"]


def png_claiming(width: int, height: int) -> bytes:
    """A PNG of a few dozen bytes whose header claims width x height pixels (a decompression bomb's shape)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + \
        chunk(b"IEND", b"")


def refusal(url: str, inputs: list) -> tuple[int, dict, int]:
    """(status, JSON body, body length) of a request the server answers with an error."""
    with pytest.raises(urllib.error.HTTPError) as error:
        post(url, {"inputs": inputs})
    body = error.value.read()
    return error.value.code, json.loads(body), len(body)


@pytest.mark.slow
def test_served_model_answers_bad_requests_with_a_message_alone_and_lives_on(served_model, expected_caption):
    url = f"{served_model}/invocations"
    bomb = base64.b64encode(png_claiming(30_000, 30_000)).decode()  # 900 million pixels
    near_limit = base64.b64encode(png_claiming(9_000, 9_000)).decode()  # 81 million, under PIL's own limit
    oversize = base64.b64encode(os.urandom(21_000_000)).decode()
    cases = [([png_base64(shape_image("red", "circle")), bomb], "input 1: too large to decode"),
             (["not an image"], "input 0: not a base64-encoded image"),
             ([near_limit] * 3, "over the limit of 200 million (max_request_megapixels)"),
             ([oversize], "21.0 MB of images, over the limit of 20 MB (max_request_mb)")]
    for inputs, reason in cases:
        status, body, length = refusal(url, inputs)
        assert "stack_trace" not in body and "Traceback" not in body["message"], body
        assert status == 400 and body["error_code"] == "BAD_REQUEST", body
        assert reason in body["message"], body["message"]
        assert length < 1000  # the input is not sent back
    image = png_base64(shape_image("red", "circle"))
    assert post(url, {"inputs": [image]}) == {"predictions": [expected_caption]}


class FailingCaptioner:
    def caption_images(self, images, decoding):
        raise RuntimeError("CUDA out of memory in /srv/secret/model.py")


def bare_model(limits=None, captioner=None):
    from pipeline.captioner_model import CaptionerModel, RequestLimits

    model = CaptionerModel()
    model.accept_file_paths, model.limits, model.decoding = False, limits or RequestLimits(), DECODING
    model.captioner = captioner or FailingCaptioner()
    return model


def test_a_request_over_the_limits_is_refused_before_any_image_is_decoded(monkeypatch):
    import pipeline.captioner_model as served
    from pipeline.captioner_model import RequestLimits, ServingError

    decoded = []
    monkeypatch.setattr(served, "decode_file", lambda data: decoded.append(data))
    small = base64.b64encode(png_claiming(1_000, 1_000)).decode()  # 1 million pixels
    model = bare_model(RequestLimits(max_request_mb=0.001, max_request_megapixels=2.5))
    with pytest.raises(ServingError, match=r"0.0 MB of images, over the limit of 0.001 MB \(max_request_mb\)"):
        model.predict([base64.b64encode(bytes(2_000)).decode()])
    with pytest.raises(ServingError, match=r"3 million pixels, over the limit of 2.5 million"):
        bare_model(RequestLimits(max_request_megapixels=2.5)).predict([small] * 3)
    with pytest.raises(ServingError, match="input 1: too large to decode"):
        bare_model().predict([small, base64.b64encode(png_claiming(30_000, 30_000)).decode()])
    assert decoded == []
    assert RequestLimits.from_model_config({"max_request_mb": "5", "decoding": {}}) == RequestLimits(max_request_mb=5)


def test_a_captioning_failure_answers_500_with_no_traceback_and_no_input():
    from pipeline.captioner_model import ServingError

    image = png_base64(shape_image("red", "circle"))
    with pytest.raises(ServingError) as failure:
        bare_model().predict([image])
    error = failure.value
    error.message = f"Failed to predict data '{[image]}'. \nError: {error.message}"  # what the scoring server does
    answer = json.loads(error.serialize_as_json())
    assert error.get_http_status_code() == 500 and answer["error_code"] == "INTERNAL_ERROR"
    assert answer["message"] == "captioning failed (RuntimeError); see the model server's log"
    assert "stack_trace" not in answer
