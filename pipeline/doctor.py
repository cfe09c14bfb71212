"""What `ituning doctor` checks: the machine, the environment and the fast paths, one row per item.

A row is (item, status, detail). Status `fail` marks what the main job (`ituning pipeline`: train,
evaluate with the caption metrics, track) cannot run without: the Python packages it imports, Java
for METEOR, a workspace it can write, and the MLflow and Prefect servers when they are configured.
`warn` is what runs with less (no SPICE without CoreNLP, a fast path that falls back to the plain
path); `info` is what is only reported (versions, a GPU or none, offline mode).
"""

import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
from dataclasses import asdict, dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

OK, INFO, WARN, FAIL = "ok", "info", "warn", "fail"
PACKAGES = {"transformers": "transformers", "open_clip": "open_clip_torch", "prefect": "prefect", "mlflow": "mlflow",
            "duckdb": "duckdb"}
SERVER_TIMEOUT_S = 3


@dataclass(frozen=True)
class Row:
    item: str
    status: str
    detail: str


def package_rows() -> list[Row]:
    rows = [Row("python", INFO, f"{sys.version.split()[0]} ({sys.executable})")]
    for name, distribution in PACKAGES.items():
        try:
            rows.append(Row(name, INFO, version(distribution)))
        except PackageNotFoundError:
            rows.append(Row(name, FAIL, f"not installed: `make install` (or pip install {distribution})"))
    return rows


def torch_rows() -> list[Row]:
    """torch, CUDA, the driver and the GPU (a machine without one is fine: the pipeline runs on the CPU)."""
    import torch

    rows = [Row("torch", INFO, torch.__version__),
            Row("cuda", INFO, f"CUDA {torch.version.cuda} build" if torch.version.cuda else "CPU-only build")]
    rows.append(Row("driver", INFO, _driver_version() or "no NVIDIA driver (nvidia-smi not found)"))
    if not torch.cuda.is_available():
        rows.append(Row("gpu", INFO, "none visible to torch: training and evaluation run on the CPU"))
        return rows
    for index in range(torch.cuda.device_count()):
        properties = torch.cuda.get_device_properties(index)
        rows.append(Row(f"gpu {index}", OK, f"{properties.name}, {properties.total_memory / 2**30:.1f} GiB"))
    return rows


def _driver_version() -> str:
    if not shutil.which("nvidia-smi"):
        return ""
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as error:
        return f"nvidia-smi failed: {error}"
    return done.stdout.strip().splitlines()[0] if done.returncode == 0 and done.stdout.strip() else \
        f"nvidia-smi failed: {done.stderr.strip()[:200]}"


def java_rows() -> list[Row]:
    """Java for METEOR (and SPICE), and SPICE's Stanford CoreNLP jars."""
    from ituning.evaluation import CORENLP_JARS, spice_available, spice_library_dir

    java = shutil.which("java")
    if java is None:
        rows = [Row("java", FAIL, "not on PATH: the caption metrics (METEOR, SPICE) need Java; install a JRE "
                                  "(e.g. apt-get install default-jre-headless)")]
    else:
        try:
            done = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=20)
            first = (done.stderr or done.stdout).strip().splitlines()[0]
            rows = [Row("java", OK if done.returncode == 0 else FAIL, f"{first} ({java})")]
        except (OSError, subprocess.TimeoutExpired, IndexError) as error:
            rows = [Row("java", FAIL, f"{java} -version failed: {error}")]
    try:
        spice = Row("spice corenlp", OK, f"{spice_library_dir()}") if spice_available() else \
            Row("spice corenlp", WARN, f"{' and '.join(CORENLP_JARS)} missing in {spice_library_dir()}: "
                                       "SPICE is left out of the scores")
    except RuntimeError as error:  # pycocoevalcap missing
        spice = Row("spice corenlp", FAIL, str(error))
    return [*rows, spice]


def hugging_face_rows() -> list[Row]:
    home = Path(os.environ.get("HF_HOME") or Path.home() / ".cache" / "huggingface")
    cache = Path(os.environ.get("HF_HUB_CACHE") or home / "hub")
    models = sorted(path.name[len("models--"):].replace("--", "/") for path in cache.glob("models--*")) \
        if cache.is_dir() else []
    held = f"{len(models)} model(s): {', '.join(models[:6])}{' ...' if len(models) > 6 else ''}" if models else \
        "empty: real backbones are downloaded on first use"
    offline = os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0", "false", "False")
    return [Row("hf cache", INFO, f"{cache}: {held}"),
            Row("hf offline", INFO, "on (HF_HUB_OFFLINE): only cached backbones load" if offline else
                "off: backbones missing from the cache are downloaded")]


def workspace_rows(workspace: str | Path | None) -> list[Row]:
    from storage.workspace import catalog_path, workspace_root

    root = workspace_root(workspace).resolve()
    existing = next(folder for folder in (root, *root.parents) if folder.exists())
    if not os.access(existing, os.W_OK):
        return [Row("workspace", FAIL, f"{root}: {existing} is not writable")]
    state = "catalog built" if catalog_path(root).is_file() else "no catalog yet" if root.exists() else \
        "will be created"
    return [Row("workspace", OK, f"{root} ({state})")]


def tracking_rows(workspace: str | Path | None) -> list[Row]:
    """The MLflow tracking URI (reachable when it is a server) and the Prefect API (when configured)."""
    from pipeline.tracking import tracking_uri

    uri = tracking_uri(workspace)
    rows = [_server_row("mlflow tracking", uri, "/health") if uri.startswith("http") else
            Row("mlflow tracking", OK, f"{uri} (local store, no server)")]
    prefect = os.environ.get("PREFECT_API_URL", "")
    rows.append(_server_row("prefect api", prefect, "/health") if prefect else
                Row("prefect api", INFO, "PREFECT_API_URL not set: flows run with a temporary local server"))
    return rows


def _server_row(name: str, url: str, health: str) -> Row:
    try:
        with urllib.request.urlopen(url.rstrip("/") + health, timeout=SERVER_TIMEOUT_S) as response:
            return Row(name, OK, f"{url} answers (HTTP {response.status})")
    except Exception as error:  # noqa: BLE001 (refused, timed out, an HTTP error: all mean unreachable)
        reason = getattr(error, "reason", None) or error
        return Row(name, FAIL, f"{url} unreachable: {reason}")


def fast_path_rows(device: str) -> list[Row]:
    """Each fast path: on here or not (why), and the outcome of its check on a tiny model."""
    import torch

    from ituning.captioner import resolve_device
    from pipeline.fast_path_checks import availability, self_check

    resolved = torch.device(resolve_device(device))
    reasons = availability(resolved)
    with tempfile.TemporaryDirectory(prefix="ituning-doctor-") as folder:
        try:
            checked, failure = self_check(resolved, Path(folder)), ""
        except Exception as error:  # noqa: BLE001 (the check itself broke: show it, as a bug report needs)
            checked, failure = {}, f"{type(error).__name__}: {error}"
    rows = []
    for name, reason in reasons.items():
        if reason:
            rows.append(Row(f"fast path {name}", INFO, f"off here: {reason}"))
        elif failure:
            rows.append(Row(f"fast path {name}", WARN, f"self-check could not run: {failure[:300]}"))
        elif checked.get(name) == "on":
            rows.append(Row(f"fast path {name}", OK, f"on ({resolved}); self-check on a tiny model passed"))
        else:
            outcome = checked.get(name, "not reached")
            rows.append(Row(f"fast path {name}", WARN, f"falls back to the plain path: {outcome}"))
    return rows


def diagnose(workspace: str | Path | None = None, device: str = "auto") -> list[Row]:
    sections = [(package_rows,), (torch_rows,), (java_rows,), (hugging_face_rows,), (workspace_rows, workspace),
                (tracking_rows, workspace), (fast_path_rows, device)]
    return [row for function, *arguments in sections for row in _section(function, *arguments)]


def _section(function, *arguments) -> list[Row]:
    """A section's rows; one failing row where a package it needs cannot be imported."""
    try:
        return function(*arguments)
    except ImportError as error:
        return [Row(function.__name__.removesuffix("_rows").replace("_", " "), FAIL, f"cannot import: {error}")]


def ready(rows: list[Row]) -> bool:
    """Whether the main job can run here: no row failed."""
    return not any(row.status == FAIL for row in rows)


def as_table(rows: list[Row]) -> str:
    width = max(len(row.item) for row in rows)
    return "\n".join(f"{row.item:<{width}}  {row.status:<4}  {row.detail}" for row in rows)


def as_dicts(rows: list[Row]) -> list[dict]:
    return [asdict(row) for row in rows]
