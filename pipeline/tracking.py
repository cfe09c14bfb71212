"""MLflow tracking of pipeline runs: a parent run per pipeline run, a child run per stage.

Runs are addressed by id through one MlflowClient (no global "active run"), so a step running in
another thread or process logs to the right run. The store is SQLite in the workspace
(workspace/mlflow.db, artifacts in workspace/mlartifacts) unless MLFLOW_TRACKING_URI or the
`uri` argument names another (a server, PostgreSQL, ...). What a tracking server does not take while
it is down waits in the workspace's outbox (pipeline/tracking_outbox.py) and is sent when it answers.
"""

import contextlib
import io
import json
import logging
import math
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Mapping
from contextlib import contextmanager
from dataclasses import asdict, is_dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from mlflow.entities import RunStatus
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ituning.version import code_version
from pipeline import tracking_outbox
from pipeline.tracking_outbox import Outbox
from pipeline.mlflow_store import follow_moved_workspace
from storage.workspace import workspace_root

EXPERIMENT = "ituning"
log = logging.getLogger(__name__)
PARENT_TAG = "mlflow.parentRunId"
STEP_TAG = "ituning.step"  # every child run: the pipeline step it records
STAGE_TAG = "ituning.stage"  # a training stage's child run: the stage's name in the config
MAX_PARAM_LENGTH = 6000  # MLflow's limit on a parameter value
BATCH = 100  # MLflow's limit on parameters per log_batch call
MODEL_CODE = Path(__file__).with_name("captioner_model.py")
URI_VARIABLES = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
MODEL_REQUIREMENTS = ("torch", "transformers", "open_clip_torch", "safetensors", "pillow", "mlflow", "numpy")


def tracking_uri(workspace: str | Path | None = None) -> str:
    """$MLFLOW_TRACKING_URI when set, else SQLite in the workspace."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    root = workspace_root(workspace).resolve()
    root.mkdir(parents=True, exist_ok=True)
    follow_moved_workspace(root / "mlflow.db")  # a copied or moved workspace keeps its own artifacts
    return f"sqlite:///{root / 'mlflow.db'}"


def flatten(config, prefix: str = "") -> dict[str, str]:
    """Nested dicts/dataclasses as {"a.b.c": "value"}; lists and other values as JSON text."""
    if is_dataclass(config) and not isinstance(config, type):
        config = asdict(config)
    if not isinstance(config, Mapping):
        text = config if isinstance(config, str) else json.dumps(config, default=str)
        return {prefix: text}
    flat = {}
    for key, value in config.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def flatten_metrics(scores: Mapping, prefix: str = "") -> dict[str, float]:
    """{"overall": {"CIDEr": 1.1}} -> {"<prefix>/overall/CIDEr": 1.1}."""
    flat = {}
    for key, value in scores.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        flat.update(flatten_metrics(value, name) if isinstance(value, Mapping) else {name: float(value)})
    return flat


class ExperimentTracker:
    """Pipeline runs and their steps' child runs, in one experiment of one tracking store."""

    def __init__(self, uri: str | None = None, experiment: str = EXPERIMENT, workspace: str | Path | None = None):
        self.uri = uri or tracking_uri(workspace)
        self.workspace = workspace_root(workspace)
        self.experiment = experiment
        self.outbox = None  # a local store is always there; a server may not answer
        if tracking_outbox.is_remote(self.uri):
            tracking_outbox.use_server_settings()
            self.outbox = Outbox(self.workspace, self.uri, experiment)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.uri)
        self.experiment_id = self._experiment_id()

    def _experiment_id(self) -> str | None:
        """The experiment's id, created if new; None while the server is unreachable."""
        if self.outbox is not None and not self.outbox.worth_trying():
            return None
        try:
            found = self.client.get_experiment_by_name(self.experiment)
        except MlflowException as error:
            if self.outbox is None or not tracking_outbox.unreachable(error):
                raise
            self.outbox.went_offline(error)
            return None
        if found is not None:
            return found.experiment_id
        location = None
        if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in the current folder
            location = (Path(self.uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    def _deliver(self, call: str, run_id: str, **arguments):
        """One write to the store, through the outbox when the store is a server."""
        if self.outbox is None:
            return tracking_outbox.send(self.client, call, run_id, arguments, self.workspace)
        return self.outbox.deliver(self.client, call, run_id, **arguments)

    def _create_run(self, run_name: str, tags: dict[str, str]) -> str:
        tags = {**tags, **tracking_outbox.process_tags(self.workspace)}
        return self._deliver("create_run", "", experiment=self.experiment, experiment_id=self.experiment_id,
                             run_name=run_name, tags=tags, start_time=_now_ms())

    def catch_up(self) -> None:
        """Before a pipeline run: send what an earlier run left in the outbox, then end as FAILED the
        runs of this workspace that a dead process left RUNNING. Nothing, while the server is down."""
        try:
            if self.outbox is not None and self.outbox.pending():
                self.outbox.send_pending()
            if self.experiment_id is None:
                self.experiment_id = self._experiment_id()
            if self.experiment_id is not None:
                waiting = self.outbox.waiting_runs() if self.outbox is not None else set()
                tracking_outbox.end_abandoned_runs(self.client, self.experiment_id, self.workspace, waiting)
        except MlflowException as error:
            if self.outbox is None or not tracking_outbox.unreachable(error):
                raise
            self.outbox.went_offline(error)

    def server_run_id(self, run_id: str) -> str:
        """The server's id of a run, once what waits in the outbox is sent (a run created while the
        server was down has a local id until then). Raises MlflowException while it is unreachable."""
        if self.outbox is None:
            return run_id
        if not self.outbox.worth_trying():
            raise tracking_outbox.StillUnreachable(f"{self.uri} was unreachable moments ago")
        if self.outbox.pending():
            self.outbox.send_pending()
        return self.outbox.server_id(run_id)

    def pending_summary(self) -> str | None:
        """What still waits for the server, in words, after one more try to send it; None if nothing."""
        if self.outbox is None or self.outbox.nothing_waits():
            return None
        try:
            if self.outbox.pending():
                self.outbox.send_pending()
        except MlflowException as error:
            if not tracking_outbox.unreachable(error):
                raise
        return self.outbox.summary()

    # ---- runs --------------------------------------------------------------------------------

    def start_pipeline(self, name: str, config=None, seed: int | None = None) -> str:
        """A parent run with the whole resolved config, the code version and the seed as params."""
        self.catch_up()
        run_id = self._create_run(name, {"ituning.code_version": code_version()})
        params = {**flatten(config or {}), "code_version": code_version()}
        if seed is not None:
            params["seed"] = str(seed)
        self.log_params(run_id, params)
        return run_id

    def start_step(self, parent_run_id: str, step: str, config=None, stage: str | None = None) -> str:
        """A child run of the pipeline run, for one step (a training stage, an evaluation ...);
        `stage` names the training stage the step trains, if it does."""
        tags = {PARENT_TAG: parent_run_id, STEP_TAG: step, **({STAGE_TAG: stage} if stage else {})}
        run_id = self._create_run(step, tags)
        self.log_params(run_id, {**flatten(config or {}), "code_version": code_version()})
        return run_id

    def finish(self, run_id: str, failed: bool = False) -> None:
        """End a run, tagged with the fast paths of this process (`log_fast_paths`)."""
        self.log_fast_paths(run_id)
        status = RunStatus.to_string(RunStatus.FAILED if failed else RunStatus.FINISHED)
        self._deliver("set_terminated", run_id, status=status, end_time=_now_ms())

    @contextmanager
    def pipeline_run(self, name: str, config=None, seed: int | None = None):
        run_id = self.start_pipeline(name, config, seed)
        with self._finishing(run_id):
            yield run_id

    @contextmanager
    def step_run(self, parent_run_id: str, step: str, config=None, stage: str | None = None):
        run_id = self.start_step(parent_run_id, step, config, stage)
        with self._finishing(run_id):
            yield run_id

    @contextmanager
    def _finishing(self, run_id: str):
        try:
            yield
        except BaseException:
            self.finish(run_id, failed=True)
            raise
        self.finish(run_id)

    # ---- values ------------------------------------------------------------------------------

    def log_fast_paths(self, run_id: str) -> None:
        """Which fast paths ran in this process (ituning/fast_paths.py) as tags: `fast_path.<name>`
        is on or fallback, and `fallback.<name>` the reason a path fell back to the plain one."""
        from ituning.fast_paths import fallbacks, outcomes

        reasons = fallbacks()
        for name in outcomes():
            self.set_tag(run_id, f"fast_path.{name}", "fallback" if name in reasons else "on")
        for name, reason in reasons.items():
            self.set_tag(run_id, f"fallback.{name}", reason)

    def log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        entries = [(key, str(value)[:MAX_PARAM_LENGTH]) for key, value in params.items()]
        for start in range(0, len(entries), BATCH):
            self._deliver("log_batch", run_id, params=entries[start : start + BATCH])

    def log_metrics(self, run_id: str, metrics: Mapping[str, float], step: int = 0) -> None:
        timestamp = _now_ms()  # kept with the values: a batch sent twice is stored once
        entries = [(key, float(value), timestamp, step) for key, value in metrics.items()
                   if value is not None and not (isinstance(value, float) and math.isnan(value))]
        for start in range(0, len(entries), 1000):
            self._deliver("log_batch", run_id, metrics=entries[start : start + 1000])

    def set_tag(self, run_id: str, key: str, value: str) -> None:
        self._deliver("set_tag", run_id, key=key, value=str(value))

    def log_artifact(self, run_id: str, local_path: str | Path, artifact_path: str | None = None) -> None:
        """A file, or a folder's files, under `artifact_path`."""
        self._deliver("log_artifact", run_id, local_path=str(Path(local_path).absolute()), artifact_path=artifact_path)

    def log_dataset(self, run_id: str, name: str, fingerprint: str, source: str | Path,
                    context: str = "training", images: int | None = None) -> None:
        """Record what a run read: name (e.g. "coco/train"), the image-list fingerprint and its source."""
        from mlflow.data.dataset_source_registry import resolve_dataset_source

        with warnings.catch_warnings():  # two registered local sources claim a plain path; both are the same
            warnings.simplefilter("ignore", UserWarning)
            data_source = resolve_dataset_source(str(source))
        profile = json.dumps({"images": images}) if images is not None else None
        dataset = {"name": name, "digest": fingerprint[:16], "source_type": data_source._get_source_type(),
                   "source": data_source.to_json(), "profile": profile}
        self._deliver("log_inputs", run_id, datasets=[{"dataset": dataset, "tags": [["mlflow.data.context", context]]}])
        self.log_params(run_id, {f"data.{context}.{name}.fingerprint": fingerprint})

    # ---- artifacts ---------------------------------------------------------------------------

    def log_checkpoint(self, run_id: str, checkpoint: str | Path, artifact_path: str = "checkpoint") -> None:
        """The module weights and adapter_config.json (other files of a resume checkpoint stay out);
        the config also becomes params under "adapter."."""
        checkpoint = Path(checkpoint)
        adapter_files = [checkpoint / WEIGHTS_FILE, checkpoint / CONFIG_FILE]
        if checkpoint.is_file() or not all(path.is_file() for path in adapter_files):
            self.log_artifact(run_id, checkpoint, artifact_path)
            return
        for path in adapter_files:
            self.log_artifact(run_id, path, artifact_path)
        self.log_params(run_id, flatten(json.loads(adapter_files[1].read_text()), "adapter"))

    def log_json(self, run_id: str, value, artifact_file: str) -> None:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / Path(artifact_file).name
            path.write_text(json.dumps(value, indent=2, ensure_ascii=False))
            self.log_artifact(run_id, path, str(Path(artifact_file).parent).strip(".") or None)

    def log_evaluation(self, run_id: str, split: str, captions: Mapping[str, str], scores: Mapping,
                       gallery: str | Path | None = None, heatmaps: str | Path | None = None) -> None:
        """Scores as metrics "<split>/<metric>" (or "<split>/<domain>/<metric>") and as
        metrics/<split>.json, captions as captions/<split>.json, the gallery and heatmap folders."""
        self.log_metrics(run_id, flatten_metrics(scores, split))
        self.log_json(run_id, dict(scores), f"metrics/{split}.json")
        self.log_json(run_id, dict(sorted(captions.items())), f"captions/{split}.json")
        if gallery is not None:
            self.log_artifact(run_id, gallery, f"gallery/{split}")
        if heatmaps is not None:
            self.log_artifact(run_id, heatmaps, f"heatmaps/{split}")

    def callbacks(self, run_id: str, log_every: int = 1) -> "MLflowTrainingCallbacks":
        return MLflowTrainingCallbacks(self, run_id, log_every)

    # ---- the servable model ------------------------------------------------------------------

    def log_captioner_model(self, run_id: str, checkpoint: str | Path, registered_name: str | None = None,
                            decoding=None, accept_file_paths: bool = False) -> str:
        """Log the captioner as a pyfunc model (models from code) with the checkpoint and its local
        backbones as artifacts; register it under `registered_name`. Returns the model URI."""
        import mlflow
        from mlflow.models import ModelSignature
        from mlflow.types import ColSpec, Schema

        # MLflow also logs these as run params: "serving_device" keeps clear of the run's own "device".
        settings = {"decoding": flatten_decoding(decoding), "accept_file_paths": accept_file_paths,
                    "serving_device": "auto", "max_request_mb": 20, "max_request_megapixels": 200}
        signature = ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema([ColSpec("string")]))
        with tempfile.TemporaryDirectory() as staging:
            artifacts = bundled_artifacts(Path(checkpoint), Path(staging))
            with fluent_store(self.uri), _status_kept(self.client, run_id), _stderr_to_log(), \
                    mlflow.start_run(run_id=run_id, nested=True):
                info = mlflow.pyfunc.log_model(
                    name="model", python_model=str(MODEL_CODE), artifacts=artifacts, model_config=settings,
                    code_paths=[str(Path(__file__).parents[1] / "ituning")], signature=signature,
                    pip_requirements=pinned_requirements(), registered_model_name=registered_name,
                )
        return f"runs:/{run_id}/model" if info.run_id == run_id else info.model_uri


class MLflowTrainingCallbacks:
    """The training loop's callbacks (on_step, on_epoch, on_plan, on_checkpoint) writing to one run."""

    def __init__(self, tracker: ExperimentTracker, run_id: str, log_every: int = 1):
        self.tracker = tracker
        self.run_id = run_id
        self.log_every = max(1, log_every)

    def on_step(self, step: int, metrics: dict) -> None:
        """Per-step values (loss, learning rate, throughput) under their own names."""
        if step % self.log_every == 0:
            self.tracker.log_metrics(self.run_id, metrics, step)

    def on_epoch(self, epoch: int, metrics: dict) -> None:
        """Per-epoch values (e.g. validation CIDEr) as "epoch/<name>", stepped by epoch."""
        self.tracker.log_metrics(self.run_id, {f"epoch/{key}": value for key, value in metrics.items()}, epoch)

    def on_plan(self, stage: str, settings: dict) -> None:
        """How a stage runs on this machine (a micro-batch chosen by `auto`, ...), as tags: a resumed
        run on another machine may choose differently."""
        for key, value in settings.items():
            self.tracker.set_tag(self.run_id, f"plan.{stage}.{key}", str(value))

    def on_checkpoint(self, path) -> None:
        self.tracker.log_checkpoint(self.run_id, path, f"checkpoints/{Path(path).name}")


def flatten_decoding(decoding) -> dict:
    if decoding is None:
        return {}
    return asdict(decoding) if is_dataclass(decoding) else dict(decoding)


def bundled_artifacts(checkpoint: Path, staging: Path) -> dict[str, str]:
    """The checkpoint's adapter files plus every backbone it names by local path."""
    from ituning.backbones import LOCAL_DIR
    from ituning.checkpoint import backbones_of, read_config

    from pipeline import captioner_model as names

    backbones = backbones_of(read_config(checkpoint), checkpoint).to_dict()
    adapter = staging / "checkpoint"
    adapter.mkdir()
    for file_name in (WEIGHTS_FILE, CONFIG_FILE):
        shutil.copyfile(checkpoint / file_name, adapter / file_name)
    artifacts = {names.CHECKPOINT: str(adapter)}
    vision, weights, language = backbones["vision_model"], backbones["vision_pretrained"], backbones["language_model"]
    local = {
        names.VISION_FOLDER: vision[len(LOCAL_DIR) :] if vision.startswith(LOCAL_DIR) else None,
        names.VISION_WEIGHTS: weights if weights and Path(weights).is_file() else None,
        names.LANGUAGE_FOLDER: language if Path(language).is_dir() else None,
    }
    for key, path in local.items():
        if path is not None:  # staged under its role's name: MLflow names artifacts by base name
            artifacts[key] = str(_stage(Path(path), staging / (key + Path(path).suffix * Path(path).is_file())))
    return artifacts


def _stage(source: Path, target: Path) -> Path:
    """Hard links where possible (backbones can be gigabytes), copies across file systems."""
    def link_or_copy(from_path, to_path):
        try:
            os.link(from_path, to_path)
        except OSError:
            shutil.copy2(from_path, to_path)

    if source.is_dir():
        shutil.copytree(source, target, copy_function=link_or_copy)
    else:
        link_or_copy(source, target)
    return target


def pinned_requirements() -> list[str]:
    """The serving environment's packages at the versions installed here (no inference run)."""
    pins = []
    for package in MODEL_REQUIREMENTS:
        try:
            pins.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            pins.append(package)
    return pins


@contextmanager
def fluent_store(uri: str):
    """Point MLflow's module-level API at this store for the block only. What was set before is put
    back as it was, an unset URI as unset: putting back what get_tracking_uri() and get_registry_uri()
    answered would pin MLflow's default (./mlflow.db of the working folder) for every later client,
    registry lookups included. Setting a URI also sets its environment variable, which tracking_uri()
    reads: those are put back as they were too."""
    import mlflow
    from mlflow.tracking._model_registry import utils as registry_settings
    from mlflow.tracking._tracking_service import utils as tracking_settings

    # MLflow keeps what was set in these module variables (None: unset); it has no public getter for them.
    saved = tracking_settings._tracking_uri, registry_settings._registry_uri
    saved_environment = {name: os.environ.get(name) for name in URI_VARIABLES}
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved[0])
        mlflow.set_registry_uri(saved[1])
        for name, value in saved_environment.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


@contextmanager
def _stderr_to_log():
    """MLflow prints "Successfully registered model ..." on stderr: into the log at INFO instead."""
    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    for line in captured.getvalue().splitlines():
        if line.strip():
            log.info("%s", line.strip())


@contextmanager
def _status_kept(client: MlflowClient, run_id: str):
    """mlflow.start_run(run_id=...) ends the run on exit; give it back the status it had."""
    status = client.get_run(run_id).info.status
    yield
    client.update_run(run_id, status=status)


def _now_ms() -> int:
    return int(time.time() * 1000)


def start_pipeline_run(workspace: Path, name: str, parameters: dict) -> str:
    """A parent run with the pipeline's parameters (and its seed, when they hold one); its id."""
    tracker = ExperimentTracker(workspace=workspace)
    return tracker.start_pipeline(name, parameters, parameters.get("seed"))


REUSED_TAG = "ituning.reused"  # on a pipeline run in which nothing ran: every step was reused


def finish_pipeline_run(workspace: Path, run_id: str, failed: bool = False, all_reused: bool = False) -> str | None:
    """End the pipeline's run. `all_reused`: nothing ran and no new weights were registered; the run
    is tagged so (ituning.reused = true, with a note), so that it can be told from, or filtered out
    among, the runs that did work: `tags.ituning.reused != 'true'`. Returns, and logs as a warning,
    what still waits in the outbox for the tracking server (None when nothing does)."""
    tracker = ExperimentTracker(workspace=workspace)
    if all_reused and not failed:
        tracker.set_tag(run_id, REUSED_TAG, "true")
        tracker.set_tag(run_id, "mlflow.note.content", "Nothing ran: every step was reused from an earlier "
                        "run with the same inputs, and the registry already held these weights.")
    tracker.finish(run_id, failed)
    waiting = tracker.pending_summary()
    if waiting:
        log.warning("%s", waiting)
    return waiting
