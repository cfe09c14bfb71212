"""Training configurations: small dataclasses read from YAML, every key and value checked.

A run is a model (backbones and module settings) and one or two stages: optional pre-training on
Visual Genome region descriptions, then fine-tuning on a captioning dataset (COCO, Flickr30k ...).
An unknown key, a missing one or a bad value is a `ConfigError` that names the key, e.g.
`stages[1].epochs`; the application checks the datasets and splits against its dataset registry
(check_datasets).
"""

import copy
import re
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Literal

import yaml

from ituning.backbones import BackboneSpec
from ituning.clip_score import PAPER_MODEL, PAPER_PRETRAINED
from ituning.evaluation import METRICS
from ituning.model import ITuningConfig
from ituning.precision import FORMER_SPELLINGS
from ituning.provenance import DEFAULT_LICENSE, is_license_id

# Run and stage names are folder names (runs/<run>/<stage>/): one path component, never "." or "..",
# nothing a shell or another file system reads differently.
FOLDER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
FOLDER_NAME_RULE = "must be a folder name: 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit"
OVERRIDE_STEP = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:\[(\d+)\])?")  # one step of a --set key
# Values an earlier version spelled otherwise, by key: read, and kept in today's spelling.
FORMER_VALUES = {"precision": FORMER_SPELLINGS}


def is_folder_name(name: str) -> bool:
    return FOLDER_NAME.fullmatch(name) is not None


class ConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the offending key."""


@dataclass(frozen=True)
class ModelSettings:
    vision_model: str = "ViT-B-16"
    vision_pretrained: str | None = "openai"
    language_model: str = "gpt2"
    bottleneck: int | None = None  # r; None means d_model // 2
    scale: float = 4.0  # λ
    drop_first: int = 0  # I-Tuning Dropping
    # The backbones are stand-ins the pipeline trains into the workspace (the offline demo), at the
    # relative local paths above; nothing is fetched from the hub.
    standins: bool = False

    def checks(self):
        yield "bottleneck", self.bottleneck is None or self.bottleneck > 0, "must be positive"
        yield "scale", self.scale > 0, "must be positive"
        yield "drop_first", self.drop_first >= 0, "must be 0 or more"

    def backbones(self) -> BackboneSpec:
        return BackboneSpec(self.vision_model, self.vision_pretrained, self.language_model)

    def ituning(self) -> ITuningConfig:
        return ITuningConfig(bottleneck=self.bottleneck, scale=self.scale, drop_first=self.drop_first)


@dataclass(frozen=True)
class StageConfig:
    name: str
    dataset: str  # a dataset that has a training split (checked by check_datasets)
    epochs: int
    train_split: str = "train"
    val_split: str | None = "val"  # None: no validation (VG pre-training)
    captions: Literal["all", "random"] = "all"  # every caption once per epoch, or one random caption per image
    batch_size: int = 4096  # the paper's effective batch
    # per forward pass; gradients accumulate up to batch_size. auto: the largest divisor of batch_size
    # that fits the GPU's free memory (measured on the model), at most 64 on the CPU
    micro_batch_size: int | Literal["auto"] = 64
    learning_rate: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05  # linear warm-up over this share of the steps, then cosine decay to 0
    max_grad_norm: float = 1.0
    max_caption_tokens: int = 40  # EOS included
    precision: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 autocast on a CUDA device that has it
    data_workers: int | None = None  # processes collating micro-batches ahead; None: 4 on CUDA, 0 on CPU
    share_visual: bool = True  # an image's visual keys/values once per micro-batch for all its captions
    # The split's visual tokens and caption ids held on the training device, micro-batches gathered
    # there; auto: on a CUDA device whose free memory holds them with room to spare
    data_on_device: bool | Literal["auto"] = "auto"
    compile: bool | Literal["auto"] = "auto"  # torch.compile the training step; auto: on CUDA only
    checkpoint_every_steps: int = 0  # 0: only at the end of each epoch
    validate_every_epochs: int = 1
    val_images: int | None = None  # score only the first n validation images (None: all)
    val_beams: int = 1  # greedy during training; the final test uses the paper's beam of 5
    val_max_length: int = 20
    # scored at each validation; CIDEr picks the best checkpoint. METEOR starts a Java process that loads
    # its paraphrase tables (seconds each time), so it is left to the final evaluation unless asked for.
    val_metrics: list[str] = field(default_factory=lambda: ["CIDEr"])
    init_from: str | None = None  # a module checkpoint to start from (e.g. external pre-training)
    seed: int = 0  # the epochs' caption order; the first stage's also seeds the fresh modules

    def checks(self):
        yield "name", is_folder_name(self.name), FOLDER_NAME_RULE
        for key in ("epochs", "batch_size", "max_caption_tokens", "validate_every_epochs", "val_beams",
                    "val_max_length"):
            yield key, getattr(self, key) > 0, "must be positive"
        if self.micro_batch_size != "auto":
            yield "micro_batch_size", self.micro_batch_size > 0, "must be positive or auto"
            yield "batch_size", self.batch_size % max(1, self.micro_batch_size) == 0, \
                "must be a multiple of micro_batch_size"
        yield "learning_rate", self.learning_rate > 0, "must be positive"
        yield "weight_decay", self.weight_decay >= 0, "must be 0 or more"
        yield "warmup_fraction", 0 <= self.warmup_fraction < 1, "must be in [0, 1)"
        yield "max_grad_norm", self.max_grad_norm > 0, "must be positive"
        yield "checkpoint_every_steps", self.checkpoint_every_steps >= 0, "must be 0 or more"
        yield "val_images", self.val_images is None or self.val_images > 0, "must be positive"
        yield "data_workers", self.data_workers is None or self.data_workers >= 0, "must be 0 or more"
        yield "val_metrics", "CIDEr" in self.val_metrics and set(self.val_metrics) <= set(METRICS), \
            f"must include CIDEr (it picks the best checkpoint) and name only {', '.join(METRICS)}"


@dataclass(frozen=True)
class EvaluationSettings:
    # CLIPScore's CLIP, a whole one (text tower too): an open_clip name, hf-hub:org/name or
    # local-dir:PATH; null turns CLIP-S and RefCLIP-S off. The paper's is ViT-B-32 with OpenAI's weights.
    clip_score_model: str | None = PAPER_MODEL
    clip_score_pretrained: str | None = PAPER_PRETRAINED  # tag or weights file; unused for local-dir:/hf-hub:

    def checks(self):
        yield "clip_score_model", self.clip_score_model is None or self.clip_score_model.strip() != "", (
            "must name a CLIP model, or be null for no CLIPScore")


@dataclass(frozen=True)
class RunConfig:
    name: str
    stages: list[StageConfig]
    model: ModelSettings = field(default_factory=ModelSettings)
    device: str = "auto"
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)  # how test splits are scored
    # The trained modules' licence, as a hub licence id; recorded in each checkpoint, and on its model card.
    license: str = DEFAULT_LICENSE

    def checks(self):
        yield "name", is_folder_name(self.name), FOLDER_NAME_RULE
        yield "license", is_license_id(self.license), ("must be a hub licence id: lowercase letters, digits, "
                                                       "'.', '-' or '+', e.g. apache-2.0, mit, cc-by-4.0, other")
        yield "stages", len(self.stages) > 0, "must hold at least one stage"
        folders = {stage.name.lower() for stage in self.stages}  # some file systems ignore case
        yield "stages", len(folders) == len(self.stages), "stage names must differ (ignoring case)"


def load_config(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    """The YAML file's config, with `overrides` (see apply_overrides) applied before it is checked."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML ({error})") from error
    try:
        return config_from_dict(apply_overrides(data, overrides))
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def apply_overrides(data, assignments: list[str]):
    """A copy of a config's data with `KEY=VALUE` assignments made, as the command line's `--set`
    gives them: KEY is a dotted path with list indices (`stages[0].epochs`, `model.drop_first`,
    `device`), VALUE is read as YAML (`3`, `1e-4`, `true`, `[a, b]`). The result is checked like
    the file itself, so a wrong key or value names itself."""
    data = copy.deepcopy(data)
    for assignment in assignments:
        path, separator, text = assignment.partition("=")
        if not separator or not path.strip():
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. stages[0].epochs=3")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as error:
            raise ConfigError(f"--set {assignment!r}: the value is not valid YAML ({error})") from error
        _assign(data, path.strip(), value, assignment)
    return data


def _assign(data, path: str, value, assignment: str) -> None:
    parts = path.split(".")
    target = data
    for position, part in enumerate(parts):
        match = OVERRIDE_STEP.fullmatch(part)
        if match is None:
            raise ConfigError(f"--set {assignment!r}: {part!r} is neither a key nor key[index]")
        if not isinstance(target, dict):
            raise ConfigError(f"--set {assignment!r}: {'.'.join(parts[:position])} holds no keys")
        key, index, last = match.group(1), match.group(2), position == len(parts) - 1
        if index is None:
            if last:
                target[key] = value
            else:
                target = target.setdefault(key, {})
            continue
        items = target.get(key)
        if not isinstance(items, list) or int(index) >= len(items):
            count = len(items) if isinstance(items, list) else 0
            raise ConfigError(f"--set {assignment!r}: {key} has {count} item(s), no [{index}]")
        if last:
            items[int(index)] = value
        else:
            target = items[int(index)]


def check_datasets(config: RunConfig, trained_on: dict[str, tuple[str, str | None]],
                   evaluated_only: tuple[str, ...] = ()) -> RunConfig:
    """`config` when every stage names a dataset of `trained_on` (name -> (training split,
    validation split or None), as the application's dataset registry gives them) and its splits;
    otherwise a ConfigError naming the stage's key. There is no "synthetic" dataset: the synthetic
    corpus is written in these datasets' formats and catalogued under their names."""
    for index, stage in enumerate(config.stages):
        where, splits = f"stages[{index}]", trained_on.get(stage.dataset)
        only_scored = f"; {' and '.join(evaluated_only)} {'is' if len(evaluated_only) == 1 else 'are'} only evaluated"
        checks = [("dataset", splits is not None, f"must be one of {', '.join(trained_on)} (a synthetic corpus is "
                   f"catalogued under these names{only_scored if evaluated_only else ''})")]
        if splits is not None:
            trains_on, validates_on = splits
            checks += [("train_split", stage.train_split == trains_on, f"{stage.dataset} trains on {trains_on!r}"),
                       ("val_split", stage.val_split in (None, validates_on),
                        f"{stage.dataset} validates on {validates_on!r} or null" if validates_on
                        else f"{stage.dataset} has no validation split, so it must be null")]
        for key, ok, message in checks:
            if not ok:
                raise ConfigError(f"{_join(where, key)}: {message}, got {getattr(stage, key)!r}")
    return config


def config_from_dict(data) -> RunConfig:
    return _build(RunConfig, data, "")


def config_to_dict(config) -> dict:
    """The resolved config, every default filled in (logged as run parameters)."""
    if isinstance(config, list):
        return [config_to_dict(item) for item in config]
    if hasattr(config, "__dataclass_fields__"):
        return {f.name: config_to_dict(getattr(config, f.name)) for f in fields(config)}
    return config


def _build(cls, data, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    known = {f.name: f for f in fields(cls)}
    for key in data:
        if key not in known:
            raise ConfigError(f"{_join(where, key)}: unknown key (expected one of {', '.join(known)})")
    values = {}
    for name, spec in known.items():
        if name in data:
            values[name] = _convert(hints[name], _today_spelling(name, data[name]), _join(where, name))
        elif spec.default is MISSING and spec.default_factory is MISSING:
            raise ConfigError(f"{_join(where, name)}: required key is missing")
    instance = cls(**values)
    for key, ok, message in instance.checks():
        if not ok:
            raise ConfigError(f"{_join(where, key)}: {message}, got {getattr(instance, key)!r}")
    return instance


def _convert(hint, value, where: str):
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _convert_to_one_of([arg for arg in args if arg is not type(None)], value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__}")
        return [_convert(args[0], item, f"{where}[{index}]") for index, item in enumerate(value)]
    if hasattr(hint, "__dataclass_fields__"):
        return _build(hint, value, where)
    return _scalar(hint, value, where)


def _convert_to_one_of(hints: list, value, where: str):
    """The value as the first of `hints` it converts to (e.g. `bool | Literal["auto"]`)."""
    if len(hints) == 1:
        return _convert(hints[0], value, where)
    for hint in hints:
        try:
            return _convert(hint, value, where)
        except ConfigError:
            continue
    raise ConfigError(f"{where}: must be {' or '.join(_hint_name(hint) for hint in hints)}, got {value!r}")


def _hint_name(hint) -> str:
    if typing.get_origin(hint) is Literal:
        return " or ".join(map(str, typing.get_args(hint)))
    return hint.__name__


def _scalar(hint, value, where: str):
    if hint is float and isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if hint in (str, bool) and isinstance(value, hint):
        return value
    raise ConfigError(f"{where}: expected {hint.__name__}, got {value!r}")


def _today_spelling(key: str, value):
    former = FORMER_VALUES.get(key, {})
    return former.get(value, value) if isinstance(value, str) else value


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key
