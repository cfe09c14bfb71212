"""Tracking that never waits on the tracking server: what a remote server does not take is kept in an
outbox in the workspace and sent, in order and once, when it answers again.

A tracking server is asked with short HTTP retries (MLflow's own MLFLOW_HTTP_REQUEST_* settings, where
the environment sets none). When a call finds it unreachable, one warning line says so, and that call
and the later ones of the process go to WORKSPACE/tracking-outbox/calls.jsonl: a JSON line per call,
appended and flushed to disk, the files it names copied beside it. The server is tried again at most
every PROBE_EVERY_S seconds; once it answers, the outbox is sent before anything new. A run created
while it is down gets a local id ("offline-..."), replaced by the server's id when it is sent.

A model registration that finds the server unreachable waits there too, as one file per
registration in registrations/ (with the evaluation its champion comparison needs); the registry
sends it (pipeline/registry.py `register_waiting`) before the next registration and on `ituning sync`.

Sending is idempotent: each call's id goes into sent.txt once the server took it, so an interrupted
send goes on with the rest; a metric batch sent again after a crash between the two carries the same
timestamps, which MLflow's SQL stores keep once. Every run carries the workspace and the process that
created it as tags, so the next run of the workspace ends as FAILED the runs whose process died.
"""

import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from datetime import datetime
from pathlib import Path

from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param, RunStatus, RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from storage.atomic import write_atomically
from storage.locks import FileLock, Holder, alive_elsewhere

log = logging.getLogger(__name__)
OUTBOX = "tracking-outbox"
REGISTRATIONS = "registrations"  # OUTBOX/registrations/ID.json: a model registration that waits
OFFLINE_PREFIX = "offline-"
PROBE_EVERY_S = 30.0
SERVER_SETTINGS = {  # a few seconds against a refused connection, under a minute against a silent host
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0.5",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true",  # no "View run ..." lines among a command's output
}
WORKSPACE_TAG = "ituning.workspace"
PROCESS_TAG = "ituning.process"  # "PID HOST SINCE", as lock files name their holder
ENDED_TAG = "ituning.ended_by"
OFFLINE_ID_TAG = "ituning.offline_id"  # a run created from the outbox: the local id it had
_last_failure: dict[str, float] = {}  # tracking URI -> when a call of this process last found it unreachable
_server_ids: dict[str, str] = {}  # local id of a run created while the server was down -> the server's id


class StillUnreachable(MlflowException):
    """The server did not answer a call of this process moments ago: not asked again yet."""


def is_remote(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def use_server_settings() -> None:
    """MLflow's HTTP retries bounded (where the environment sets no other), and urllib3's
    "Retrying ..." warnings out of the output: the outbox's one line says what happened."""
    for name, value in SERVER_SETTINGS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def unreachable(error: BaseException) -> bool:
    """Whether an MLflow error is the server not answering (refused, timed out, 5xx after retries),
    not a refusal of what was sent."""
    import requests

    if isinstance(error, StillUnreachable):
        return True
    seen = error
    while seen is not None:
        if isinstance(seen, (requests.ConnectionError, requests.Timeout, requests.exceptions.RetryError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(error, MlflowException) and "Max retries exceeded" in str(error)


def process_tags(workspace: Path) -> dict[str, str]:
    since = datetime.now().isoformat(sep=" ", timespec="seconds")
    return {WORKSPACE_TAG: str(Path(workspace).resolve()), PROCESS_TAG: f"{os.getpid()} {socket.gethostname()} {since}"}


class Outbox:
    """The calls a workspace's runs made while the tracking server was unreachable."""

    def __init__(self, workspace: Path, uri: str, experiment: str):
        self.folder = Path(workspace) / OUTBOX
        self.uri, self.experiment = uri, experiment

    # ---- delivering one call -----------------------------------------------------------------

    def deliver(self, client: MlflowClient, call: str, run_id: str, **arguments):
        """Send a call, or keep it here while the server is unreachable. Returns what the call
        returns (a created run's id: the server's, or a local one)."""
        if self.worth_trying():
            try:
                if self.uri in _last_failure:  # it failed before: what waits goes first
                    self.send_pending()
                run_id = self.server_id(run_id)
                if not run_id.startswith(OFFLINE_PREFIX):
                    result = send(client, call, run_id, arguments, self.folder)
                    _last_failure.pop(self.uri, None)
                    return result
            except MlflowException as error:
                if not unreachable(error):
                    raise
                self.went_offline(error)
        return self.keep(call, self.server_id(run_id), arguments)

    def keep(self, call: str, run_id: str, arguments: dict) -> str:
        entry_id = uuid.uuid4().hex
        if call == "create_run":
            run_id = OFFLINE_PREFIX + entry_id
        with self._lock():
            arguments = self._copied_files(entry_id, arguments)
            line = json.dumps({"id": entry_id, "uri": self.uri, "experiment": self.experiment, "call": call,
                               "run_id": run_id, "arguments": arguments}) + "\n"
            descriptor = os.open(self.folder / "calls.jsonl", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(descriptor, line.encode())
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        return run_id

    def worth_trying(self) -> bool:
        """False for PROBE_EVERY_S seconds after a call of this process found the server unreachable."""
        failed = _last_failure.get(self.uri)
        return failed is None or time.monotonic() - failed >= PROBE_EVERY_S

    def went_offline(self, error: BaseException) -> None:
        if self.uri not in _last_failure:
            log.warning("tracking server %s unreachable (%s); training goes on and its tracking is kept in %s "
                        "until the server answers", self.uri, _cause(error), self.folder)
        _last_failure[self.uri] = time.monotonic()

    def _copied_files(self, entry_id: str, arguments: dict) -> dict:
        """A kept artifact is copied now: its file may change or go before the server answers."""
        if "local_path" not in arguments:
            return arguments
        source = Path(arguments["local_path"])
        target = self.folder / "files" / entry_id / source.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(source, target) if source.is_dir() else shutil.copyfile(source, target)
        return {**arguments, "local_path": str(target.relative_to(self.folder))}

    # ---- what waits, and sending it ----------------------------------------------------------

    def entries(self) -> list[dict]:
        calls = self.folder / "calls.jsonl"
        if not calls.is_file():
            return []
        return [json.loads(line) for line in calls.read_text().splitlines() if line.endswith("}")]

    def sent(self) -> dict[str, str]:
        """{entry id: the server's run id for a created run, else ""} of the calls the server took."""
        record = self.folder / "sent.txt"
        lines = record.read_text().splitlines() if record.is_file() else []
        return dict((line.split("\t") + [""])[:2] for line in lines if line)

    def pending(self) -> list[dict]:
        sent = self.sent()
        return [entry for entry in self.entries() if entry["id"] not in sent]

    def send_pending(self) -> int:
        """Send what waits, in order; the number of calls sent. Raises MlflowException while the
        server is unreachable (what was sent stays sent)."""
        count = 0
        with self._lock():
            sent = self.sent()
            run_ids = {OFFLINE_PREFIX + key: value for key, value in sent.items() if value}
            for entry in self.entries():
                if entry["id"] in sent:
                    continue
                result = self._send_entry(entry, run_ids)
                if entry["call"] == "create_run":
                    run_ids[entry["run_id"]] = _server_ids[entry["run_id"]] = result
                self._record_sent(entry["id"], result if entry["call"] == "create_run" else "")
                _last_failure.pop(entry["uri"], None)  # it answers again
                count += 1
            self._clear()
        return count

    def server_id(self, run_id: str) -> str:
        """The server's id of a run created while it was down, once it has one; any other id as it is."""
        if run_id.startswith(OFFLINE_PREFIX) and run_id not in _server_ids:
            found = self.sent().get(run_id.removeprefix(OFFLINE_PREFIX))
            if found:
                _server_ids[run_id] = found
        return _server_ids.get(run_id, run_id)

    def _clear(self) -> None:
        """Everything sent: the calls and their files go; the server's ids of runs created offline
        stay, for a process still holding a local id."""
        created = [f"{key}\t{value}\n" for key, value in self.sent().items() if value]
        (self.folder / "calls.jsonl").unlink(missing_ok=True)
        shutil.rmtree(self.folder / "files", ignore_errors=True)
        write_atomically(self.folder / "sent.txt", "".join(created), durable=True)

    def _send_entry(self, entry: dict, run_ids: dict[str, str]):
        client = MlflowClient(tracking_uri=entry["uri"])
        arguments = {**entry["arguments"], "experiment": entry["experiment"]}
        if entry["call"] == "create_run":
            arguments["tags"] = {**{key: run_ids.get(value, value) for key, value in arguments["tags"].items()},
                                 OFFLINE_ID_TAG: entry["run_id"]}
        try:
            return send(client, entry["call"], run_ids.get(entry["run_id"], entry["run_id"]), arguments, self.folder)
        except MlflowException as error:
            if unreachable(error):
                raise
            log.warning("tracking server %s refused a kept %s for run %s: %s; left out", entry["uri"],
                        entry["call"], entry["run_id"], _cause(error))
            return ""

    def _record_sent(self, entry_id: str, result: str) -> None:
        with open(self.folder / "sent.txt", "a") as record:
            record.write(f"{entry_id}\t{result}\n")
            record.flush()
            os.fsync(record.fileno())

    def _lock(self) -> FileLock:
        self.folder.mkdir(parents=True, exist_ok=True)
        lock = FileLock(self.folder / ".lock")
        if not lock.acquire(wait=600):
            raise RuntimeError(f"{self.folder}: held by {lock.holder() or 'another process'} for 10 minutes; "
                               "try again once it has finished")
        return lock

    # ---- registrations that wait -------------------------------------------------------------

    def keep_registration(self, registration: dict) -> str:
        """Keep a model registration (name, workspace-relative checkpoint, run id) for later; its id."""
        entry_id = f"{time.time_ns()}-{uuid.uuid4().hex[:8]}"  # sorts in the order they were kept
        self.save_registration({**registration, "id": entry_id, "uri": self.uri})
        return entry_id

    def save_registration(self, registration: dict) -> None:
        folder = self.folder / REGISTRATIONS
        folder.mkdir(parents=True, exist_ok=True)
        write_atomically(folder / f"{registration['id']}.json", json.dumps(registration, indent=1), durable=True)

    def waiting_registrations(self) -> list[dict]:
        folder = self.folder / REGISTRATIONS
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        return [json.loads(path.read_text()) for path in files]

    def registration_sent(self, entry_id: str) -> None:
        (self.folder / REGISTRATIONS / f"{entry_id}.json").unlink(missing_ok=True)

    def nothing_waits(self) -> bool:
        return not self.pending() and not self.waiting_registrations()

    # ---- telling the user --------------------------------------------------------------------

    def summary(self) -> str | None:
        """What waits, in words, with how to send it; None when nothing does."""
        pending = self.pending()
        registrations = len(self.waiting_registrations())
        if not pending and not registrations:
            return None
        counts = pending_counts(pending)
        parts = [f"{count} {name}" for name, count in counts.items() if count]
        if pending:
            parts[-1] += f" of {len({entry['run_id'] for entry in pending})} run(s)"
        if registrations:
            parts.append(f"{registrations} model registration(s)")
        workspace = self.folder.parent
        return (f"tracking server {self.uri} unreachable: {', '.join(parts)} kept in {self.folder}; send them "
                f"with `ituning sync --workspace {workspace}` once it answers (the next run of this workspace "
                f"sends them too)")

    def waiting_runs(self) -> set[str]:
        return {entry["run_id"] for entry in self.pending()}


def pending_counts(pending: list[dict]) -> dict[str, int]:
    counts = dict.fromkeys(("runs to create", "metric values", "params", "tags", "artifacts", "dataset inputs",
                            "run endings"), 0)
    for entry in pending:
        arguments = entry["arguments"]
        if entry["call"] == "log_batch":
            for name, key in (("metric values", "metrics"), ("params", "params"), ("tags", "tags")):
                counts[name] += len(arguments.get(key, []))
        else:
            name = {"create_run": "runs to create", "set_tag": "tags", "log_artifact": "artifacts",
                    "log_inputs": "dataset inputs", "set_terminated": "run endings"}[entry["call"]]
            counts[name] += 1
    return counts


# ---- the calls -------------------------------------------------------------------------------


def send(client: MlflowClient, call: str, run_id: str, arguments: dict, folder: Path):
    return CALLS[call](client, run_id, arguments, folder)


def _create_run(client, _run_id, arguments, _folder) -> str:
    experiment_id = arguments.get("experiment_id")
    if experiment_id is None:
        experiment = client.get_experiment_by_name(arguments["experiment"])
        experiment_id = experiment.experiment_id if experiment else client.create_experiment(arguments["experiment"])
    local_id = arguments["tags"].get(OFFLINE_ID_TAG)
    if local_id:  # created already by a send cut short before it noted so
        found = client.search_runs([experiment_id], f"tags.`{OFFLINE_ID_TAG}` = '{local_id}'", max_results=1)
        if found:
            return found[0].info.run_id
    run = client.create_run(experiment_id, start_time=arguments["start_time"], tags=arguments["tags"],
                            run_name=arguments["run_name"])
    return run.info.run_id


def _log_batch(client, run_id, arguments, _folder) -> None:
    client.log_batch(run_id, metrics=[Metric(*values) for values in arguments.get("metrics", [])],
                     params=[Param(*values) for values in arguments.get("params", [])],
                     tags=[RunTag(*values) for values in arguments.get("tags", [])])


def _set_tag(client, run_id, arguments, _folder) -> None:
    client.set_tag(run_id, arguments["key"], arguments["value"])


def _set_terminated(client, run_id, arguments, _folder) -> None:
    client.set_terminated(run_id, arguments["status"], arguments["end_time"])


def _log_artifact(client, run_id, arguments, folder) -> None:
    path = folder / arguments["local_path"]  # an absolute path stays as it is
    if path.is_dir():
        client.log_artifacts(run_id, str(path), arguments["artifact_path"])
    else:
        client.log_artifact(run_id, str(path), arguments["artifact_path"])


def _log_inputs(client, run_id, arguments, _folder) -> None:
    inputs = [DatasetInput(Dataset(**dataset["dataset"]), [InputTag(key, value) for key, value in dataset["tags"]])
              for dataset in arguments["datasets"]]
    client.log_inputs(run_id, inputs)


CALLS = {"create_run": _create_run, "log_batch": _log_batch, "set_tag": _set_tag,
         "set_terminated": _set_terminated, "log_artifact": _log_artifact, "log_inputs": _log_inputs}


def _cause(error: BaseException) -> str:
    """The reason in a few words ("[Errno 111] Connection refused", "Read timed out"), not the URL
    and retry counts around it."""
    text = " ".join(str(error).split())
    found = re.search(r"\[Errno -?\d+\] [^'\")]+|Read timed out|Connection aborted|too many \d+ error responses", text)
    return found.group(0).strip() if found else text[:200]


# ---- runs whose process died -------------------------------------------------------------------


def end_abandoned_runs(client: MlflowClient, experiment_id: str, workspace: Path, waiting: set[str]) -> list[str]:
    """Mark FAILED the RUNNING runs of this workspace whose process (on this host) is gone; runs with
    calls still in the outbox are left to it. Returns their ids."""
    workspace_filter = str(Path(workspace).resolve()).replace("'", "\\'")
    found = client.search_runs([experiment_id], f"attributes.status = 'RUNNING' and "
                                                f"tags.`{WORKSPACE_TAG}` = '{workspace_filter}'", max_results=1000)
    ended = []
    for run in found:
        holder = _holder(run.data.tags.get(PROCESS_TAG, ""))
        if holder is None or holder.host != socket.gethostname() or alive_elsewhere(holder) \
                or holder.pid == os.getpid() or run.info.run_id in waiting:
            continue
        client.set_tag(run.info.run_id, ENDED_TAG, f"its process ({holder}) ended without finishing it; "
                                                   f"marked FAILED by process {os.getpid()}")
        client.set_terminated(run.info.run_id, RunStatus.to_string(RunStatus.FAILED))
        ended.append(run.info.run_id)
    if ended:
        log.warning("marked FAILED %d run(s) left RUNNING by a process that died: %s", len(ended), ", ".join(ended))
    return ended


def _holder(text: str) -> Holder | None:
    try:
        pid, host, since = text.split(maxsplit=2)
        return Holder(int(pid), host, since)
    except ValueError:
        return None


def sync(workspace: Path) -> str:
    """Send what a workspace's outbox holds; what was sent, in words. Raises MlflowException while
    the server is unreachable, after sending what it took."""
    use_server_settings()
    outbox = Outbox(workspace, "", "")
    pending = outbox.pending()
    if not pending:
        registrations = len(outbox.waiting_registrations())
        if registrations:
            return f"sending the {registrations} model registration(s) kept in {outbox.folder}"
        return f"nothing waits for the tracking server in {outbox.folder}"
    counts = pending_counts(pending)
    outbox.send_pending()
    sent = ", ".join(f"{count} {name}" for name, count in counts.items() if count)
    return f"sent {sent} to {', '.join(sorted({entry['uri'] for entry in pending}))}"
