"""Dataset commands: `ituning download`, `ituning catalog build|query`, `ituning synthetic`."""

from pathlib import Path
from typing import Annotated, Literal

import typer

from cli.errors import echo_error, fail
from storage.datasets import all_datasets, dataset_names, get_dataset

catalog_app = typer.Typer(help="Build and query the DuckDB catalog of images and captions.", no_args_is_help=True)
WorkspaceOption = Annotated[Path | None, typer.Option(help="workspace folder (default $ITUNING_WORKSPACE or ./workspace)")]
IMAGES_HELP = ("URL or local path of the dataset's image archive, added to its downloads (in place of a file of the "
               "same name); "
               + ", ".join(f"{dataset.name} needs one" for dataset in all_datasets() if dataset.images_on_request))


def download(
    dataset: Annotated[Literal[dataset_names()], typer.Argument(help="the dataset to fetch")],
    manifest: Annotated[Path | None, typer.Option(help="manifest JSON replacing the built-in one")] = None,
    images: Annotated[str | None, typer.Option(help=IMAGES_HELP)] = None,
    workspace: WorkspaceOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="parallel per-image downloads (a dataset listed image by image: NoCaps)")] = 8,
    progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
):
    """Download, verify and unpack a dataset into the workspace (resumes; skips verified files)."""
    from storage.acquire import choose_manifest, download_dataset
    from storage.downloads import DownloadError
    from storage.extract import UnsafeArchive
    from storage.jsonfields import MalformedInput
    from storage.workspace import workspace_root

    try:
        chosen = choose_manifest(workspace_root(workspace), dataset, manifest, images)
        on_request = get_dataset(dataset).images_on_request
        if on_request and not images and manifest is None:
            typer.echo(f"note: {on_request}", err=True)
        report = download_dataset(chosen, workspace_root(workspace), concurrency=concurrency, progress=progress)
    except (DownloadError, MalformedInput, UnsafeArchive, OSError) as error:
        fail(error)
    typer.echo(f"{dataset}: {len(report.fetched)} files verified, {len(report.unpacked)} unpacked, "
               f"{report.images} images fetched")
    for failure in report.failures:
        echo_error(failure)
    if report.failures:
        raise typer.Exit(1)


def known_datasets(names: list[str] | None) -> list[str] | None:
    """The names given, when the registry holds each (a usage error naming the choices otherwise)."""
    for name in names or ():
        if name not in dataset_names():
            raise typer.BadParameter(f"{name!r} is not one of {', '.join(map(repr, dataset_names()))}.")
    return names


@catalog_app.command("build")
def catalog_build(
    datasets: Annotated[list[str] | None, typer.Argument(
        help=f"datasets to (re)build, of {', '.join(dataset_names())}; default all", callback=known_datasets)] = None,
    workspace: WorkspaceOption = None,
    check_images: Annotated[bool, typer.Option(help="open every image file to record its status")] = True,
    workers: Annotated[int, typer.Option(min=1, help="processes checking image files")] = 2,
    wait: Annotated[float, typer.Option(min=0, help="seconds to wait for another catalog build to finish")] = 5.0,
):
    """Read the downloaded annotations, check the images and write workspace/catalog.duckdb.
    One build at a time: a second one waits --wait seconds, then stops naming the first."""
    from pipeline.data import build_dataset
    from storage.catalog_build import BUILD_ORDER, MissingInput, open_for_build
    from storage.catalog_lock import BuildRunning, CatalogBusy
    from storage.jsonfields import MalformedInput
    from storage.workspace import workspace_root

    root = workspace_root(workspace)
    chosen = [name for name in BUILD_ORDER if name in (datasets or BUILD_ORDER)]
    try:
        with open_for_build(root, wait) as catalog:
            for dataset in chosen:
                try:
                    summary = build_dataset(root, dataset, catalog, check_images, workers)
                except MissingInput as error:
                    if datasets:  # asked for by name: its files must be there
                        fail(error)
                    typer.echo(f"{dataset}: skipped ({error})")
                    continue
                except MalformedInput as error:
                    fail(error)
                splits = ", ".join(f"{split} {count:,}" for split, count in summary.by_split.items())
                typer.echo(f"{dataset}: {summary.images:,} images ({summary.usable:,} usable: {splits}), "
                           f"{summary.captions:,} captions" + (f", {summary.excluded:,} excluded" if summary.excluded else ""))
    except (BuildRunning, CatalogBusy) as error:
        fail(error)


@catalog_app.command("query")
def catalog_query(sql: Annotated[str, typer.Argument(help="one SELECT-style statement")],
                  workspace: WorkspaceOption = None):
    """Answer a read-only SQL query on the catalog as tab-separated lines with a header.

    The query sees the catalog only: no other file, database, extension or network."""
    import duckdb

    from storage.catalog import QueryRefused, answer_query
    from storage.workspace import catalog_path, workspace_root

    path = catalog_path(workspace_root(workspace))
    if not path.is_file():
        fail(FileNotFoundError(f"no catalog at {path}; run `ituning catalog build` first"))
    try:
        columns, rows = answer_query(path, sql)
    except QueryRefused as error:
        fail(error)
    except duckdb.Error as error:
        fail(_one_line(error))
    typer.echo("\t".join(columns))
    for row in rows:
        typer.echo("\t".join("" if value is None else str(value) for value in row))


def _one_line(error: Exception) -> str:
    """DuckDB's message on one line: its first line, with the `LINE n: ...` context that follows it."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    context = next((line for line in lines[1:] if line.startswith("LINE ")), None)
    return lines[0] + (f" ({context})" if context else "") if lines else type(error).__name__


def synthetic(
    out: Annotated[Path, typer.Option(help="folder to write the corpus into")],
    images: Annotated[int, typer.Option(min=15, help="images per dataset")] = 40,
    base_url: Annotated[str | None, typer.Option(help="URL the folder will be served from; default local paths")] = None,
    seed: Annotated[int, typer.Option()] = 0,
    size: Annotated[int, typer.Option(min=16, help="image side in pixels")] = 64,
):
    """Write the synthetic corpus (every dataset in its published format) and its manifests."""
    from storage.synthetic import write_corpus

    corpus = write_corpus(out, images, base_url, seed, size)
    for name, manifest in corpus.manifests.items():
        typer.echo(f"ituning download {name} --manifest {manifest}")


def register(app: typer.Typer) -> None:
    app.command()(download)
    app.command()(synthetic)
    app.add_typer(catalog_app, name="catalog")
