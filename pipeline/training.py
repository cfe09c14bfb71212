"""Training one stage of a config as a child run of the pipeline's MLflow run: its inputs, where it
starts, its checkpoint folder and what it was trained from.
"""

import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

from pipeline.data import catalog_fingerprint, content_digest, is_synthetic, open_catalog
from pipeline.features import feature_entry
from pipeline.presets import resolve_config
from pipeline.step_locks import folder_writer
from pipeline.tracking import ExperimentTracker
from storage.atomic import write_atomically
from storage.feature_cache import FeatureReader
from storage.workspace import catalog_path, in_workspace_terms

TRAINED_FROM = "trained_from.json"


def split_data(workspace: Path, dataset: str, split: str, backbones: dict, device: str = "auto"):
    """(FeatureReader, captions of the images it holds) for a split, checked against the catalog;
    the feature cache is the one of `device`'s precision when there is one."""
    entry = feature_entry(workspace, dataset, split, backbones, device)
    if not entry.is_file():
        raise FileNotFoundError(f"{dataset}/{split}: no feature cache at {entry}; build it first "
                                f"(`ituning features --dataset {dataset} --split {split} ...`)")
    reader = FeatureReader(entry)
    with open_catalog(workspace) as catalog:
        fingerprint = catalog.image_list_fingerprint(dataset, split)
        captions = catalog.captions(dataset, split)
    if reader.attrs["image_list_fingerprint"] != fingerprint:
        raise ValueError(f"{entry}: built for another image list than the catalog's {dataset}/{split}; rebuild it")
    return reader, {image_id: texts for image_id, texts in captions.items() if image_id in reader}


def log_split_inputs(tracker: ExperimentTracker, run_id: str, workspace: Path, dataset: str, split: str,
                     reader, context: str) -> None:
    """The split as a dataset input of the run, with the feature cache's identity as params and
    whether the catalog holds the synthetic corpus under the dataset's name
    (`data.<context>.<dataset>/<split>.synthetic`, what a model card reads)."""
    tracker.log_dataset(run_id, f"{dataset}/{split}", reader.attrs["image_list_fingerprint"],
                        catalog_path(Path(workspace)).resolve(), context, images=len(reader))
    synthetic = str(is_synthetic(workspace, dataset)).lower()
    tracker.log_params(run_id, {**{f"features.{context}.{key}": value for key, value in reader.attrs.items()},
                                f"data.{context}.{dataset}/{split}.synthetic": synthetic})


def train_stage(workspace: Path, config: str, stage: str, parent_run_id: str | None = None,
                init_from: str | None = None, device: str = "auto", resume: bool = True,
                out_dir: str | None = None, progress: bool = True, previous: str | None = None) -> dict:
    """Train one stage of a config on the catalog's captions and the feature cache, tracked as a
    child run of `parent_run_id` (of a pipeline run of its own when None). Checkpoints go to
    <out_dir>/<stage>/, by default workspace/runs/<config name>/<stage>/; a rerun continues from
    the stage's last checkpoint unless resume is False or its settings or data changed since. Under
    torchrun every process trains and rank 0 alone tracks (the others return run_id None).

    The stage starts from, in this order: `init_from`, the stage's own `init_from` in the config,
    `previous` (the checkpoint the stage before it just produced), or that stage's checkpoint in
    the run folder; the first stage of a config starts from fresh modules."""
    from ituning.config import config_to_dict
    from ituning.distributed import is_main_process
    from ituning.fast_paths import fallbacks

    workspace = Path(workspace)
    run_config = resolve_config(config, workspace)
    runs = workspace / "runs"
    out = Path(os.path.normpath(out_dir)) if out_dir else runs / run_config.name  # no "x/.." left in it
    if not out_dir and out.resolve().parent != runs.resolve():  # a folder of runs/, not a link out of it
        raise ValueError(f"{run_config.name}: the run folder {out} resolves to {out.resolve()}, not to a folder "
                         f"of {runs}; pass out_dir to keep a run elsewhere")
    start = starting_point(run_config, stage, out, init_from, previous)
    if start and not Path(start).exists():  # before anything in the stage folder is touched
        raise FileNotFoundError(f"{run_config.name}/{stage}: no checkpoint at {start} to start from")
    stage_config = _stage_named(run_config, stage, start)
    whole = replace(run_config, stages=[stage_config if item.name == stage else item for item in run_config.stages])
    run_config = replace(run_config, stages=[stage_config])
    if not is_main_process():
        data = _stage_inputs(workspace, run_config, stage_config, device)
        return {**_train(workspace, run_config, data, out, device, resume, False, whole=whole), "run_id": None}
    tracker = ExperimentTracker(workspace=workspace)
    settings = config_to_dict(run_config)
    # One writer per stage folder: a second run waits here, then finds the stage done and reuses it.
    with folder_writer(out / stage, f"training {run_config.name}/{stage}"), \
            child_run(tracker, parent_run_id, run_config.name, stage, settings, stage_config.seed, stage) as run_id:
        data = _stage_inputs(workspace, run_config, stage_config, device)
        _log_stage_inputs(tracker, run_id, workspace, stage_config, data)
        result = _train(workspace, run_config, data, out, device, resume, progress, [tracker.callbacks(run_id)], whole)
        tracker.log_checkpoint(run_id, result["checkpoint"], "checkpoint")
    return {**result, "run_id": run_id, "fallbacks": fallbacks()}


@contextmanager
def child_run(tracker: ExperimentTracker, parent_run_id: str | None, pipeline: str, step: str, settings: dict,
              seed: int | None = None, stage: str | None = None):
    """A step's child run (params: settings, code version, seed; `stage` for a training stage),
    under `parent_run_id` or, when None, under a pipeline run of its own; both end FAILED if the
    block raises."""
    parent = parent_run_id or tracker.start_pipeline(pipeline, settings, seed)
    try:
        with tracker.step_run(parent, step, settings, stage) as run_id:
            if seed is not None:
                tracker.log_params(run_id, {"seed": seed})
            yield run_id
    except BaseException:
        if parent_run_id is None:
            tracker.finish(parent, failed=True)
        raise
    if parent_run_id is None:
        tracker.finish(parent)


def _stage_named(run_config, stage: str, init_from: str | None):
    found = [item for item in run_config.stages if item.name == stage]
    if not found:
        raise ValueError(f"{run_config.name}: no stage {stage!r} (stages: {[s.name for s in run_config.stages]})")
    return replace(found[0], init_from=init_from) if init_from else found[0]


def starting_point(run_config, stage: str, out_dir: Path, init_from: str | None = None,
                   previous: str | None = None) -> str | None:
    """The module checkpoint a stage starts from (None: fresh modules). One rule for the command
    line and the flows: what the caller names, else the config's, else the stage before it."""
    stage_config = _stage_named(run_config, stage, None)
    chosen = init_from or stage_config.init_from or previous
    if chosen:
        return str(chosen)
    names = [item.name for item in run_config.stages]
    index = names.index(stage)
    return None if index == 0 else str(stage_checkpoint(Path(out_dir), run_config.name, names[index - 1]))


def stage_checkpoint(out_dir: Path, config_name: str, stage: str) -> Path:
    """The checkpoint a finished stage hands on: its best by validation CIDEr, else its final one."""
    from ituning.checkpoint import WEIGHTS_FILE
    from ituning.training_state import StageFolder

    folder = StageFolder(Path(out_dir) / stage)
    chosen = folder.kept_best() or folder.final
    if not (chosen / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{config_name}: stage {stage!r} has not been trained in {out_dir} (no {chosen}); "
                                f"train it first (the full-pipeline flow, or `ituning train`), or pass init_from")
    return chosen


def _stage_inputs(workspace: Path, run_config, stage_config, device: str = "auto"):
    from ituning.provenance import TrainingSplit
    from ituning.training import StageData

    backbones = run_config.model.backbones().to_dict()
    data = StageData(*split_data(workspace, stage_config.dataset, stage_config.train_split, backbones, device))
    data.splits = tuple(TrainingSplit(dataset, split, is_synthetic(workspace, dataset))
                        for dataset, split in splits_of(stage_config))
    if stage_config.val_split:
        data.val_features, data.val_captions = split_data(workspace, stage_config.dataset, stage_config.val_split,
                                                          backbones, device)
    return data


def _log_stage_inputs(tracker: ExperimentTracker, run_id: str, workspace: Path, stage_config, data) -> None:
    log_split_inputs(tracker, run_id, workspace, stage_config.dataset, stage_config.train_split, data.features,
                     "training")
    if stage_config.val_split:
        log_split_inputs(tracker, run_id, workspace, stage_config.dataset, stage_config.val_split,
                         data.val_features, "validation")


def _train(workspace: Path, run_config, data, out_dir: Path, device: str, resume: bool, progress: bool,
           callbacks=(), whole=None) -> dict:
    from ituning.distributed import is_main_process
    from ituning.training import train_run
    from ituning.training_state import StageFolder

    [stage_config] = run_config.stages
    if is_main_process():  # the other processes of a torchrun launch wait for it when they join
        _empty_unless_trained_from(out_dir / stage_config.name,
                                  _trained_from(workspace, run_config, stage_config, data), resume)
    [result] = train_run(run_config, {stage_config.name: data}, out_dir, callbacks=callbacks, device=device,
                         resume=resume, progress=progress, whole_config=recorded_config(whole or run_config, workspace),
                         workspace=workspace)
    best = result.best_dir or StageFolder(out_dir / stage_config.name).kept_best()
    best_cider = result.best_cider if result.best_cider is not None else _recorded_cider(best)
    return {"checkpoint": str(best or result.final_dir), "best_cider": best_cider, "steps": _steps(result),
            "trained_now": result.steps >= 0}  # False: an earlier run had finished the stage with these inputs


def stage_splits(workspace: Path, config: str, stage: str) -> list[tuple[str, str]]:
    """The catalog splits a training stage reads: its training split and its validation split."""
    return splits_of(_stage_named(resolve_config(config, workspace), stage, None))


def splits_of(stage_config) -> list[tuple[str, str]]:
    """(dataset, split) of a stage's training split and, when it has one, its validation split."""
    return [(stage_config.dataset, split) for split in (stage_config.train_split, stage_config.val_split) if split]


def _trained_from(workspace: Path, run_config, stage_config, data) -> dict:
    """What a stage's checkpoints come from besides the code: its settings, the catalog's contents of
    its splits, the feature caches it reads and the checkpoint it starts from."""
    from ituning.config import config_to_dict

    readers = [data.features] + ([data.val_features] if stage_config.val_split else [])
    # How test splits are scored, and the licence the modules are shared under, change no weights:
    # another CLIPScore model or licence keeps a finished stage (a new training records the new licence).
    settings = {key: value for key, value in config_to_dict(run_config).items()
                if key not in ("evaluation", "license")}
    return {"settings": in_workspace_terms(settings, workspace),
            "data": catalog_fingerprint(workspace, splits_of(stage_config)),
            "features": [dict(reader.attrs) for reader in readers],
            "init_from": content_digest(stage_config.init_from) if stage_config.init_from else None}


def recorded_config(run_config, workspace: Path):
    """The run config as its run folder records it: the paths inside the workspace relative to it."""
    from ituning.config import config_from_dict, config_to_dict

    return config_from_dict(in_workspace_terms(config_to_dict(run_config), workspace))


def _empty_unless_trained_from(stage_dir: Path, trained_from: dict, resume: bool = True) -> None:
    """Keep a stage folder's checkpoints (to resume, or to reuse a finished stage) only when they
    were trained from the same settings and data; otherwise remove them, so the stage trains afresh.
    Under torchrun rank 0 alone does this, before the process group forms. Only a folder that is
    itself one folder of the run folder is touched: never one a link or a ".." leads out to."""
    resolved = stage_dir.resolve()
    if Path(os.path.normpath(stage_dir)) != stage_dir or resolved != stage_dir.parent.resolve() / stage_dir.name:
        raise ValueError(f"{stage_dir}: not a folder of its run folder {stage_dir.parent} (it resolves to "
                         f"{resolved}); refusing to empty it")
    expected = json.loads(json.dumps(trained_from, sort_keys=True))
    record = stage_dir / TRAINED_FROM
    if resume and record.is_file() and json.loads(record.read_text()) == expected:
        return
    if stage_dir.is_dir():
        for child in stage_dir.iterdir():
            if not child.name.startswith(TRAINED_FROM):
                shutil.rmtree(child, ignore_errors=True) if child.is_dir() else child.unlink(missing_ok=True)
    stage_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(record, json.dumps(expected, indent=1, sort_keys=True))


def _recorded_cider(best: Path | None) -> float | None:
    from ituning.training_state import read_metrics

    return read_metrics(best).get("val_CIDEr") if best else None


def _steps(result) -> int:
    """Steps of the stage; for a stage finished by an earlier run, from its trainer state."""
    return result.steps if result.steps >= 0 else checkpoint_step(result.final_dir.parent)


def checkpoint_step(stage_dir: Path) -> int:
    """The step of a stage folder's last training checkpoint (0 when it has none yet)."""
    from ituning.training_state import StageFolder

    return StageFolder(Path(stage_dir)).resumable_step()


def interrupted_line(run_folder: Path, stages: list[str]) -> str:
    """What Ctrl-C during training says: the step a rerun resumes from, in the first stage of the
    run folder that has not finished."""
    from ituning.training_state import StageFolder

    unfinished = [stage for stage in stages if not StageFolder(Path(run_folder) / stage).final_weights_written()]
    if not unfinished:
        return "interrupted; every stage had finished: a rerun reuses them"
    where = f" of {unfinished[0]}" if len(stages) > 1 else ""
    return f"interrupted; rerun to resume from step {checkpoint_step(Path(run_folder) / unfinished[0])}{where}"
