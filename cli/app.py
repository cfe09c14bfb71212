"""`ituning app`: the web page to try a captioner (see pipeline/app.py)."""

from pathlib import Path
from typing import Annotated

import typer

from cli.errors import fail


def serve_app(
    model: Annotated[str | None, typer.Option(help="the model the page starts with: a checkpoint folder, NAME@ALIAS "
                                                   "or models:/NAME/VERSION of the registry, runs:/RUN_ID/model, "
                                                   "hub:REPO (default: the champion of the latest registered model)")]
    = None,
    workspace: Annotated[Path | None, typer.Option(envvar="ITUNING_WORKSPACE",
                                                   help="whose tracking store registry names are looked up in "
                                                        "(default $MLFLOW_TRACKING_URI, else ./workspace)")] = None,
    host: Annotated[str, typer.Option(help="address to listen on; 127.0.0.1 keeps it on this machine")] = "127.0.0.1",
    port: Annotated[int, typer.Option(envvar="ITUNING_APP_PORT", min=1, max=65535)] = 7860,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    max_upload_mb: Annotated[float, typer.Option(min=0.1, help="largest image file accepted")] = 20,
    model_dir: Annotated[list[Path], typer.Option(help="a folder whose checkpoint folders a visitor may name, "
                                                       "besides the workspace's runs/ (repeatable)")] = [],
    allowed_host: Annotated[list[str], typer.Option(help="a host name the page is reached by, besides the "
                                                         "loopback names and --host (repeatable)")] = [],
    allow_private_urls: Annotated[bool, typer.Option(help="fetch visitors' image URLs from loopback and private "
                                                          "hosts too (for a page on your own machine)")] = False,
):
    """Serve a web page to try a captioner: upload an image or give a URL, read the caption, the
    other beams with their scores and the attention heatmap of each word. The model is loaded when
    the first image is captioned with it. Image URLs are fetched from public hosts only unless
    --allow-private-urls; the page answers loopback host names, --host and --allowed-host only."""
    from pipeline.app import AppSettings, run_app

    if host not in ("127.0.0.1", "localhost", "::1"):
        typer.echo(f"warning: listening on {host}: anyone who can reach it can use the captioner", err=True)
    _check_free(host, port)
    hosts = (f"[{host}]" if ":" in host else host, *allowed_host)
    urls = "any host, private ones included" if allow_private_urls else "public hosts only"
    typer.echo(f"Captioner page: http://{'127.0.0.1' if host == '0.0.0.0' else host}:{port} (image URLs from {urls})")
    run_app(AppSettings(model, workspace, device, max_upload_mb, model_dirs=tuple(model_dir),
                        allow_private_urls=allow_private_urls, hosts=hosts), host, port)


def _check_free(host: str, port: int) -> None:
    """A one-line error now rather than the web server's traceback-like exit once it binds."""
    import socket

    try:
        with socket.create_server((host, port)):
            pass
    except OSError as error:  # the port is taken, or the address is not this machine's
        fail(f"cannot listen on {host}:{port}: {error.strerror or error}")
