"""From nothing on disk to a dataset's files, verified and unpacked, in the workspace layout.

The files of a manifest are fetched from the URLs (or local paths) it names; the images of an image
list only from URLs that storage.listed_urls allows, since the list itself was downloaded."""

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm

from storage.atomic import write_atomically
from storage.datasets import built_in_manifest
from storage.downloads import DownloadError, Ledger, RetryPolicy, check_free_space, fetch_verified
from storage.extract import check_entry_name, unpack
from storage.jsonfields import load_json, required
from storage.listed_urls import ListedUrls
from storage.manifests import (ImageList, Manifest, ManifestError, RemoteFile, load_manifest,
                               manifest_to_json, user_file)
from storage.workspace import data_dir, downloads_dir

RECORDED_MANIFEST = "manifest.json"  # beside verified.json: what the verified files were fetched from


@dataclass
class DownloadReport:
    dataset: str
    fetched: list[str] = field(default_factory=list)
    unpacked: list[str] = field(default_factory=list)
    images: int = 0
    failures: list[str] = field(default_factory=list)  # per-image failures; the rest went on


def download_dataset(manifest: Manifest, root: Path, policy: RetryPolicy = RetryPolicy(),
                     concurrency: int = 8, progress: bool = False, timeout_s: float = 30.0) -> DownloadReport:
    """Fetch, verify and unpack every file of `manifest`, then the images of its image lists."""
    folder, target = downloads_dir(root, manifest.dataset), data_dir(root, manifest.dataset)
    folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(folder)
    check_free_space(folder, list(manifest.files), ledger)
    report = DownloadReport(manifest.dataset)
    with httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True) as client:
        try:
            for remote in manifest.files:
                fetch_verified(client, remote, folder / remote.name, ledger, policy, progress)
                report.fetched.append(remote.name)
                ledger.save()
            record_manifest(folder, manifest)
        finally:
            ledger.save()
    for image_list in manifest.image_lists:
        rule = ListedUrls(next((remote.url for remote in manifest.files if remote.name == image_list.info), None))
        with httpx.Client(timeout=httpx.Timeout(timeout_s), follow_redirects=True, transport=rule.transport(),
                          event_hooks={"request": [rule.check_request]}) as client:
            _fetch_image_list(client, image_list, rule, folder, target, policy, concurrency, progress, report)
    for remote in manifest.files:
        if remote.should_unpack and unpack(folder / remote.name, target):
            report.unpacked.append(remote.name)
    return report


def choose_manifest(root: Path, dataset: str, manifest: Path | None = None, images: str | None = None) -> Manifest:
    """What to download: the manifest file given; else the manifest the workspace's verified download
    of this dataset came from, while every one of its files is still verified (a mirror or a
    synthetic corpus fetched earlier is reused, not fetched again from the built-in URLs); else the
    built-in one. `images` adds a file (an image archive given on request), in place of a file of
    the same name."""
    chosen = load_manifest(manifest) if manifest else recorded_manifest(root, dataset) or built_in_manifest(dataset)
    if chosen.dataset != dataset:
        raise ManifestError(f"{manifest}: describes {chosen.dataset!r}, not {dataset!r}")
    return chosen.with_file(user_file(images)) if images else chosen


def record_manifest(folder: Path, manifest: Manifest) -> None:
    write_atomically(folder / RECORDED_MANIFEST, json.dumps(manifest_to_json(manifest), indent=1))


def recorded_manifest(root: Path, dataset: str) -> Manifest | None:
    """The manifest of the dataset's last download in this workspace, if all its files are verified."""
    folder = downloads_dir(root, dataset)
    if not (folder / RECORDED_MANIFEST).is_file():
        return None
    recorded = load_manifest(folder / RECORDED_MANIFEST)
    ledger = Ledger(folder)
    current = recorded.dataset == dataset and all(ledger.is_current(remote, folder / remote.name)
                                                  for remote in recorded.files)
    return recorded if current else None


def image_list_files(info_path: Path, into: str) -> list[RemoteFile]:
    """One RemoteFile per image of a COCO-style image-info JSON (`images[].file_name`, `coco_url`),
    its name data/<dataset>/-relative; the URLs are not checked here (see storage.listed_urls)."""
    check_entry_name(info_path, into)
    remotes = []
    for index, image in enumerate(required(load_json(info_path), "images", list, info_path)):
        file_name = required(image, "file_name", str, info_path, f"images[{index}]")
        check_entry_name(info_path, file_name)  # the name becomes a path under data/<dataset>/
        remotes.append(RemoteFile(f"{into}/{file_name}", required(image, "coco_url", str, info_path, f"images[{index}]")))
    return remotes


def _fetch_image_list(client, image_list: ImageList, rule: ListedUrls, folder: Path, target: Path,
                      policy: RetryPolicy, concurrency: int, progress: bool, report: DownloadReport) -> None:
    """Fetch the images of one list; an image whose URL the rule refuses, or that fails, is a
    failure in the report and the others go on."""
    remotes = image_list_files(folder / image_list.info, image_list.into)
    image_folder = target / image_list.into
    image_folder.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(image_folder)

    def fetch_one(numbered: tuple[int, RemoteFile]) -> str | None:
        index, remote = numbered
        try:
            reason = rule.refusal(remote.url)
            if reason:
                return f"{image_list.info}: images[{index}].coco_url {remote.url!r} refused: {reason}"
            fetch_verified(client, remote, target / remote.name, ledger, policy)
            return None
        except (DownloadError, OSError) as error:
            return str(error)

    with ThreadPoolExecutor(max_workers=concurrency) as pool, \
            tqdm(total=len(remotes), unit="image", desc=image_list.into, disable=not progress) as bar:
        try:
            for done, error in enumerate(pool.map(fetch_one, enumerate(remotes)), 1):
                bar.update(1)
                if error:
                    report.failures.append(error)
                else:
                    report.images += 1
                if done % 500 == 0:  # an interrupted run keeps what it verified
                    ledger.save()
        finally:
            ledger.save()
