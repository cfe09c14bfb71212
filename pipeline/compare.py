"""Evaluation runs side by side: one self-contained HTML page (it renders in MLflow's artifact
viewer) and a plain-text table for the terminal.

    metrics    one column per run, named by what sets the runs apart (preset, checkpoint, decoding
               settings: pipeline/compare_settings.py), under those settings; every metric the runs
               logged (by NoCaps domain too), the best value of each row marked; the paper's
               numbers as a further column where a run's preset and split have some
    captions   each run's caption of the images the runs share, beside a thumbnail and the
               references; the images whose per-image CIDEr differs most between the runs first

An evaluation run (pipeline/evaluation.py) holds params `dataset` and `split`, metrics
"<dataset>_<split>/<metric>" and its captions as the artifact captions/<dataset>_<split>.json. The
references and image files are the workspace catalog's. Values are shown as logged, on
pycocoevalcap's raw scale (CIDEr 1.167 is the paper's 116.7); every metric is higher-is-better.
"""

import html
import json
import os
import re
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ituning.evaluation import METRICS, OVERALL
from pipeline.compare_settings import ALWAYS_SHOWN, column_names, run_settings, setting_rows, vision_of
from pipeline.gallery import PAGE_STYLE, thumbnail_data_uri

COMPARED_TAG = "ituning.compared_runs"  # on a compare run: the compared run ids, comma-separated
THUMBNAIL_SIDE = 160
RUN_ID = re.compile(r"[0-9a-f]{32}")

# The paper's scores (Karpathy test, beam 5) on the logged scale. NoCaps figures are its overall
# CIDEr; NoCaps has public references for val only, so val is the split a run can be scored on.
PAPER_SCORES = {
    "coco-gpt2": {"coco/test": {"BLEU-4": 0.348, "METEOR": 0.283, "CIDEr": 1.167, "SPICE": 0.218},
                  "nocaps/val": {"overall/CIDEr": 0.678}},
    "coco-gpt2-medium": {"coco/test": {"CIDEr": 1.200}, "nocaps/val": {"overall/CIDEr": 0.754}},
    "coco-gpt2-large": {"coco/test": {"CIDEr": 1.194}, "nocaps/val": {"overall/CIDEr": 0.785}},
    "coco-gpt2-large-vlp": {"coco/test": {"CIDEr": 1.222}},
}


class CompareError(ValueError):
    """Runs that cannot be compared: unknown, not evaluations, too few, or without shared images."""


@dataclass(frozen=True)
class EvaluatedRun:
    run_id: str
    name: str
    dataset: str
    split: str
    metrics: dict[str, float]  # as logged, without the "<dataset>_<split>/" prefix
    captions: dict[str, str]
    preset: str | None = None
    language_model: str = ""
    vision_model: str = ""
    notes: str = ""
    settings: dict[str, str] = field(default_factory=dict)  # pipeline/compare_settings.py's, by label

    @property
    def task(self) -> str:
        return f"{self.dataset}/{self.split}"

    @property
    def label(self) -> str:
        return f"{self.name} {self.run_id[:8]}"


@dataclass(frozen=True)
class PaperColumn:
    preset: str
    task: str
    scores: dict[str, float]


@dataclass(frozen=True)
class MetricRow:
    metric: str  # "CIDEr", or "<group>/CIDEr" for a NoCaps domain or the blind baseline
    values: tuple  # one per run, None where a run has no such metric
    paper: tuple = ()  # one per paper column
    best: frozenset = frozenset()  # positions of the runs holding the row's best value


@dataclass(frozen=True)
class ImageRow:
    image_id: str
    captions: tuple  # one per run
    cider: tuple | None  # per-image CIDEr, one per run; None without references
    references: tuple = ()
    image_path: Path | None = None


@dataclass(frozen=True)
class Comparison:
    runs: list[EvaluatedRun]
    paper: list[PaperColumn]
    table: list[MetricRow]
    shared: int  # images every run captioned
    images: list[ImageRow]  # those shown, the most different first
    notes: list[str] = field(default_factory=list)
    names: list[str] = field(default_factory=list)  # a column name per run: what sets it apart

    @property
    def settings(self) -> list[tuple[str, tuple[str, ...], bool]]:
        """(label, one value per run, whether they differ) for each setting."""
        return setting_rows([run.settings for run in self.runs])


# ---- the metrics table -------------------------------------------------------------------------


def metric_order(name: str) -> tuple:
    """Overall metrics first, then NoCaps "overall", then other groups by name; within each, the
    COCO metrics in their usual order, then any others (CLIP-S ...) by name."""
    group, _, metric = name.rpartition("/")
    group_rank = 0 if not group else 1 if group == OVERALL else 2
    metric_rank = METRICS.index(metric) if metric in METRICS else len(METRICS)
    return group_rank, group, metric_rank, metric


def best_of(values: Sequence[float | None]) -> frozenset:
    """Positions of the highest value; none when fewer than two runs have one or all are equal."""
    present = [value for value in values if value is not None]
    if len(present) < 2 or min(present) == max(present):
        return frozenset()
    return frozenset(index for index, value in enumerate(values) if value == max(present))


def metrics_table(run_metrics: Sequence[Mapping[str, float]],
                  paper: Sequence[Mapping[str, float]] = ()) -> list[MetricRow]:
    """A row per metric any run (or paper column) has, in metric_order, its best run marked."""
    names = sorted({name for metrics in [*run_metrics, *paper] for name in metrics}, key=metric_order)
    rows = []
    for name in names:
        values = tuple(metrics.get(name) for metrics in run_metrics)
        rows.append(MetricRow(name, values, tuple(scores.get(name) for scores in paper), best_of(values)))
    return rows


def paper_columns(runs: Sequence[EvaluatedRun]) -> list[PaperColumn]:
    """The paper's scores for each preset and split among the runs that it reports."""
    columns = []
    for run in runs:
        scores = PAPER_SCORES.get(run.preset or "", {}).get(run.task)
        if scores and all((column.preset, column.task) != (run.preset, run.task) for column in columns):
            columns.append(PaperColumn(run.preset, run.task, scores))
    return columns


# ---- per-image differences ---------------------------------------------------------------------


def shared_images(runs: Sequence[EvaluatedRun]) -> list[str]:
    """Image ids every run captioned, sorted; none across datasets (their ids are not the same images)."""
    if len({run.dataset for run in runs}) > 1:
        return []
    return sorted(set.intersection(*(set(run.captions) for run in runs)))


def cider_of_tokenized(candidates: Sequence[Mapping[str, str]],
                    references: Mapping[str, list[str]]) -> list[dict[str, float]]:
    """Each run's CIDEr per image over tokenized text, for the images of `references`. All runs are
    scored against the same references, which alone set CIDEr's n-gram weights: comparable scores."""
    from pycocoevalcap.cider.cider import Cider

    image_ids = sorted(references)
    gts = {key: list(references[key]) for key in image_ids}
    scored = []
    for captions in candidates:
        _, per_image = Cider().compute_score(gts, {key: [captions[key]] for key in image_ids})
        scored.append({key: float(value) for key, value in zip(image_ids, per_image)})
    return scored


def per_image_cider(candidates: Sequence[Mapping[str, str]],
                    references: Mapping[str, list[str]]) -> list[dict[str, float]]:
    """cider_of_tokenized after the PTB tokenization of the official evaluation (one Java call for
    the references, one for every run's captions)."""
    from ituning.evaluation import ptb_tokenize

    if shutil.which("java") is None:
        raise RuntimeError("per-image CIDEr needs Java (the PTB tokenizer is a jar): install a JRE")
    image_ids = sorted(references)
    tokenized_references = ptb_tokenize({key: list(references[key]) for key in image_ids})
    together = ptb_tokenize({key: [captions[key] for captions in candidates] for key in image_ids})
    tokenized = [{key: together[key][index] for key in image_ids} for index in range(len(candidates))]
    return cider_of_tokenized(tokenized, tokenized_references)


def rank_by_difference(per_image: Sequence[Mapping[str, float]]) -> list[tuple[str, float]]:
    """(image id, highest minus lowest per-image score over the runs), largest difference first,
    ties in image id order."""
    image_ids = set.intersection(*(set(scores) for scores in per_image))
    spread = {key: max(scores[key] for scores in per_image) - min(scores[key] for scores in per_image)
              for key in image_ids}
    return sorted(spread.items(), key=lambda item: (-item[1], item[0]))


def build_comparison(runs: Sequence[EvaluatedRun], references: Mapping[str, list[str]],
                     image_paths: Mapping[str, Path], limit: int = 50) -> Comparison:
    """The table and up to `limit` shared images, those the runs differ most on first (images
    without references after them, by id)."""
    if len(runs) < 2:
        raise CompareError(f"give at least two evaluation runs to compare, not {len(runs)}")
    shared = shared_images(runs)
    if not shared:
        tasks = ", ".join(f"{run.label}: {run.task}" for run in runs)
        raise CompareError(f"the runs share no images ({tasks}); compare evaluations of the same split")
    notes = [f"{run.label}: {run.notes}" for run in runs if run.notes]
    scored = [key for key in shared if references.get(key)]
    order, cider = [], {}
    if scored and shutil.which("java") is None:
        notes.append("no per-image CIDEr: it needs Java (the PTB tokenizer is a jar); install a JRE")
    elif scored:
        per_image = per_image_cider([run.captions for run in runs], {key: references[key] for key in scored})
        order = [key for key, _ in rank_by_difference(per_image)]
        cider = {key: tuple(scores[key] for scores in per_image) for key in order}
    if len(scored) < len(shared):
        notes.append(f"{len(shared) - len(scored)} of {len(shared)} shared images have no references in the "
                     "workspace catalog: no per-image CIDEr for them")
    order += [key for key in shared if key not in cider]
    images = [ImageRow(key, tuple(run.captions[key] for run in runs), cider.get(key),
                       tuple(references.get(key, [])), image_paths.get(key)) for key in order[:limit]]
    paper = paper_columns(runs)
    table = metrics_table([run.metrics for run in runs], [column.scores for column in paper])
    names = column_names([run.settings for run in runs], [run.label for run in runs], [run.run_id for run in runs])
    return Comparison(list(runs), paper, table, len(shared), images, notes, names)


# ---- reading runs from MLflow --------------------------------------------------------------------


def store_uri(workspace: Path) -> str:
    """$MLFLOW_TRACKING_URI, else the workspace's SQLite store, which must exist (no empty one is made)."""
    from pipeline.tracking import tracking_uri
    from storage.workspace import workspace_root

    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    database = workspace_root(workspace) / "mlflow.db"
    if not database.is_file():
        raise CompareError(f"no MLflow store at {database}: pass the --workspace the runs were tracked in")
    return tracking_uri(workspace)


def load_runs(workspace: Path, references: Sequence[str]) -> list[EvaluatedRun]:
    """The evaluation runs named by id (or by run name, when that is unique)."""
    from mlflow.tracking import MlflowClient

    uri = store_uri(workspace)
    client = MlflowClient(tracking_uri=uri)
    found = [find_run(client, uri, reference) for reference in references]
    for run in found:  # all checked before anything is downloaded
        if not is_evaluation(run):
            raise CompareError(f"run {run.info.run_id} ({run.info.run_name}) is not an evaluation run; compare "
                               "runs of `ituning evaluate` or of the pipeline's evaluate steps")
    ids = [run.info.run_id for run in found]
    twice = sorted({run_id for run_id in ids if ids.count(run_id) > 1})
    if twice:
        raise CompareError(f"run {', '.join(twice)} is given more than once; compare different runs")
    with tempfile.TemporaryDirectory(prefix="ituning-compare-") as folder:
        return [evaluated_run(client, run, Path(folder)) for run in found]


def find_run(client, uri: str, reference: str):
    from mlflow.exceptions import MlflowException

    if RUN_ID.fullmatch(reference):
        try:
            return client.get_run(reference)
        except MlflowException:
            raise CompareError(f"unknown run {reference}: no run with this id in {uri}") from None
    named = []
    if "'" not in reference:
        experiments = [experiment.experiment_id for experiment in client.search_experiments()]
        named = client.search_runs(experiments, f"attributes.run_name = '{reference}'") if experiments else []
    named = [run for run in named if is_evaluation(run)] or named  # not the pipeline run named alike
    if len(named) > 1:
        ids = ", ".join(run.info.run_id for run in named[:5]) + (", ..." if len(named) > 5 else "")
        raise CompareError(f"{len(named)} runs are named {reference!r}; give a run id instead ({ids})")
    if not named:
        raise CompareError(f"unknown run {reference!r}: no run with this id or name in {uri}")
    return named[0]


def is_evaluation(run) -> bool:
    """An evaluation step's run: the step tag evaluation runs carry, and the split it scored."""
    from pipeline.tracking import STEP_TAG

    params = run.data.params
    scored_split = bool(params.get("dataset") and params.get("split"))
    return run.data.tags.get(STEP_TAG, "").startswith("evaluate") and scored_split


def evaluated_run(client, run, folder: Path) -> EvaluatedRun:
    params, tags, run_id = run.data.params, run.data.tags, run.info.run_id
    dataset, split = params["dataset"], params["split"]
    prefix = f"{dataset}_{split}/"
    metrics = {name[len(prefix):]: value for name, value in run.data.metrics.items() if name.startswith(prefix)}
    preset = preset_of(client, run)
    return EvaluatedRun(
        run_id, run.info.run_name, dataset, split, metrics, logged_captions(client, run, f"{dataset}_{split}", folder),
        preset, params.get("backbones.language_model", ""), vision_of(params), tags.get("ituning.notes", ""),
        run_settings(params, preset))


def logged_captions(client, run, split_key: str, folder: Path) -> dict[str, str]:
    artifact = f"captions/{split_key}.json"
    if artifact not in {item.path for item in client.list_artifacts(run.info.run_id, "captions")}:
        raise CompareError(f"run {run.info.run_id} ({run.info.run_name}, {run.info.status}) logged no {artifact}")
    local = client.download_artifacts(run.info.run_id, artifact, str(folder / run.info.run_id))
    return json.loads(Path(local).read_text(encoding="utf-8"))


def preset_of(client, run) -> str | None:
    """The config a run's pipeline ran (its parent run's `config` param, a preset name or YAML
    path), else the one its checkpoint path names (runs/<preset>/<stage>/<checkpoint>)."""
    from mlflow.exceptions import MlflowException

    from pipeline.tracking import PARENT_TAG

    parent_id = run.data.tags.get(PARENT_TAG)
    if parent_id:
        try:
            config = client.get_run(parent_id).data.params.get("config")
        except MlflowException:  # the parent was deleted
            config = None
        if config:
            return Path(config).stem
    parts = Path(run.data.params.get("checkpoint", "")).parts
    return parts[-3] if len(parts) >= 4 and parts[-4] == "runs" else None


def catalog_split(workspace: Path, dataset: str, split: str) -> tuple[dict[str, list[str]], dict[str, Path]]:
    """(references, image paths) of a split from the workspace catalog; empty without a catalog."""
    from pipeline.data import open_catalog

    try:
        catalog = open_catalog(workspace)
    except FileNotFoundError:
        return {}, {}
    with catalog:
        return catalog.captions(dataset, split), dict(catalog.image_paths(dataset, split))


def compare_runs(workspace: Path, references: Sequence[str], limit: int = 50) -> Comparison:
    """Read the runs and the catalog's references and images of their splits; compare them."""
    if len(references) < 2:
        raise CompareError(f"give at least two evaluation runs to compare, not {len(references)}")
    runs = load_runs(workspace, references)
    captions, paths = {}, {}
    for dataset, split in sorted({(run.dataset, run.split) for run in runs}):
        found_captions, found_paths = catalog_split(workspace, dataset, split)
        captions.update(found_captions)
        paths.update(found_paths)
    return build_comparison(runs, captions, paths, limit)


def require_run(workspace: Path, run_id: str) -> None:
    """Refuse a run to log to that the store does not hold, before any work is done."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        MlflowClient(tracking_uri=store_uri(workspace)).get_run(run_id)
    except MlflowException:
        raise CompareError(f"--log-to: unknown run {run_id}") from None


def log_report(workspace: Path, report: Path, run_ids: Sequence[str], log_to: str | None = None) -> str:
    """The report as an artifact (compare/<file name>) of `log_to`, or of a new run "compare"
    tagged with the compared run ids; returns the run id."""
    from pipeline.tracking import STEP_TAG, ExperimentTracker

    tracker = ExperimentTracker(uri=store_uri(workspace))
    if log_to:
        require_run(workspace, log_to)
        tracker.client.log_artifact(log_to, str(report), "compare")
        return log_to
    note = "Evaluation runs compared side by side: " + ", ".join(run_ids)
    tags = {STEP_TAG: "compare", COMPARED_TAG: ",".join(run_ids), "mlflow.note.content": note}
    run_id = tracker.client.create_run(tracker.experiment_id, run_name="compare", tags=tags).info.run_id
    try:
        tracker.client.log_artifact(run_id, str(report), "compare")
    except BaseException:
        tracker.finish(run_id, failed=True)
        raise
    tracker.finish(run_id)
    return run_id


# ---- writing it out ------------------------------------------------------------------------------


def number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def text_table(comparison: Comparison) -> str:
    """The metrics table in fixed-width columns; a * marks each row's best run."""
    runs, paper = comparison.runs, comparison.paper
    header = ["", *_names(comparison), *(f"paper {column.preset}" for column in paper)]
    rows = [header, ["dataset/split", *(run.task for run in runs), *(column.task for column in paper)]]
    for label, values, differs in comparison.settings:
        if differs or label in ALWAYS_SHOWN:
            rows.append([label, *values, *(column.preset if label == "preset" else "" for column in paper)])
    for row in comparison.table:
        cells = [number(value) + ("*" if index in row.best else "") for index, value in enumerate(row.values)]
        rows.append([row.metric, *cells, *(number(value) for value in row.paper)])
    widths = [max(len(line[column]) for line in rows) for column in range(len(header))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip() for line in rows]
    return "\n".join([*lines, "* best of the runs"]) + "\n"


def _names(comparison: Comparison) -> list[str]:
    return comparison.names or [run.label for run in comparison.runs]


COMPARE_STYLE = (".best{font-weight:bold;background:#e3f4e3}tr.differs th,tr.differs td{background:#fff4d6}"
                 ".paper{color:#555;font-style:italic}"
                 "td.number{text-align:right;font-variant-numeric:tabular-nums}.score{color:#555}"
                 "th.metric{white-space:nowrap}td{word-break:break-word}")


def _cell(text: str, css: str = "") -> str:
    return f'<td class="{css}">{html.escape(text)}</td>' if css else f"<td>{html.escape(text)}</td>"


def _metrics_section(comparison: Comparison) -> str:
    runs, paper = comparison.runs, comparison.paper
    head = "".join(f"<th>{html.escape(name)}<br><code>{run.run_id}</code></th>"
                   for name, run in zip(_names(comparison), runs))
    head += "".join(f'<th class="paper">paper: {html.escape(c.preset)}<br>{html.escape(c.task)}</th>' for c in paper)
    blank = "".join(_cell("") for _ in paper)
    details = [("dataset/split", [run.task for run in runs], False),
               ("language model", [run.language_model for run in runs], False),
               ("vision model", [run.vision_model for run in runs], False), *comparison.settings]
    lines = [f'<tr class="setting{" differs" if differs else ""}"><th class="metric">{html.escape(label)}</th>'
             f'{"".join(_cell(v) for v in values)}{blank}</tr>' for label, values, differs in details]
    for row in comparison.table:
        cells = "".join(_cell(number(value), "number best" if index in row.best else "number")
                        for index, value in enumerate(row.values))
        cells += "".join(_cell(number(value), "number paper") for value in row.paper)
        lines.append(f'<tr><th class="metric">{html.escape(row.metric)}</th>{cells}</tr>')
    return (f'<h2>Metrics</h2><table id="metrics"><tr><th></th>{head}</tr>\n' + "\n".join(lines) + "\n</table>"
            "<p>Values as logged (CIDEr 1.167 is the paper's 116.7); the best run of each row is highlighted, and "
            "the settings that differ between the runs, which name the columns, are marked.</p>")


def _thumbnail(row: ImageRow) -> str:
    if row.image_path is None:
        return "<br>(no image file in the catalog)"
    try:
        source = thumbnail_data_uri(row.image_path, THUMBNAIL_SIDE)
    except OSError:
        return "<br>(image file unreadable)"
    return f'<br><img class="photo" src="{source}" alt="{html.escape(row.image_id)}">'


def _image_row(row: ImageRow) -> str:
    best = best_of(row.cider) if row.cider else frozenset()
    cells = []
    for index, caption in enumerate(row.captions):
        score = f'<br><span class="score">CIDEr {number(row.cider[index])}</span>' if row.cider else ""
        css = ' class="best"' if index in best else ""
        cells.append(f"<td{css}>{html.escape(caption)}{score}</td>")
    spread = f"<br>difference {number(max(row.cider) - min(row.cider))}" if row.cider else ""
    references = "".join(f"<li>{html.escape(text)}</li>" for text in row.references)
    return (f'<tr class="image" id="image-{html.escape(row.image_id, quote=True)}"><td>{html.escape(row.image_id)}'
            f"{spread}{_thumbnail(row)}</td>{''.join(cells)}<td><ul>{references}</ul></td></tr>")


def _captions_section(comparison: Comparison) -> str:
    head = "".join(f"<th>{html.escape(name)}</th>" for name in _names(comparison))
    rows = "\n".join(_image_row(row) for row in comparison.images)
    return (f"<h2>Captions where the runs differ most</h2><p>{len(comparison.images)} of the {comparison.shared} "
            "images the runs share, by how far apart the runs' per-image CIDEr is (highest minus lowest), computed "
            "here on the shared images' references.</p>"
            f'<table id="captions"><tr><th>image</th>{head}<th>references</th></tr>\n{rows}\n</table>')


def render_html(comparison: Comparison) -> str:
    title = "Comparison of " + ", ".join(_names(comparison))
    notes = "".join(f"<li>{html.escape(note)}</li>" for note in comparison.notes)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{PAGE_STYLE}{COMPARE_STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
            f"{_metrics_section(comparison)}\n{f'<h2>Notes</h2><ul>{notes}</ul>' if notes else ''}\n"
            f"{_captions_section(comparison)}\n</body></html>\n")


def write_html(comparison: Comparison, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render_html(comparison), encoding="utf-8")
    return path
