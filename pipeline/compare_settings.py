"""What sets compared evaluation runs apart: the settings a comparison shows, and column names made
of those that differ ("beams 5" beside "beams 1 (greedy)"), not of run names they share.

An evaluation run (pipeline/evaluation.py) logs its settings as params: `checkpoint`, `decoding.*`
(DecodingConfig: num_beams, max_length, min_length, length_penalty, and a rerank setting where a
run has one) and `clip_score.*`; its preset comes from its pipeline run. A run that did not log a
setting shows "–" for it.
"""

from collections.abc import Mapping, Sequence
from pathlib import PurePath

MISSING = "–"
SEPARATOR = " · "
# (label, the param holding it), in the order the settings are shown; preset and checkpoint first
DECODING_PARAMS = (("beams", "decoding.num_beams"), ("max length", "decoding.max_length"),
                   ("min length", "decoding.min_length"), ("length penalty", "decoding.length_penalty"),
                   ("rerank", "decoding.rerank"))
NAMED_BY_VALUE = ("preset", "checkpoint")  # a column name shows these values without their label
ALWAYS_SHOWN = ("preset", "checkpoint", "beams", "max length")  # in the terminal table, differing or not


def run_settings(params: Mapping[str, str], preset: str | None) -> dict[str, str]:
    """The settings of one evaluation run, by label; a rerank setting only when the run logged one."""
    settings = {"preset": preset or MISSING, "checkpoint": params.get("checkpoint", MISSING)}
    for label, key in DECODING_PARAMS:
        if key in params or label != "rerank":
            settings[label] = _shown(label, params.get(key))
    settings["CLIP for CLIP-S"] = _clip(params)
    return settings


def _shown(label: str, value: str | None) -> str:
    if value is None:
        return MISSING
    return f"{value} (greedy)" if label == "beams" and value == "1" else value


def _clip(params: Mapping[str, str]) -> str:
    from pipeline.model_sources import clip_of

    model = params.get("clip_score.clip_score_model")
    if model in ("None", "null"):
        return "none"
    return clip_of(params) or MISSING


def vision_of(params: Mapping[str, str]) -> str:
    """The vision model and its pretrained weights ("ViT-B-16 (openai)"); params hold no weights as "null"."""
    weights = params.get("backbones.vision_pretrained")
    model = params.get("backbones.vision_model", "")
    return f"{model} ({weights})" if weights and weights not in ("null", "None") else model


def setting_rows(settings: Sequence[Mapping[str, str]]) -> list[tuple[str, tuple[str, ...], bool]]:
    """(label, one value per run, whether they differ) for every setting any run has."""
    labels = list(dict.fromkeys(label for run in settings for label in run))
    rows = []
    for label in labels:
        values = tuple(run.get(label, MISSING) for run in settings)
        rows.append((label, values, len(set(values)) > 1))
    return rows


def column_names(settings: Sequence[Mapping[str, str]], fallbacks: Sequence[str], run_ids: Sequence[str]) -> list[str]:
    """A name per run made of the settings that differ between the runs ("coco-gpt2 · beams 5"); the
    fallback (run name and id) where none differs, the run id added where names still coincide."""
    differing = [(label, values) for label, values, differs in setting_rows(settings) if differs]
    shortened = {label: _short_paths(values) if label == "checkpoint" else values for label, values in differing}
    names = []
    for index, fallback in enumerate(fallbacks):
        parts = [shortened[label][index] if label in NAMED_BY_VALUE else f"{label} {shortened[label][index]}"
                 for label, _ in differing]
        names.append(SEPARATOR.join(parts) or fallback)
    return [f"{name} ({run_id[:8]})" if names.count(name) > 1 else name for name, run_id in zip(names, run_ids)]


def _short_paths(paths: Sequence[str]) -> list[str]:
    """The paths cut to their last parts (two at least), as few as still tell them apart."""
    parts = [PurePath(path).parts for path in paths]
    for keep in range(2, max(len(item) for item in parts) + 1):
        cut = ["/".join(item[-keep:]) for item in parts]
        if len(set(cut)) == len(set(paths)):
            return cut
    return list(paths)
