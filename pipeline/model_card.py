"""A captioner shared on the Hugging Face hub: its model card, and the folder that goes there and back.

A shared model is a checkpoint folder (ituning/checkpoint.py) with a model card beside it:

    adapter_model.safetensors   the I-Tuning module weights
    adapter_config.json         backbones, r, λ, dropped layers, code version
    README.md                   the card: YAML front matter the hub renders (base models, data sets,
                                metrics, model-index), then what the model is and how to load it

Only these three files travel, up and down (never a pickle). The frozen backbones do not: they load
by the names in adapter_config.json, as for any checkpoint. A backbone that was a local folder on
the machine that trained the modules (the stand-ins) is named by its path; such a model loads only
where that path exists, and the card says so.

The card never passes synthetic data or stand-in backbones off as the real thing. What the
checkpoint records (adapter_config.json "provenance", ituning/provenance.py) and what the run's
record says (a split's `synthetic` param) decide: a dataset that was the synthetic corpus in its
format is named "synthetic" in the text and the results, left out of the front matter's
`datasets`, and tagged `synthetic-data`; stand-in backbones are said so and tagged
`standin-backbones`. CLIP-S names the CLIP that scored it. `license` is the modules' licence (the
run config's, default the project's Apache-2.0); the text names the backbones' own.

Hub transfers honour HF_ENDPOINT, HF_HOME and HF_TOKEN; a failure is a `HubError` of one line.
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from ituning.backbones import HF_HUB, LOCAL_DIR, hub_reachable
from ituning.checkpoint import CONFIG_FILE, WEIGHTS_FILE
from ituning.provenance import DEFAULT_LICENSE, Provenance, is_standin_backbone, provenance_of

CARD_FILE = "README.md"
PRETRAINED_FILES = (WEIGHTS_FILE, CONFIG_FILE, CARD_FILE)
LIBRARY = "ituning"
TAGS = ["image-captioning", "i-tuning", "clip", "gpt2"]
DEFAULT_BEAMS = 5  # the caption command's and DecodingConfig's default
# The hub moved the GPT-2 checkpoints under organisations; it still answers the old names with a redirect.
HUB_LANGUAGE_MODELS = {"gpt2": "openai-community/gpt2", "gpt2-medium": "openai-community/gpt2-medium",
                       "gpt2-large": "openai-community/gpt2-large", "gpt2-xl": "openai-community/gpt2-xl",
                       "distilgpt2": "distilbert/distilgpt2"}
SYNTHETIC = "synthetic"  # the dataset name and type of scores on the synthetic corpus
SYNTHETIC_TAG, STANDIN_TAG = "synthetic-data", "standin-backbones"
CLIP_METRICS = ("CLIP-S", "RefCLIP-S")


class HubError(RuntimeError):
    """Sharing through the hub failed or cannot start: a bad repository id, no token, an unreachable
    hub, a missing repository or revision, a refusal."""


class BadRepoId(HubError):
    """A repository id the hub would refuse: the caller's mistake, found before anything is sent."""


# ---- what the card says ------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetUse:
    """A split that a run read, and what for."""

    dataset: str  # a dataset name: coco, vg, nocaps ...
    split: str
    purpose: str  # training, validation or evaluation
    synthetic: bool = False  # the synthetic corpus catalogued under the dataset's name


@dataclass(frozen=True)
class Score:
    dataset: str
    split: str
    metric: str  # BLEU-4, METEOR, ROUGE-L, CIDEr, SPICE ...
    value: float
    domain: str | None = None  # NoCaps: in-domain, near-domain, out-domain, overall
    synthetic: bool = False  # scored on the synthetic corpus catalogued under the dataset's name
    scored_by: str | None = None  # CLIP-S and RefCLIP-S: the CLIP that scored them


@dataclass(frozen=True)
class RunRecord:
    """What the tracking store knows of the run that produced the weights; empty when nothing is known."""

    run_id: str | None = None
    datasets: tuple[DatasetUse, ...] = ()
    scores: tuple[Score, ...] = ()
    # What the card calls each dataset, from the application's dataset registry: name -> (title,
    # e.g. "COCO (Karpathy splits)", and the name of its format, e.g. "COCO"); others go by their name
    dataset_names: dict[str, tuple[str, str]] = field(default_factory=dict)


@dataclass(frozen=True)
class CardFacts:
    """Everything the card says, as plain values."""

    config: dict  # adapter_config.json
    trainable_parameters: int
    repo_id: str | None = None  # None: a local folder, loaded by its path
    folder: str = "."
    record: RunRecord = field(default_factory=RunRecord)

    @property
    def backbones(self) -> dict:
        return self.config["backbones"]

    @property
    def provenance(self) -> Provenance | None:
        return provenance_of(self.config)

    @property
    def synthetic_datasets(self) -> set[str]:
        """Dataset names that stood for the synthetic corpus in the training data or the run's record."""
        recorded = self.provenance.data if self.provenance else ()
        return ({item.dataset for item in (*recorded, *self.record.datasets, *self.record.scores) if item.synthetic})

    @property
    def standin_backbones(self) -> bool:
        if self.provenance is not None and self.provenance.standin_backbones:
            return True
        return any(is_standin_backbone(path) for path in local_backbone_paths(self.backbones))

    @property
    def license(self) -> str:
        return self.provenance.license if self.provenance else DEFAULT_LICENSE

    def dataset_label(self, dataset: str) -> str:
        if dataset in self.synthetic_datasets:
            return f"{SYNTHETIC} ({self.format_name(dataset)} format)"
        return self.record.dataset_names.get(dataset, (dataset, dataset))[0]

    def format_name(self, dataset: str) -> str:
        return self.record.dataset_names.get(dataset, (dataset, dataset))[1]

    def used_datasets(self) -> list[str]:
        """Every dataset name the training data and the run's record name, in order."""
        recorded = self.provenance.data if self.provenance else ()
        return list(dict.fromkeys(item.dataset for item in (*recorded, *self.record.datasets, *self.record.scores)))


def local_backbone_paths(backbones: dict) -> list[str]:
    """The backbones named by a path on the machine that trained the modules, not by a hub name."""
    vision, weights, language = backbones["vision_model"], backbones["vision_pretrained"], backbones["language_model"]
    paths = [vision[len(LOCAL_DIR):]] if vision.startswith(LOCAL_DIR) else []
    if weights and _is_path(weights):
        paths.append(weights)
    if _is_path(language):
        paths.append(language)
    return paths


def missing_local_backbones(backbones: dict) -> list[str]:
    return [path for path in local_backbone_paths(backbones) if not Path(path).expanduser().exists()]


def base_models(backbones: dict) -> list[str]:
    """The hub repositories of the backbones (GPT-2, then CLIP), leaving out those kept in local folders."""
    local = set(local_backbone_paths(backbones))
    language = backbones["language_model"]
    found = [] if language in local else [HUB_LANGUAGE_MODELS.get(language, language)]
    vision = _vision_repo(backbones["vision_model"], backbones["vision_pretrained"], local)
    return found + ([vision] if vision else [])


def _vision_repo(name: str, pretrained: str | None, local: set[str]) -> str | None:
    """An `hf-hub:` encoder's repository, or where open_clip fetches a named tag's weights from."""
    if name.startswith(LOCAL_DIR) or (pretrained in local):
        return None
    if name.startswith(HF_HUB):
        return name[len(HF_HUB):]
    if not pretrained:
        return None
    import open_clip

    return open_clip.get_pretrained_cfg(name, pretrained).get("hf_hub", "").strip("/") or None


def _is_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith((".safetensors", ".pt", ".bin")) or Path(name).is_dir()


# ---- the card ----------------------------------------------------------------------------------


def card_metadata(facts: CardFacts):
    """The front matter, as huggingface_hub's ModelCardData (its YAML is what the hub reads)."""
    from huggingface_hub import EvalResult, ModelCardData

    record, synthetic = facts.record, facts.synthetic_datasets
    datasets = [name for name in facts.used_datasets() if name not in synthetic]  # real ones only
    results = [EvalResult(task_type="image-to-text", task_name="Image Captioning",
                          dataset_type=SYNTHETIC if score.dataset in synthetic else score.dataset,
                          dataset_name=facts.dataset_label(score.dataset), dataset_split=score.split,
                          metric_type=score.metric.lower(), metric_value=score.value, metric_name=_metric_label(score))
               for score in record.scores]
    tags = TAGS + ([SYNTHETIC_TAG] if synthetic else []) + ([STANDIN_TAG] if facts.standin_backbones else [])
    return ModelCardData(
        library_name=LIBRARY, pipeline_tag="image-to-text", license=facts.license,
        base_model=base_models(facts.backbones) or None, tags=tags, datasets=datasets or None,
        metrics=list(dict.fromkeys(score.metric.lower() for score in record.scores)) or None,
        model_name=_title(facts), eval_results=results or None,
    )


def model_card(facts: CardFacts) -> str:
    """README.md: the front matter, then what the model is, its data, its scores and how to load it."""
    sections = [_about(facts), _caveats(facts), _data(facts), _results(facts), _usage(facts), _files(),
                _license(facts)]
    body = "\n\n".join(section for section in sections if section)
    return f"---\n{card_metadata(facts).to_yaml()}\n---\n\n# {_title(facts)}\n\n{body}\n"


def write_model_card(directory: str | Path, facts: CardFacts) -> Path:
    path = Path(directory) / CARD_FILE
    path.write_text(model_card(facts), encoding="utf-8")
    return path


def _title(facts: CardFacts) -> str:
    return (facts.repo_id or Path(facts.folder).resolve().name).split("/")[-1]


def _about(facts: CardFacts) -> str:
    settings, architecture = facts.config["ituning"], facts.config["architecture"]
    backbones, weights = facts.backbones, facts.backbones["vision_pretrained"]
    vision = f"`{backbones['vision_model']}`" + (f", `{weights}` weights" if weights else "")
    rows = [("language model (frozen)", f"`{backbones['language_model']}`"), ("vision encoder (frozen)", vision),
            ("I-Tuning modules", f"{len(architecture['module_layers'])} of {architecture['language_model_layers']} "
                                 f"layers, r = {settings['bottleneck']}, λ = {settings['scale']}"),
            ("trainable parameters", f"{facts.trainable_parameters:,}"),
            ("code version", f"`{facts.config.get('code_version', 'unknown')}`")]
    lines = ["An image captioner: small I-Tuning cross-attention modules between a frozen CLIP-ViT image "
             "encoder and a frozen GPT-2, after \"I-Tuning: Tuning Frozen Language Models with Image for "
             "Lightweight Image Captioning\" (Luo et al., ICASSP 2023). Only the modules were trained: these are "
             "their weights. The backbones load by the names in adapter_config.json.",
             "", "| | |", "|---|---|", *[f"| {name} | {value} |" for name, value in rows]]
    local = local_backbone_paths(backbones)
    if local:
        lines += ["", "The backbones at " + ", ".join(f"`{path}`" for path in local) + " were local folders on "
                  "the machine that trained the modules, not hub repositories: the model loads where those "
                  "paths exist."]
    return "\n".join(lines)


def _caveats(facts: CardFacts) -> str:
    """What the model is not, said before anything else about it."""
    lines = []
    if facts.synthetic_datasets:
        names = " and ".join(sorted(facts.format_name(name) for name in facts.synthetic_datasets))
        lines.append(f"**Synthetic data.** The data marked synthetic below are the synthetic corpus of the `ituning` "
                     f"package (rendered shapes with generated captions) written in the format of {names}, not "
                     f"{names} itself: what the modules learnt from it, and scores on it, say nothing about real "
                     "photos.")
    if facts.standin_backbones:
        lines.append("**Stand-in backbones.** The frozen vision encoder and language model are tiny stand-ins made by "
                     "the `ituning` package, not OpenAI's CLIP and GPT-2.")
    if facts.provenance is None:
        lines.append("The checkpoint records no provenance (it predates the record): what its training data were "
                     "is not known from it.")
    return "\n\n".join(f"> {line}" for line in lines)


def _data(facts: CardFacts) -> str:
    record = facts.record
    if record.datasets:
        uses = [(use.dataset, use.split, use.purpose) for use in record.datasets]
        source = " (MLflow run `" + record.run_id + "`)" if record.run_id else ""
        intro = f"What the run that produced these weights read{source}:"
    elif facts.provenance is not None and facts.provenance.data:
        uses = [(item.dataset, item.split, "training") for item in facts.provenance.data]
        intro = "What trained these weights, as the checkpoint records it:"
    else:
        return ""
    rows = [f"| {facts.dataset_label(dataset)} | {split} | {purpose} |" for dataset, split, purpose in uses]
    return "\n".join([f"## Data\n\n{intro}", "", "| data set | split | used for |", "|---|---|---|", *rows])


def _results(facts: CardFacts) -> str:
    record = facts.record
    if not record.scores:
        return ""
    rows = [f"| {facts.dataset_label(score.dataset)} | {score.split} | {_metric_label(score)} | "
            f"{score.value:.4f} |" for score in record.scores]
    return "\n".join(["## Results", "", "As the run's evaluations logged them, on pycocoevalcap's scale (a CIDEr "
                      "of 1.17 is the 117 that papers quote).", "",
                      "| data set | split | metric | score |", "|---|---|---|---|", *rows])


def _metric_label(score: Score) -> str:
    """The metric, its NoCaps domain, and for CLIP-S the CLIP that scored it."""
    label = f"{score.metric} ({score.domain})" if score.domain else score.metric
    if score.metric in CLIP_METRICS:
        label += f", by {score.scored_by}" if score.scored_by else ", by a CLIP the run did not record"
    return label


def _usage(facts: CardFacts) -> str:
    source = facts.repo_id or facts.folder
    command = f"--model hub:{facts.repo_id}" if facts.repo_id else f"--checkpoint {facts.folder}"
    return "\n".join([
        "## How to use", "", "With the `ituning` package installed:", "", "```python",
        "from pipeline.sharing import Captioner", "", f'captioner = Captioner.from_pretrained("{source}")',
        'for path, caption, error in captioner.caption_files(["image.jpg"]):', "    print(path, caption or error)",
        "```", "", "```bash", f"ituning caption {command} image.jpg", "```", "",
        f"Captions come from beam search with {DEFAULT_BEAMS} beams by default (`--beams 1` is greedy; "
        "`DecodingConfig(num_beams=...)` in Python).",
    ])


def _files() -> str:
    return ("## Files\n\n`adapter_model.safetensors` (the module weights) and `adapter_config.json` (backbones, "
            "module settings, code version) form an I-Tuning checkpoint folder: a download of this repository "
            "also works as `ituning caption --checkpoint FOLDER`.")


def _license(facts: CardFacts) -> str:
    lines = [f"## License\n\nThe I-Tuning module weights of this repository: `{facts.license}`."]
    if facts.standin_backbones:
        lines.append("The stand-in backbones were made with the `ituning` package and are not in this repository.")
        return " ".join(lines)
    lines.append("The frozen backbones are not in this repository; they load from their own, under their own "
                 "licences:")
    language, vision = facts.backbones["language_model"], facts.backbones["vision_pretrained"]
    if language.startswith("gpt2"):
        lines.append(f"GPT-2 (`{HUB_LANGUAGE_MODELS.get(language, language)}`) under MIT as its hub card states "
                     "(OpenAI's release calls it a modified MIT licence);")
    else:
        lines.append(f"the language model `{language}` under the licence its repository states;")
    if vision == "openai":
        lines.append(f"the CLIP weights of OpenAI (`{facts.backbones['vision_model']}`, `openai`) under MIT.")
    else:
        lines.append(f"the vision encoder `{facts.backbones['vision_model']}` under the licence its source states.")
    return " ".join(lines)


# ---- to the hub and back -----------------------------------------------------------------------


def hub_repo_id(repo_id: str) -> str:
    """`repo_id` itself when it is a valid hub repository id (OWNER/NAME, or NAME in one's own namespace)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise BadRepoId(f"{repo_id!r} is not a hub repository id: use OWNER/NAME, of letters, digits, "
                       "'-', '_' and '.'") from error
    return repo_id


def create_model_repo(repo_id: str, private: bool = False, branch: str | None = None, token: str | None = None) -> str:
    """Create the model repository unless it exists, and `branch` (from main) unless it exists; the
    repository's full id (a bare NAME lands in the token owner's namespace). `private` makes an
    existing repository private too (its settings); without it, a private one stays private."""
    from huggingface_hub import HfApi

    check_can_push(repo_id, token)
    api = HfApi(token=token)
    with _hub_errors(repo_id):
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if private:  # create_repo leaves an existing repository as it is
            api.update_repo_settings(repo_id, private=True)
        if branch and branch != "main":
            api.create_branch(repo_id, branch=branch, exist_ok=True)
    return repo_id


def upload_model_folder(folder: str | Path, repo_id: str, branch: str | None = None, token: str | None = None,
                        message: str | None = None):
    """One commit of the folder's shared files; the CommitInfo (a str: the commit's URL; `.repo_url`, `.oid`)."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, branch):
        return HfApi(token=token).upload_folder(
            repo_id=repo_id, folder_path=str(folder), revision=branch, allow_patterns=list(PRETRAINED_FILES),
            commit_message=message or "Upload an I-Tuning captioner")


def download_model_folder(repo_id: str, revision: str | None = None, token: str | None = None,
                          cache_dir: str | Path | None = None) -> Path:
    """The repository's shared files in the hub cache (HF_HOME), downloaded when the hub is reachable,
    read from the cache when it is not; the snapshot folder."""
    from huggingface_hub import snapshot_download

    hub_repo_id(repo_id)
    with _hub_errors(repo_id, revision):
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(PRETRAINED_FILES),
                                        token=token, cache_dir=cache_dir, local_files_only=not hub_reachable()))
    if not (folder / CONFIG_FILE).is_file() or not (folder / WEIGHTS_FILE).is_file():
        raise HubError(f"{repo_id} is not an I-Tuning model: it has no {CONFIG_FILE} and {WEIGHTS_FILE}")
    return folder


def check_can_push(repo_id: str, token: str | None = None) -> None:
    """A HubError unless `repo_id` is valid, the hub is reachable and there is a token to write with."""
    from huggingface_hub import constants, get_token

    hub_repo_id(repo_id)
    if constants.is_offline_mode():
        raise HubError(f"cannot push {repo_id}: offline mode is on (HF_HUB_OFFLINE)")
    if not hub_reachable():
        raise HubError(f"cannot push {repo_id}: the hub at {constants.ENDPOINT} cannot be reached")
    if token is None and get_token() is None:
        raise HubError(f"cannot push {repo_id}: no Hugging Face token; set HF_TOKEN or run `hf auth login`")


@contextmanager
def _hub_errors(repo_id: str, revision: str | None = None) -> Iterator[None]:
    """huggingface_hub's and the network's errors as one-line HubErrors that name the repository."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (HfHubHTTPError, HTTPError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    where = constants.ENDPOINT
    try:
        yield
    except RevisionNotFoundError as error:
        raise HubError(f"{repo_id} has no revision {revision!r} on {where}") from error
    except RepositoryNotFoundError as error:
        raise HubError(f"no model repository {repo_id} on {where} (a private one needs a token: HF_TOKEN)") \
            from error
    except LocalEntryNotFoundError as error:
        raise HubError(f"{repo_id} is not in the local hub cache and the hub at {where} cannot be reached") from error
    except HfHubHTTPError as error:
        status = error.response.status_code if error.response is not None else "?"
        reason = (error.server_message or str(error)).strip().splitlines()[0]
        raise HubError(f"the hub at {where} refused {repo_id} (HTTP {status}): {reason}") from error
    except (HTTPError, OSError) as error:  # the HTTP client's own (a refused connection) and the system's
        raise HubError(f"cannot reach the hub at {where} for {repo_id}: {type(error).__name__}: {error}") from error
