"""`ituning app` started as the README says (`ituning app --workspace WS`, on 127.0.0.1), from a
working folder outside the workspace, on a workspace whose registry holds a champion; driven by
headless Chromium and by plain HTTP clients as another site or a rebinding host name would.

- a visitor's URL to this machine or a private network is refused before any connection, with one
  message whatever is (or is not) listening there;
- a foreign Host header, a cross-site POST (a form's text/plain, a foreign Origin) are refused;
- the model field serves registry names and the workspace's runs/ only, with one message for any
  other folder, existing or not;
- the registry's champion stays listed and captions after models are loaded; no mlflow.db appears
  in the working folder; a failed caption clears the previous one's results.
"""

import http.client
import json
import os
import urllib.error
import urllib.request

import pytest

from pipeline.app import NOT_SERVED, URL_FAILED
from tests.browser import browser, open_page  # noqa: F401  (browser is a fixture)
from tests.corpus_server import CorpusServer
from tests.ports import free_port
from tests.harness import app_running
from tests.test_app import caption_on_page

pytestmark = pytest.mark.slow
CHAMPION_NAME = "ituning-captioner@champion"


@pytest.fixture(scope="module")
def champion_workspace(standin_checkpoint, tmp_path_factory):
    """A workspace whose registry holds the stand-in captioner as ituning-captioner@champion."""
    from pipeline.tracking import ExperimentTracker

    workspace = tmp_path_factory.mktemp("workspace")
    saved_uri = os.environ.pop("MLFLOW_TRACKING_URI", None)
    try:
        tracker = ExperimentTracker(workspace=workspace)
        with tracker.pipeline_run("demo") as parent, tracker.step_run(parent, "finetune") as run_id:
            tracker.log_captioner_model(run_id, standin_checkpoint, "ituning-captioner")
        tracker.client.set_registered_model_alias("ituning-captioner", "champion", "1")
    finally:
        if saved_uri is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_uri
    return workspace


@pytest.fixture(scope="module")
def app(champion_workspace, tmp_path_factory):
    """(the page's URL, the app's working folder)."""
    working = tmp_path_factory.mktemp("elsewhere")
    log = working.parent / "app-access.log"
    arguments = ["--workspace", str(champion_workspace), "--device", "cpu"]
    with app_running(arguments, log, cwd=working) as url:
        assert "(image URLs from public hosts only)" in log.read_text()
        yield url, working


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    from tests.scene_images import shape_image

    path = tmp_path_factory.mktemp("photos") / "red circle.png"
    shape_image("red", "circle", size=160).save(path)
    return path


@pytest.fixture
def internal(photo):
    """A web server on this machine, holding the photo: no visitor may reach it through the page."""
    with CorpusServer(photo.parent) as server:
        yield server


def post(url: str, body: bytes, headers: dict, query: str = "") -> tuple[int, dict]:
    request = urllib.request.Request(f"{url}/api/caption{query}", data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=300) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def own(url: str, content_type: str = "application/octet-stream") -> dict:
    """The headers the page itself sends."""
    return {"Origin": url, "Content-Type": content_type, "Sec-Fetch-Site": "same-origin"}


def test_the_champion_stays_listed_after_captions_and_a_failure_clears_the_results(app, browser, photo,  # noqa: F811
                                                                                      internal, tmp_path):
    url, working = app
    context, page, script_errors = open_page(browser, url)
    page.wait_for_selector("body[data-ready]", timeout=120_000)
    assert page.input_value("#model") == CHAMPION_NAME
    page.fill("#model", "")
    for _ in range(2):  # the first caption loads the champion; the second looks the registry up again
        caption_on_page(page, photo)
        assert page.text_content("#error") == "" and page.text_content("#caption")
        assert page.text_content("#model-used") == f"model: {CHAMPION_NAME}"
    with urllib.request.urlopen(f"{url}/api/models", timeout=30) as response:
        models = json.load(response)
    assert models["default"] == CHAMPION_NAME and CHAMPION_NAME in models["choices"]
    assert not [name for name in ("mlflow.db", "mlruns", "mlartifacts") if (working / name).exists()]

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"these are words, not pixels")
    caption_on_page(page, bad)
    assert "not an image file" in page.text_content("#error")
    assert_results_cleared(page)

    caption_on_page(page, photo)
    page.fill("#url", f"{internal.url}/red%20circle.png")
    page.click("#caption-button")
    page.wait_for_function("document.getElementById('error').textContent !== ''", timeout=60_000)
    assert page.text_content("#error") == f"{URL_FAILED}: not a public address"
    assert_results_cleared(page)
    assert internal.requests == []
    context.close()
    assert not script_errors, f"errors in the page's script: {script_errors}"


def assert_results_cleared(page) -> None:
    assert page.locator("#result").is_hidden()
    assert page.text_content("#caption") == "" and page.locator("#beams tbody tr").count() == 0
    assert page.locator("#tokens button").count() == 0 and page.get_attribute("#heatmap", "src") is None


def test_a_visitors_url_to_this_machine_or_a_private_network_is_refused_before_any_request(app, internal):
    url, _ = app
    closed = free_port()
    for target in (f"{internal.url}/red%20circle.png", f"http://localhost:{internal.server_address[1]}/x.png",
                   f"http://[::1]:{internal.server_address[1]}/x.png", f"http://127.0.0.1:{closed}/x.png",
                   "http://169.254.169.254/latest/meta-data/", "http://10.1.2.3/x.png", "http://192.168.0.7/x.png"):
        status, answer = post(url, json.dumps({"url": target}).encode(), own(url, "application/json"))
        assert (status, answer) == (400, {"error": f"{URL_FAILED}: not a public address"}), target
    status, answer = post(url, json.dumps({"url": "file:///etc/hostname"}).encode(), own(url, "application/json"))
    assert (status, answer) == (400, {"error": f"{URL_FAILED}: not an http(s) URL"})
    assert internal.requests == []


def test_a_foreign_host_and_cross_site_posts_are_refused(app, photo, internal):
    url, _ = app
    port = int(url.rsplit(":", 1)[1])
    for host in ("attacker.example", f"attacker.example:{port}"):
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        connection.request("GET", "/api/models", headers={"Host": host})
        assert connection.getresponse().status == 400
        connection.close()
    image = photo.read_bytes()
    asked = json.dumps({"url": f"{internal.url}/red%20circle.png"}).encode()
    refused = [
        (asked, {"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),  # a form or a simple fetch
        (image, {"Origin": "http://evil.example", "Content-Type": "application/octet-stream"}, 403),
        (image, {"Origin": f"http://localhost:{port + 1}", "Content-Type": "application/octet-stream"}, 403),
        (image, {"Content-Type": "application/octet-stream", "Sec-Fetch-Site": "cross-site"}, 403),
        (image, {"Origin": url, "Content-Type": "text/plain"}, 415),
        (image, {"Origin": url, "Content-Type": "multipart/form-data; boundary=x"}, 415),
    ]
    for body, headers, expected in refused:
        status, answer = post(url, body, headers)
        assert status == expected and "caption" not in answer, (headers, status, answer)
    assert internal.requests == []
    status, answer = post(url, image, own(url))  # the page's own request
    assert status == 200 and answer["caption"], answer


def test_the_model_field_says_the_same_for_a_folder_that_exists_and_one_that_does_not(app, photo, tmp_path):
    url, _ = app
    (tmp_path / "not-a-checkpoint").mkdir()
    (tmp_path / "not-a-checkpoint" / "notes.txt").write_text("kept here")
    answers = set()
    for model in (tmp_path / "not-a-checkpoint", tmp_path / "no-such-folder", "/etc", "../../../../etc", "runs/../.."):
        status, answer = post(url, photo.read_bytes(), own(url), f"?model={urllib.request.quote(str(model))}")
        assert status == 400, (model, answer)
        answers.add(answer["error"])
    assert answers == {NOT_SERVED}
