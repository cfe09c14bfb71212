"""A web page to try a captioner: upload an image or give its URL, read the beam-5 caption, the
other beams with their scores, and where the last I-Tuning module looked for each word.

`ituning app` serves it on 127.0.0.1 (`make serve` starts it beside the Prefect and MLflow UIs).
The page (app_page.html) talks to three endpoints:

- GET  /api/models  the model to start from and the registered models a user can pick.
- POST /api/caption?model=SPEC  the image file's bytes as the body (application/octet-stream or
  image/*), or {"url": URL} as application/json; answers the caption, the ranked beams, the
  caption's tokens and one heatmap per token.
- GET  /health  for whoever waits on the server.

Who may ask is checked first (pipeline/page_guard.py: Host, Origin, content type). A visitor's URL
is fetched under the public-host rule (storage/public_urls.py) unless the app was started with
`allow_private_urls`; its failure says "could not fetch an image from this URL" and a public reason,
never what the server answered beyond its status. The answer holds no fetched bytes but the encoder's
view of the image it captioned.

A model is `NAME@ALIAS` or `models:/...` of the registry, `runs:/...`, `hub:OWNER/NAME`, the start
model, or a checkpoint folder under the workspace's runs/ or a `model_dirs` folder; any other text
gets one message that does not say whether such a folder exists. The last few used stay loaded.
Without a start model the page starts with the champion of the most recently updated registered
model. Bad input (not an image, an image over PIL's pixel limit, a body over `max_upload_mb`, a URL
that fails, a model the page does not serve) answers 400 with a one-line message the page shows;
the server keeps serving.
"""

import base64
import io
import json
import logging
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, JSONResponse

from pipeline.messages import on_one_line
from pipeline.page_guard import PageGuard

PAGE = Path(__file__).with_name("app_page.html")
CHAMPION = "champion"
URL_FAILED = "could not fetch an image from this URL"
NOT_SERVED = ("cannot load this model: the page serves NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, "
              "hub:OWNER/NAME and checkpoint folders in the workspace's runs/ (or a folder given with --model-dir)")
_logger = logging.getLogger(__name__)


class InputError(ValueError):
    """A request the app refuses, with the message the page shows."""


@dataclass(frozen=True)
class AppSettings:
    model: str | None = None  # the model the page starts with; None: the latest champion
    workspace: Path | None = None  # whose tracking store registry names are looked up in
    device: str = "auto"
    max_upload_mb: float = 20
    models_kept: int = 2  # loaded captioners kept in memory
    model_dirs: tuple[Path, ...] = ()  # checkpoint folders a visitor may name, besides the workspace's runs/
    allow_private_urls: bool = False  # fetch visitors' URLs from loopback and private hosts too
    hosts: tuple[str, ...] = ()  # Host names answered besides the loopback ones


class CaptionerPool:
    """Captioners by model spec, loaded on first use; the least recently used is dropped first.
    One request at a time uses them (a lock), so a busy server queues rather than runs out of memory."""

    def __init__(self, settings: AppSettings):
        self.settings = settings
        self.loaded: OrderedDict[str, object] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, spec: str):
        if spec not in self.loaded:
            from pipeline.model_sources import load_captioner

            source = served_model(spec, self.settings)
            try:
                self.loaded[spec] = load_captioner(source, self.settings.workspace, self.settings.device)
            except Exception as error:  # an unknown folder, name, alias or repo; an unreachable store
                raise InputError(f"cannot load model {spec}: {on_one_line(error)}") from error
            while len(self.loaded) > self.settings.models_kept:
                self.loaded.popitem(last=False)
        self.loaded.move_to_end(spec)
        return self.loaded[spec]


def served_model(spec: str, settings: AppSettings):
    """The ModelSource a visitor's model field names, or InputError(NOT_SERVED) for any other text;
    no folder outside the served ones is looked at."""
    from pipeline.model_sources import model_source, named_model_source

    try:
        if spec == settings.model:  # the operator's own choice on the command line
            return model_source(spec)
        named = named_model_source(spec)
    except ValueError as error:
        raise InputError(f"cannot load model {spec}: {error}") from error
    folder = named or served_folder(spec, settings)
    if folder is None:
        raise InputError(NOT_SERVED)
    return folder


def served_folder(spec: str, settings: AppSettings):
    """A checkpoint folder inside the served folders (links resolved first), or None."""
    from pipeline.model_sources import ModelSource
    from storage.workspace import workspace_root

    root = workspace_root(settings.workspace)
    served = [root / "runs", *settings.model_dirs]
    path = Path(spec)
    for candidate in [path] if path.is_absolute() else [root / path, *(folder / path for folder in served)]:
        try:
            resolved = candidate.resolve()
            if any(resolved.is_relative_to(folder.resolve()) for folder in served) and resolved.is_dir():
                return ModelSource("folder", str(resolved))
        except (OSError, ValueError):  # a NUL byte, a link loop
            continue
    return None


def describe_image(captioner, image, heatmap_side: int = 224) -> dict:
    """The beam-5 caption of a decoded image, every beam with its score, and for each caption token
    the last module's attention drawn over the image (JPEG data URIs)."""
    from ituning.heatmaps import encoder_view, heatmap_overlay, token_attention

    visual = captioner.encode_images([image])  # (1, 1 + P, d_v): encoded once for the beams and the heatmaps
    beams = captioner.ranked_captions(visual)
    attention = token_attention(captioner, visual, beams[0].tokens)
    view = encoder_view(image, heatmap_side)
    return {
        "caption": beams[0].text,
        "beams": [{"caption": beam.text, "score": round(beam.score, 4)} for beam in beams],
        "tokens": attention.tokens,
        "heatmaps": [jpeg_data_uri(heatmap_overlay(view, heat)) for heat in attention.maps],
        "image": jpeg_data_uri(view),
    }


def jpeg_data_uri(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=88)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_upload(content: bytes, min_side: int, from_url: bool = False):
    from ituning.images import UnreadableImage, open_rgb

    if not content:
        raise InputError("no image: choose a file or give a URL")
    try:
        return open_rgb(io.BytesIO(content), min_side)
    except UnreadableImage as error:
        if from_url:  # nothing of what the URL answered goes back
            raise InputError(f"{URL_FAILED}: not an image") from error
        raise InputError(str(error).replace("image data: ", "this file cannot be used: ", 1)) from error


def fetch_url(url: str, max_bytes: int, allow_private: bool) -> bytes:
    from pipeline.image_urls import ImageFetchError, fetch_image, is_image_url
    from storage.public_urls import PublicHosts

    if not is_image_url(url):
        raise InputError(f"{URL_FAILED}: not an http(s) URL")
    with tempfile.TemporaryDirectory(prefix="ituning-app-") as folder:
        try:
            hosts = PublicHosts(private_allowed=allow_private)
            return fetch_image(url, Path(folder) / "image", max_bytes, hosts).read_bytes()
        except ImageFetchError as error:
            _logger.info("fetching a visitor's URL failed: %s", on_one_line(error))
            raise InputError(f"{URL_FAILED}: {error.reason}") from error


async def read_limited(request: Request, max_bytes: int) -> bytes:
    """The request body, refused as soon as it passes `max_bytes` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > max_bytes:
        raise InputError(f"the file is {int(declared):,} bytes, over the {max_bytes:,}-byte limit")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise InputError(f"the file is over the {max_bytes:,}-byte limit")
        chunks.append(chunk)
    return b"".join(chunks)


def requested_url(request: Request, content: bytes) -> str | None:
    """The URL of a JSON request ({"url": "..."}), None for an image's bytes."""
    if not request.headers.get("content-type", "").lower().startswith("application/json"):
        return None
    try:
        url = json.loads(content or b"{}").get("url")
    except (ValueError, AttributeError) as error:
        raise InputError('send {"url": "https://..."} as JSON, or the image file\'s bytes') from error
    if not isinstance(url, str) or not url.strip():
        raise InputError("no image: choose a file or give a URL")
    return url.strip()


def registered_models(workspace: Path | None) -> list[str]:
    """NAME@ALIAS for every alias in the registry and models:/NAME/VERSION for each latest version,
    the most recently updated model first; none when there is no store."""
    try:
        from mlflow import MlflowClient

        from pipeline.tracking import tracking_uri

        uri = tracking_uri(workspace)
        client = MlflowClient(uri, registry_uri=uri)
        found = []
        for model in client.search_registered_models(order_by=["last_updated_timestamp DESC"]):
            found += [f"{model.name}@{alias}" for alias in sorted(model.aliases or {})]
            versions = [int(v.version) for v in model.latest_versions or []]
            if versions:
                found.append(f"models:/{model.name}/{max(versions)}")
        return found
    except Exception as error:  # the page still works with the start model and typed-in ones
        _logger.warning("cannot list registered models: %s", on_one_line(error))
        return []


def create_app(settings: AppSettings = AppSettings()) -> FastAPI:
    app = FastAPI(title="I-Tuning captioner", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(PageGuard, hosts=list(settings.hosts))
    pool = CaptionerPool(settings)
    max_bytes = int(settings.max_upload_mb * 1024 * 1024)

    @app.exception_handler(InputError)
    async def refuse(_request: Request, error: InputError):
        return JSONResponse({"error": str(error)}, status_code=400)

    @app.exception_handler(Exception)
    async def fail(_request: Request, error: Exception):
        _logger.exception("captioning failed")
        return JSONResponse({"error": f"captioning failed: {on_one_line(error)}"}, status_code=500)

    @app.get("/", response_class=HTMLResponse)
    def page():
        return PAGE.read_text()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    def start_model(registered: list[str]) -> str | None:
        champions = [name for name in registered if name.endswith(f"@{CHAMPION}")]
        return settings.model or next(iter(champions), None)

    @app.get("/api/models")
    def models():
        registered = registered_models(settings.workspace)
        default = start_model(registered)
        choices = list(dict.fromkeys([*([default] if default else []), *registered]))
        return {"default": default or "", "choices": choices}

    @app.post("/api/caption")
    async def caption(request: Request, model: str = ""):
        content = await read_limited(request, max_bytes)
        url = requested_url(request, content)
        if url is not None:
            content = await run_in_threadpool(fetch_url, url, max_bytes, settings.allow_private_urls)
        spec = model or await run_in_threadpool(lambda: start_model(registered_models(settings.workspace)))
        if not spec:
            raise InputError("no model given and no champion in the registry yet: run `make demo`, or name a "
                             "checkpoint folder or a registered model")
        return await run_in_threadpool(caption_bytes, spec, content, url is not None)

    def caption_bytes(spec: str, content: bytes, from_url: bool) -> dict:
        with pool.lock:
            captioner = pool.get(spec)
            image = decode_upload(content, captioner.input_side, from_url)
            return {"model": spec, **describe_image(captioner, image)}

    return app


def run_app(settings: AppSettings, host: str = "127.0.0.1", port: int = 7860) -> None:
    import uvicorn

    uvicorn.run(create_app(settings), host=host, port=port, log_level="info")
