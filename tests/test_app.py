"""`ituning app` as a user meets it: the real server on 127.0.0.1, driven by headless Chromium.

The browser is Debian's chromium driven by Playwright (tests/browser.py).
The page's caption must equal the command line's caption of the same file, each word's heatmap must
show, and bad files get a message on the page while the server keeps captioning.
"""

import os
import subprocess
from pathlib import Path

import pytest

from tests.browser import browser, open_page  # noqa: F401  (browser is a fixture)
from tests.harness import app_running
from tests.test_image_decoding import write_huge_png

ROOT = Path(__file__).resolve().parent.parent
ITUNING = str(Path(os.sys.executable).parent / "ituning")
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def app_url(standin_checkpoint, tmp_path_factory):
    folder = tmp_path_factory.mktemp("app")
    arguments = ["--model", str(standin_checkpoint), "--workspace", str(folder), "--device", "cpu",
                 "--max-upload-mb", "2", "--allow-private-urls"]  # the image URL test's server is on 127.0.0.1
    with app_running(arguments, folder / "app.log") as url:
        assert "(image URLs from any host, private ones included)" in (folder / "app.log").read_text()
        yield url


@pytest.fixture
def page(browser, app_url):  # noqa: F811
    context, opened, script_errors = open_page(browser, app_url)
    opened.wait_for_selector("body[data-ready]", timeout=120_000)  # the model list has arrived
    yield opened
    context.close()
    assert not script_errors, f"errors in the page's script: {script_errors}"


def cli_caption(checkpoint: Path, image: Path) -> str:
    result = subprocess.run([ITUNING, "caption", str(image), "--checkpoint", str(checkpoint), "--device", "cpu"],
                            capture_output=True, text=True, cwd=ROOT, check=True)
    return result.stdout.strip().split("\t", 1)[1]


def caption_on_page(page, file: Path) -> None:
    page.set_input_files("#file", str(file))
    page.click("#caption-button")
    page.wait_for_function("document.getElementById('caption-button').disabled === false"
                           " && document.getElementById('status').textContent === ''", timeout=180_000)


@pytest.fixture
def photo(tmp_path):
    from tests.scene_images import shape_image

    path = tmp_path / "blue square.png"
    shape_image("blue", "square", size=160).save(path)
    return path


def test_the_page_captions_an_upload_as_the_command_line_does_and_shows_each_words_heatmap(
        page, photo, standin_checkpoint):
    assert page.input_value("#model") == str(standin_checkpoint)
    caption_on_page(page, photo)

    assert page.text_content("#error") == ""
    shown = page.text_content("#caption")
    assert shown == cli_caption(standin_checkpoint, photo)
    words = page.locator("#tokens button")
    assert words.count() >= 1
    beams = page.locator("#beams tbody tr")
    assert beams.count() >= 2 and beams.first.locator("td").first.text_content() == shown
    scores = [float(row.locator("td.score").text_content()) for row in beams.all()]
    assert scores == sorted(scores, reverse=True)

    heatmap_is_drawn = "(() => { const img = document.getElementById('heatmap');" \
                       " return img.complete && img.naturalWidth > 0 && img.src.startsWith('data:image/jpeg'); })()"
    assert page.evaluate(heatmap_is_drawn)
    first_map = page.get_attribute("#heatmap", "src")
    words.last.click()
    assert "selected" in words.last.get_attribute("class")
    assert page.evaluate(heatmap_is_drawn)
    if words.count() > 1:
        assert page.get_attribute("#heatmap", "src") != first_map


@pytest.mark.parametrize("name, content, message", [
    ("notes.jpg", b"these are words, not pixels", "this file cannot be used: not an image file"),
    ("huge.png", None, "too large to decode: 900,000,000 pixels"),
    ("big.jpg", b"\xff" * (3 * 1024 * 1024), "over the 2,097,152-byte limit"),
])
def test_a_bad_file_gets_a_message_on_the_page_and_the_server_goes_on(page, photo, tmp_path, name, content, message):
    bad = tmp_path / name
    if content is None:
        write_huge_png(bad)
    else:
        bad.write_bytes(content)
    caption_on_page(page, bad)
    assert message in page.text_content("#error")
    assert page.locator("#result").is_hidden()

    caption_on_page(page, photo)
    assert page.text_content("#error") == ""
    assert page.text_content("#caption")


def test_a_folder_outside_the_served_ones_is_not_loaded(page, photo, tmp_path):
    page.fill("#model", str(tmp_path / "no-such-checkpoint"))
    caption_on_page(page, photo)
    assert page.text_content("#error").startswith("cannot load this model: the page serves NAME@ALIAS")


def test_the_page_captions_an_image_url_from_this_machine_when_started_to_allow_it(page, photo, standin_checkpoint):
    from tests.corpus_server import CorpusServer

    with CorpusServer(photo.parent) as server:
        page.fill("#url", f"{server.url}/{photo.name.replace(' ', '%20')}")
        page.click("#caption-button")
        page.wait_for_function("document.getElementById('caption-button').disabled === false"
                               " && document.getElementById('status').textContent === ''", timeout=180_000)
    assert page.text_content("#error") == ""
    assert page.text_content("#caption") == cli_caption(standin_checkpoint, photo)
