"""The model registry: a trained captioner registered as a version of a model, once per set of
weights, and the champion alias moved only to a better score on the same task.

A registration that finds the tracking server unreachable waits in the workspace's outbox with the
evaluation its champion comparison needs; the pipeline goes on and says so. It is sent before the
next registration of the workspace, or by `ituning sync`.
"""

from dataclasses import dataclass
from pathlib import Path

from ituning.checkpoint import WEIGHTS_FILE
from pipeline.step_locks import registry_writer
from pipeline.tracking import ExperimentTracker
from pipeline.tracking_outbox import Outbox, unreachable
from storage.downloads import file_checksum
from storage.workspace import in_workspace, in_workspace_terms

CHAMPION = "champion"
WEIGHTS_TAG = "ituning.weights_sha256"  # on every version: the sha256 of its module weights file


def register_captioner(workspace: Path, checkpoint: str, run_id: str, name: str = "ituning-captioner") -> dict:
    """Log the captioner as a pyfunc model under `run_id` and register it as a new version of
    `name`, unless a version with the same weights exists: then that version is the answer and
    nothing is logged (`new_version` says which). One registration of `name` at a time per workspace:
    a second one waits for the first, then finds its version. While the tracking server is
    unreachable the registration waits in the outbox: `version` is None and `waiting` its id."""
    tracker = ExperimentTracker(workspace=workspace)
    try:
        register_waiting(workspace)
        with registry_writer(workspace, name):
            return _register_unless_held(tracker, checkpoint, tracker.server_run_id(run_id), name)
    except Exception as error:
        if tracker.outbox is None or not unreachable(error):
            raise
        tracker.outbox.went_offline(error)
    waiting = tracker.outbox.keep_registration(
        {"name": name, "checkpoint": str(in_workspace_terms(str(checkpoint), workspace)), "run_id": run_id})
    return {"name": name, "version": None, "model_uri": None, "new_version": True, "waiting": waiting}


def register_waiting(workspace: Path) -> list[str]:
    """Send the registrations that waited for the tracking server, oldest first, each with its
    champion comparison; what was done, in words. Raises while the server is unreachable."""
    done = []
    for entry in Outbox(workspace, "", "").waiting_registrations():
        tracker = ExperimentTracker(uri=entry["uri"], workspace=workspace)
        checkpoint = str(in_workspace(entry["checkpoint"], workspace))
        with registry_writer(workspace, entry["name"]):
            model = _register_unless_held(tracker, checkpoint, tracker.server_run_id(entry["run_id"]), entry["name"])
        promotion = None
        if entry.get("evaluation"):
            promotion = promote_evaluated(workspace, model["name"], model["version"], entry["evaluation"])
        tracker.outbox.registration_sent(entry["id"])
        done.append(registration_note(model, promotion))
    return done


def registration_note(model: dict, promotion: dict | None) -> str:
    """One line on a registration and its champion comparison."""
    if model.get("waiting"):
        return f"Registration of {model['name']} waits for the tracking server ({promotion['reason']})"
    registered = "Registered" if model.get("new_version", True) else "Same weights as"
    line = f"{registered} {model['name']} version {model['version']} ({model['model_uri']})"
    if promotion is None:
        return line
    return f"{line}; champion {'moved to it' if promotion['promoted'] else 'kept'} ({promotion['reason']})"


def _register_unless_held(tracker: ExperimentTracker, checkpoint: str, run_id: str, name: str) -> dict:
    digest = file_checksum(Path(checkpoint) / WEIGHTS_FILE)
    same = _version_with_weights(tracker.client, name, digest)
    if same is not None:
        return {"name": name, "version": str(same.version), "model_uri": f"models:/{name}/{same.version}",
                "new_version": False}
    model_uri = tracker.log_captioner_model(run_id, checkpoint, registered_name=name)
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = max(versions, key=lambda item: int(item.version))
    tracker.client.set_model_version_tag(name, str(version.version), WEIGHTS_TAG, digest)
    return {"name": name, "version": str(version.version), "model_uri": model_uri, "new_version": True}


def _version_with_weights(client, name: str, digest: str):
    """The newest version of `name` registered with these weights; None when there is none."""
    versions = client.search_model_versions(f"name = '{name}'")
    same = [version for version in versions if version.tags.get(WEIGHTS_TAG) == digest]
    return max(same, key=lambda version: int(version.version), default=None)


def promotion_metric(scores: dict) -> tuple[str, float] | None:
    """The score a champion is chosen by: CIDEr, or the overall CIDEr of scores by NoCaps domain;
    None when there is none (NoCaps test has no public references)."""
    if isinstance(scores.get("CIDEr"), (int, float)):
        return "CIDEr", float(scores["CIDEr"])
    overall = scores.get("overall")
    if isinstance(overall, dict) and isinstance(overall.get("CIDEr"), (int, float)):
        return "overall/CIDEr", float(overall["CIDEr"])
    return None


def promote_evaluated(workspace: Path, name: str, version: str | None, evaluation: dict,
                      waiting: str | None = None) -> dict:
    """promote_if_better with the metric and task of an evaluation's result; when it has no score
    to compare (NoCaps test), the champion stays and the result says why. For a registration that
    waits for the tracking server (`waiting`), the evaluation waits with it."""
    if waiting is not None:
        return _promotion_waits(workspace, waiting, evaluation)
    chosen = promotion_metric(evaluation.get("metrics") or {})
    if chosen is None:
        reason = (f"{evaluation.get('task', 'this evaluation')} has no CIDEr to compare (no public references); "
                  f"champion left as it was. Set it by hand if wanted: "
                  f"MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, {str(version)!r})")
        return {"promoted": False, "candidate": None, "champion": None, "champion_version": None, "reason": reason}
    metric, value = chosen
    return promote_if_better(name, version, metric, value, workspace, task=evaluation.get("task"))


def _promotion_waits(workspace: Path, waiting: str, evaluation: dict) -> dict:
    outbox = Outbox(workspace, "", "")
    [entry] = [entry for entry in outbox.waiting_registrations() if entry["id"] == waiting]
    outbox.save_registration({**entry, "evaluation": {key: evaluation.get(key) for key in ("task", "metrics")}})
    reason = (f"the tracking server is unreachable; `ituning sync --workspace {workspace}` registers it and "
              "compares it with the champion (the next pipeline run of this workspace does too)")
    return {"promoted": False, "candidate": None, "champion": None, "champion_version": None, "reason": reason}


def promote_if_better(name: str, version: str, metric: str = "CIDEr", value: float | None = None,
                      workspace: Path | None = None, task: str | None = None) -> dict:
    """Point alias "champion" at `version` when its `metric` beats the champion's (or there is no
    champion). `value` defaults to the metric as logged in the version's run. `task` says what the
    value was scored on (evaluation_task); a champion scored on another task, or with another
    metric, is not comparable and gives way to the candidate. The comparison is recorded as tags
    on the candidate version, the reason included."""
    client = ExperimentTracker(workspace=workspace).client
    if value is None:
        value = _run_metric(client, name, version, metric)
    champion = _champion(client, name, metric)
    if champion.version == str(version):
        return {"promoted": False, "candidate": value, "champion": champion.value, "champion_version": champion.version,
                "reason": f"version {version} is the champion already"}
    promoted, reason = _verdict(champion, value, task)
    tags = {f"metric.{metric}": value, "promotion.metric": metric, "promotion.candidate": value,
            "promotion.champion": "none" if champion.value is None else champion.value,
            "promotion.champion_version": champion.version or "none", "promotion.promoted": promoted,
            "promotion.reason": reason}
    if task:
        tags["promotion.task"] = task
    for key, tag in tags.items():
        client.set_model_version_tag(name, str(version), key, str(tag))
    if promoted:
        client.set_registered_model_alias(name, CHAMPION, str(version))
    return {"promoted": promoted, "candidate": value, "champion": champion.value,
            "champion_version": str(version) if promoted else champion.version, "reason": reason}


@dataclass(frozen=True)
class Champion:
    version: str | None = None
    value: float | None = None  # its recorded metric; None when it has none under this metric
    task: str | None = None


def _verdict(champion: Champion, value: float, task: str | None) -> tuple[bool, str]:
    if champion.version is None:
        return True, "no champion yet"
    if champion.value is None:
        return True, f"the champion (version {champion.version}) has no score under this metric"
    if task and champion.task and champion.task != task:
        return True, (f"the champion (version {champion.version}) was scored on {champion.task}, "
                      f"not on {task}: not comparable, the candidate takes over")
    if value > champion.value:
        return True, f"{value:.4f} beats the champion's {champion.value:.4f}"
    return False, f"{value:.4f} does not beat the champion's {champion.value:.4f} (version {champion.version})"


def _run_metric(client, name: str, version: str, metric: str) -> float:
    run_id = client.get_model_version(name, str(version)).run_id
    metrics = client.get_run(run_id).data.metrics
    if metric not in metrics:
        raise ValueError(f"{name} version {version}: its run {run_id} has no metric {metric!r}; pass value=")
    return float(metrics[metric])


def _champion(client, name: str, metric: str) -> Champion:
    """The champion's version, its recorded metric and task; Champion() without a champion."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException:
        return Champion()
    recorded = found.tags.get(f"metric.{metric}")
    return Champion(str(found.version), None if recorded is None else float(recorded), found.tags.get("promotion.task"))


def load_registered_captioner(model_uri: str, workspace: Path | None = None, device: str = "auto"):
    """The Captioner of a registered or logged model (`models:/ituning-captioner@champion`,
    `models:/NAME/3`, `runs:/RUN/model`) in the workspace's tracking store, loaded as the model
    server loads it: its bundled checkpoint and backbones, on `device`."""
    import mlflow

    from pipeline.tracking import fluent_store, tracking_uri

    with fluent_store(tracking_uri(workspace)):
        model = mlflow.pyfunc.load_model(model_uri, model_config={"serving_device": device})
    return model.unwrap_python_model().captioner
