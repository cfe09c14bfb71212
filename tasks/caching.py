"""How the pipeline's tasks are cached across runs and which failures they retry.

A cached result must not outlive the files it names, so every cache key also carries the
workspace's identity (a random token written once into the workspace; a deleted and recreated
workspace gets a new one), the content of the run configuration the task reads, and what the
checkpoint or feature cache it is given holds now. Tasks that read catalog splits add the
catalog's current contents of those splits (CatalogContents): new images or captions, a split
prepared again or an image marked unusable make them, and the tasks after them, run again.
"""

import hashlib
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import httpx
import requests
from prefect.cache_policies import INPUTS, TASK_SOURCE, CachePolicy

from storage import stages
from storage.downloads import DownloadError, TransientFailure

IDENTITY_FILE = ".workspace-id"
PROJECT_ROOT = Path(__file__).resolve().parent.parent


def workspace_identity(workspace: str | Path) -> str:
    """The workspace's random token, created on first use."""
    path = Path(workspace) / IDENTITY_FILE
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(secrets.token_hex(16))
    return path.read_text().strip()


def config_path(config: str) -> Path:
    """A preset name (`demo`, `coco-gpt2`) or a path to a YAML file."""
    candidate = Path(config)
    if candidate.suffix in (".yaml", ".yml") and candidate.exists():
        return candidate.resolve()
    return PROJECT_ROOT / "configs" / f"{config}.yaml"


def config_digest(config: str) -> str:
    path = config_path(config)
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else "missing"


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
class InputContents(CachePolicy):
    """Keys on what path inputs hold now, so a checkpoint trained again or a feature cache rebuilt
    at the same path does not pass for the old one."""

    names: tuple[str, ...] = ("checkpoint", "init_from", "previous", "features")

    def compute_key(self, task_ctx, inputs: dict[str, Any], flow_parameters: dict[str, Any], **kwargs) -> str | None:
        paths = [path for name in self.names for path in _as_list(inputs.get(name))]
        if not paths:
            return None
        return hashlib.sha256("|".join(stages.content_digest(path) for path in paths).encode()).hexdigest()


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
        return stages.catalog_fingerprint(inputs["workspace"], self.splits(inputs), self.captions)


def _as_list(value) -> list:
    return [] if value is None else list(value) if isinstance(value, (list, tuple)) else [value]


EXPENSIVE = INPUTS + TASK_SOURCE + WorkspaceState() + InputContents()

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
