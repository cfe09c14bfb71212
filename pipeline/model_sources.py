"""Where a captioner comes from, named by one string; and how a checkpoint goes to the hub.

`load_captioner_from` is how the `caption` command and the web app pick a model:

    runs/coco-gpt2/finetune/best          a checkpoint folder
    models:/ituning-captioner@champion    a registered model by alias (models:/NAME/VERSION by number)
    runs:/RUN_ID/model                    a model logged with an MLflow run
    ituning-captioner@champion            NAME@ALIAS: short for models:/NAME@ALIAS
    hub:OWNER/NAME[@REVISION]             a model shared on the Hugging Face hub (a branch, tag or commit)

`push_checkpoint` shares a checkpoint on the hub with a model card that lists the data sets and the
scores of the MLflow run that produced it (pipeline/model_card.py writes the card).
"""

import re
from dataclasses import dataclass
from pathlib import Path

from pipeline.model_card import CLIP_METRICS, DatasetUse, RunRecord, Score
from storage.datasets import all_datasets
from storage.sources import NOCAPS_DOMAINS

HUB = "hub:"
REGISTRY_PREFIXES = ("models:/", "runs:/")
REGISTRY_ALIAS = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*@[A-Za-z0-9][A-Za-z0-9_-]*")
# An evaluation's metrics as tracking.log_evaluation logs them: "coco_test/CIDEr", "nocaps_val/overall/CIDEr".
EVALUATION_METRIC = re.compile(r"(?P<dataset>[a-z0-9]+)_(?P<split>[a-z0-9]+)/(?:(?P<domain>[^/]+)/)?(?P<metric>[^/]+)")
SCORE_DOMAINS = (*NOCAPS_DOMAINS, "overall")  # not "blind": that is the baseline with the modules off
SPEC_FORMS = ("a checkpoint folder, models:/NAME@ALIAS, models:/NAME/VERSION, runs:/RUN_ID/model, NAME@ALIAS "
              "or hub:OWNER/NAME[@REVISION]")


class UnknownRun(ValueError):
    """A run id that the tracking store does not hold."""


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "folder", "registry" or "hub"
    target: str  # the folder, the MLflow model URI or the hub repository
    revision: str | None = None  # hub only


def model_source(spec: str) -> ModelSource:
    """What a model spec names (see the module docstring); a ValueError that lists the forms when none fits."""
    spec = spec.strip()
    if Path(spec).is_dir():
        return ModelSource("folder", spec)
    named = named_model_source(spec)
    if named is None:
        raise ValueError(f"{spec!r}: no such checkpoint folder; a model is {SPEC_FORMS}")
    return named


def named_model_source(spec: str) -> ModelSource | None:
    """The registry model or hub repository a spec names, or None when it names neither (no folder is looked at)."""
    spec = spec.strip()
    if spec.startswith(HUB):
        repo, _, revision = spec[len(HUB):].partition("@")
        if not repo:
            raise ValueError(f"{spec!r}: name the repository, hub:OWNER/NAME[@REVISION]")
        return ModelSource("hub", repo, revision or None)
    if spec.startswith(REGISTRY_PREFIXES):
        return ModelSource("registry", spec)
    if REGISTRY_ALIAS.fullmatch(spec):
        return ModelSource("registry", f"models:/{spec}")
    return None


def load_captioner_from(spec: str, workspace: Path | None = None, device: str = "auto"):
    """The Captioner that `spec` names, on `device`; registry models from the tracking store of
    `workspace` (or $MLFLOW_TRACKING_URI)."""
    return load_captioner(model_source(spec), workspace, device)


def load_captioner(source: ModelSource, workspace: Path | None = None, device: str = "auto"):
    """The Captioner of a model source; a hub source is always fetched from the hub, never a local folder."""
    from pipeline.sharing import Captioner

    if source.kind == "registry":
        from pipeline.registry import load_registered_captioner

        return load_registered_captioner(source.target, workspace, device)
    if source.kind == "hub":
        return Captioner.from_pretrained(source.target, device, revision=source.revision, local_folders=False)
    return Captioner.from_checkpoint(source.target, device)


def push_checkpoint(checkpoint: str | Path, repo_id: str, run_id: str | None = None, workspace: Path | None = None,
                    private: bool = False, branch: str | None = None):
    """Share a checkpoint on the hub with its model card, as one commit to `branch` (default main); the
    commit (a str, its URL; `.repo_url`, `.oid`). The card lists the data sets and scores of `run_id`.
    The checkpoint is loaded first, on the CPU: one that does not load is not shared."""
    from pipeline.model_card import check_can_push
    from pipeline.sharing import Captioner

    check_can_push(repo_id)  # before the checkpoint is loaded: a typo or a missing token fails at once
    record = run_record(run_id, workspace) if run_id else RunRecord(dataset_names=card_names())
    captioner = Captioner.from_checkpoint(checkpoint, device="cpu")
    return captioner.push_to_hub(repo_id, record, private=private, revision=branch)


def run_record(run_id: str, workspace: Path | None = None) -> RunRecord:
    """The data sets and evaluation scores of an MLflow run and of its child runs (a pipeline run's
    training stages and evaluations), in the order the runs started."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.tracking import PARENT_TAG, tracking_uri

    uri = tracking_uri(workspace)
    if uri.startswith("sqlite:///") and not Path(uri.removeprefix("sqlite:///")).is_file():
        raise UnknownRun(f"no run {run_id!r}: there is no tracking store at {uri.removeprefix('sqlite:///')}")
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    try:
        run = client.get_run(run_id)
    except MlflowException as error:
        raise UnknownRun(f"no run {run_id!r} in the tracking store {uri}") from error
    children = client.search_runs([run.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'",
                                  order_by=["attributes.start_time ASC"])
    runs = [run, *children]
    datasets = tuple(dict.fromkeys(use for item in runs for use in _datasets_of(item)))
    scores = tuple(score for item in runs for score in _scores_of(item.data.metrics, item.data.params))
    return RunRecord(run_id, datasets, scores, card_names())


def card_names() -> dict[str, tuple[str, str]]:
    """What a model card calls each dataset of the registry: name -> (title, format name)."""
    return {dataset.name: (dataset.title, dataset.format_name) for dataset in all_datasets()}


def _datasets_of(run) -> list[DatasetUse]:
    """The splits a run logged as inputs ("coco/train"), with their context (training, validation,
    evaluation) and whether the catalog held the synthetic corpus under that name."""
    uses = []
    for item in run.inputs.dataset_inputs if run.inputs else []:
        dataset, _, split = item.dataset.name.partition("/")
        context = next((tag.value for tag in item.tags if tag.key == "mlflow.data.context"), "")
        synthetic = run.data.params.get(f"data.{context}.{item.dataset.name}.synthetic") == "true"
        uses.append(DatasetUse(dataset, split, context, synthetic))
    return uses


def _scores_of(metrics: dict[str, float], params: dict[str, str]) -> list[Score]:
    """The evaluation scores among a run's metrics (training's are "train_loss", "epoch/CIDEr" ...),
    each marked synthetic as its split was, CLIP-S and RefCLIP-S with the CLIP that scored them."""
    scores = []
    for key, value in sorted(metrics.items()):
        match = EVALUATION_METRIC.fullmatch(key)
        if match and match["domain"] in (None, *SCORE_DOMAINS):
            dataset, split, metric = match["dataset"], match["split"], match["metric"]
            synthetic = params.get(f"data.evaluation.{dataset}/{split}.synthetic") == "true"
            scored_by = clip_of(params) if metric in CLIP_METRICS else None
            scores.append(Score(dataset, split, metric, float(value), match["domain"], synthetic, scored_by))
    return scores


def clip_of(params: dict[str, str]) -> str | None:
    """The CLIP an evaluation run scored CLIP-S with, as its params name it ("ViT-B-32 (openai)",
    "the stand-in CLIP local-dir:/ws/backbones/vision"); None when the run does not say."""
    model, weights = params.get("clip_score.clip_score_model"), params.get("clip_score.clip_score_pretrained")
    if not model or model in ("None", "null"):
        return None
    if params.get("clip_score.standin") == "true":
        return f"the stand-in CLIP {model}"
    return f"{model} ({weights})" if weights and weights not in ("None", "null") else model
