"""How the pipeline's tasks are cached across runs and which failures they retry.

A cached result must not outlive the files it names, so every cache key also carries the
workspace's identity (a random token written once into the workspace; a deleted and recreated
workspace gets a new one), the content of the run configuration the task reads, and what the
checkpoint or feature cache it is given holds now.

A workspace is relocatable: the identity travels with a copied or moved workspace, inputs are keyed
with the paths inside the workspace relative to it (WorkspaceInputs, in place of Prefect's INPUTS,
which would key on the absolute path), and tasks return those paths relative to it too
(`relative_result`), read back against the workspace the flow runs in. So a copy reuses every
finished task and its results name the copy's files, never the original's. Tasks that read catalog splits add the
catalog's current contents of those splits (CatalogContents): new images or captions, a split
prepared again or an image marked unusable make them, and the tasks after them, run again.

Persisted results are plain JSON (they are paths, ids, names and numbers): the result file holds the
task's return value and a metadata file under the result storage's metadata/ folder names how it was
written. Prefect decodes a stored result with whatever serializer its metadata names, pickle included,
so a result file planted in the workspace could run code on a cache hit. ResultMetadata reads a
record only when it names plain JSON and its result file parses as JSON; any other counts as missing,
and the task runs again and writes it anew.
"""

import hashlib
import json
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import requests
from prefect.cache_policies import TASK_SOURCE, CachePolicy
from prefect.utilities.hashing import hash_objects
from prefect.filesystems import LocalFileSystem
from prefect.serializers import JSONSerializer

from pipeline import data
from pipeline.presets import config_digest
from storage.downloads import DownloadError, TransientFailure
from storage.workspace import in_workspace, in_workspace_terms

IDENTITY_FILE = ".workspace-id"
PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The standard library's json with no hooks: no type named in a file is ever imported or built.
def exception_as_text(value) -> dict:
    """How a failed task's exception is kept: its type and message as JSON (never read back as code)."""
    if isinstance(value, BaseException):
        return {"exception": type(value).__name__, "message": str(value)}
    raise TypeError(f"a {type(value).__name__} is not plain JSON")


RESULT_SERIALIZER = JSONSerializer(object_encoder="tasks.caching.exception_as_text", object_decoder=None)
PLAIN_JSON = json.loads(RESULT_SERIALIZER.model_dump_json())  # as a record's metadata names it
_logger = logging.getLogger(__name__)


def workspace_identity(workspace: str | Path) -> str:
    """The workspace's random token, created on first use."""
    path = Path(workspace) / IDENTITY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
    return path.read_text().strip()


@dataclass
class WorkspaceState(CachePolicy):
    """Keys on the workspace's identity and, when the task reads one, the config file's content."""

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if "workspace" not in inputs:
            return None
        parts = [workspace_identity(inputs["workspace"])]
        if "config" in inputs:
            parts.append(config_digest(inputs["config"]))
        return hashlib.sha256("|".join(parts).encode()).hexdigest()


@dataclass
class WorkspaceInputs(CachePolicy):
    """Keys on the task's inputs (but `exclude`) as Prefect's INPUTS does, with every path inside
    the workspace relative to it: a copied or moved workspace keys its tasks as before."""

    exclude: tuple[str, ...] = ()

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        kept = {name: value for name, value in (inputs or {}).items() if name not in self.exclude}
        if not kept:
            return None
        if "workspace" in kept:
            kept = in_workspace_terms({name: _plain(value) for name, value in kept.items()}, kept["workspace"])
        return hash_objects(kept, raise_on_failure=True)


def _plain(value):
    """Paths as text, so that one spelled as a str or a Path keys alike."""
    return str(value) if isinstance(value, Path) else value


def relative_result(workspace: str | Path, result):
    """What a task returns, its paths inside the workspace relative to it (see the module docstring)."""
    return in_workspace_terms(result, workspace)


def in_this_workspace(workspace: str | Path, path: str | Path | None) -> str | None:
    """A path another task returned, in the workspace this run uses."""
    return None if path is None else str(in_workspace(path, workspace))


PATH_FIELDS = ("checkpoint", "captions_path")  # the paths in what training and evaluation return


def flow_result(workspace: str | Path, result):
    """A task's result as a flow hands it to its caller: its paths in the workspace this run uses
    (a feature cache's entry point, a training stage's checkpoint, an evaluation's captions)."""
    if isinstance(result, str):
        return in_this_workspace(workspace, result)
    if isinstance(result, dict):
        return {key: in_this_workspace(workspace, value) if key in PATH_FIELDS and value else value
                for key, value in result.items()}
    return result


@dataclass
class InputContents(CachePolicy):
    """Keys on what path inputs hold now, so a checkpoint trained again or a feature cache rebuilt
    at the same path does not pass for the old one."""

    names: tuple[str, ...] = ("checkpoint", "init_from", "previous", "features")

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        paths = [_path_of(value) for name in self.names for value in _as_list(inputs.get(name))]
        if not paths:
            return None
        if "workspace" in inputs:
            paths = [in_workspace(path, inputs["workspace"]) for path in paths]
        return hashlib.sha256("|".join(data.content_digest(path) for path in paths).encode()).hexdigest()


def the_split(inputs: dict[str, Any]) -> list:
    """The split a task names with its `dataset` and `split` inputs."""
    return [(inputs["dataset"], inputs["split"])]


@dataclass
class CatalogContents(CachePolicy):
    """Keys on the catalog's current contents of the (dataset, split) pairs that `splits` names from
    the task's inputs (by default its `dataset` and `split`); captions=False for a task that reads
    the images only."""

    splits: Callable[[dict[str, Any]], list] = the_split
    captions: bool = True

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        if "workspace" not in inputs:
            return None
        return data.catalog_fingerprint(inputs["workspace"], self.splits(inputs), self.captions)


def _path_of(value) -> str:
    """A path input, or the entry point of a finished feature cache ({"entry": path, ...})."""
    return value["entry"] if isinstance(value, dict) else value


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


def result_storage_path() -> Path:
    """Where Prefect keeps persisted results now (PREFECT_LOCAL_STORAGE_PATH, by default PREFECT_HOME/storage)."""
    from prefect.settings import get_current_settings

    return Path(get_current_settings().results.local_storage_path).expanduser().resolve()


class ResultMetadata(LocalFileSystem):
    """The metadata of persisted results, in metadata/ under the result storage path; a record that does
    not name RESULT_SERIALIZER, or whose local result file is not JSON, reads as missing."""

    _block_type_name = "ituning result metadata"  # not Local File System's: that name stays its own

    def _resolve_path(self, path: str) -> Path:
        return LocalFileSystem(basepath=str(result_storage_path() / "metadata"))._resolve_path(path)

    def read_path(self, path: str, **_) -> bytes:
        return checked_record(path, super().read_path(path, _sync=True))

    async def aread_path(self, path: str) -> bytes:
        return checked_record(path, await super().aread_path(path))


def checked_record(path: str, content: bytes) -> bytes:
    """`content` when it is the metadata of a plain JSON result; ValueError otherwise. A record
    naming its result file where a copied or moved workspace's result storage used to be names the
    file of that name in the storage now."""
    try:
        metadata = json.loads(content)
        result = Path(metadata["storage_key"])
        moved = result.is_absolute() and result_storage_path() not in result.resolve().parents
        if moved and (result_storage_path() / result.name).is_file():
            result = result_storage_path() / result.name
            metadata["storage_key"] = str(result)
            content = json.dumps(metadata).encode()
        plain_json = metadata["serializer"] == PLAIN_JSON and (not result.is_absolute() or is_json_result(result))
    except (ValueError, KeyError, TypeError, OSError):
        plain_json = False
    if not plain_json:
        _logger.warning("Cached result %s is not a plain JSON record; ignored, the task runs again", path)
        raise ValueError(f"cached result {path} is not a plain JSON record")
    return content


def is_json_result(result: Path) -> bool:
    """A regular file under the result storage path that parses as JSON (the local result a record names)."""
    if result_storage_path() not in result.resolve().parents or not result.is_file():
        return False
    json.loads(result.read_bytes())
    return True


# Every task that persists its result: JSON, read back only through ResultMetadata.
PERSISTED = dict(persist_result=True, result_serializer=RESULT_SERIALIZER)


def expensive(exclude: tuple[str, ...] = ()) -> CachePolicy:
    """The policy of an expensive task: its inputs (but `exclude`), code, workspace and what its inputs hold."""
    return (WorkspaceInputs(exclude=exclude) + TASK_SOURCE + WorkspaceState() + InputContents()).configure(
        key_storage=ResultMetadata())


EXPENSIVE = expensive()

TRANSIENT = (httpx.TransportError, requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)
# MLflow's REST client gives up with an MlflowException carrying one of these.
TRANSIENT_MESSAGES = ("Max retries exceeded", "Connection refused", "Read timed out")


def is_transient(exception: BaseException) -> bool:
    """Connection cuts, timeouts and server-side (5xx) answers; never a 4xx or a bad file."""
    if isinstance(exception, DownloadError):  # already retried with back-off inside the download
        return False
    if isinstance(exception, TRANSIENT):
        return True
    if isinstance(exception, httpx.HTTPStatusError):
        return exception.response.status_code >= 500
    if isinstance(exception, TransientFailure):
        return True
    return any(message in str(exception) for message in TRANSIENT_MESSAGES)


def retry_transient(task, task_run, state) -> bool:
    """retry_condition_fn for I/O tasks: retry only when the failure was transient."""
    try:
        state.result()
    except BaseException as exception:  # the task's own exception is re-raised here
        return is_transient(exception)
    return False
