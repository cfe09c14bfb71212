"""The pipeline's stages as plain functions: corpus, download, catalog, backbones, feature cache,
training, evaluation, model registry.

Each stage takes the workspace folder and small values (names, paths, ids) and returns a small
JSON-serialisable result, so an orchestrator can run them as separate tasks, retry or cache them,
and pass their results along. Tracking goes to MLflow (storage/tracking.py): a pipeline run is a
parent run and each training or evaluation stage a child run of it.
"""

import hashlib
import json
import os
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from storage.catalog import Catalog
from storage.tracking import ExperimentTracker
from storage.workspace import catalog_path

CONFIG_DIR = Path(__file__).parents[1] / "configs"
CHAMPION = "champion"
SAMPLE_SIZE = 5
STANDIN_SPLIT = ("coco", "train")  # what the demo's stand-in backbones learn from
TRAINED_FROM = "trained_from.json"


# ---- data -----------------------------------------------------------------------------------


def write_demo_corpus(workspace: Path, images: int = 600, seed: int = 0) -> dict[str, str]:
    """The synthetic corpus under workspace/synthetic; returns {dataset: manifest path}."""
    from storage.synthetic import write_corpus

    corpus = write_corpus(Path(workspace) / "synthetic", images, seed=seed)
    return {dataset: str(path) for dataset, path in corpus.manifests.items()}


def download(workspace: Path, dataset: str, manifest: str | None = None, images: str | None = None) -> dict:
    """Fetch, verify and unpack a dataset (its built-in manifest unless one is given)."""
    from storage.acquire import choose_manifest, download_dataset

    chosen = choose_manifest(Path(workspace), dataset, manifest and Path(manifest), images)
    report = download_dataset(chosen, Path(workspace))
    return asdict(report)


def use_local_corpus(workspace: Path, dataset: str, folder: str) -> dict:
    """A dataset already on disk in its published layout (e.g. a Karpathy-format dataset_coco.json
    with its images at <filepath>/<filename> beside it), used in place: data/<dataset> in the
    workspace becomes a link to it. Returns a download-style report with the corpus's digest (its
    top-level files), so that the catalog is rebuilt when the corpus changes."""
    from storage.workspace import data_dir

    source, link = Path(folder).expanduser().resolve(), data_dir(Path(workspace), dataset)
    if not source.is_dir():
        raise FileNotFoundError(f"{dataset}: corpus folder {folder} does not exist")
    if link.is_symlink() and link.resolve() != source:
        link.unlink()
    if link.exists() and not link.is_symlink():
        raise FileExistsError(f"{dataset}: {link} already holds downloaded files; use another workspace for the "
                              f"corpus at {source}, or remove {link}")
    if not link.exists():
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source, target_is_directory=True)
    return {"dataset": dataset, "fetched": [], "unpacked": [], "images": 0, "failures": [], "corpus": str(source),
            "digest": content_digest(source)}


def build_catalog(workspace: Path, datasets: list[str]) -> dict[str, dict]:
    """Catalog rows for each dataset, in the order the builds depend on; per-dataset summaries."""
    from storage.catalog_build import BUILD_ORDER, build_dataset, open_for_build

    unknown = sorted(set(datasets) - set(BUILD_ORDER))
    if unknown:
        raise ValueError(f"unknown datasets {unknown}; expected some of {list(BUILD_ORDER)}")
    with open_for_build(Path(workspace)) as catalog:
        return {dataset: asdict(build_dataset(Path(workspace), dataset, catalog))
                for dataset in BUILD_ORDER if dataset in datasets}


def open_catalog(workspace: Path) -> Catalog:
    """The workspace's catalog, read-only (several stages may read it at once)."""
    path = catalog_path(Path(workspace))
    if not path.is_file():
        raise FileNotFoundError(f"no catalog at {path}: download the datasets and build it first "
                                f"(`ituning download coco`, `ituning catalog build`)")
    return Catalog(path, read_only=True)


def catalog_fingerprint(workspace: Path, splits: list, captions: bool = True) -> str:
    """One digest of what the catalog holds now for these (dataset, split) pairs: the usable images
    (ids and paths) and, unless captions is False, their captions. "no catalog" before there is one."""
    if not catalog_path(Path(workspace)).is_file():
        return "no catalog"
    with open_catalog(workspace) as catalog:
        read = catalog.split_fingerprint if captions else catalog.image_list_fingerprint
        parts = [f"{dataset}/{split}:{read(dataset, split)}" for dataset, split in splits]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def content_digest(path: str | Path) -> str:
    """sha256 over a file, or over the files of a folder (names and contents): what a path holds now."""
    from storage.downloads import file_checksum

    path = Path(path)
    files = sorted(item for item in path.iterdir() if item.is_file()) if path.is_dir() else [path]
    parts = [f"{item.name}:{file_checksum(item)}" for item in files if item.is_file()]
    return hashlib.sha256("|".join(parts).encode()).hexdigest() if parts else "missing"


def split_images(workspace: Path, dataset: str, split: str) -> list[tuple[str, Path]]:
    """The split's usable images as (image_id, absolute path), sorted by image id."""
    with open_catalog(workspace) as catalog:
        usable = catalog.usable_images(dataset, split)
    if not usable:
        raise ValueError(f"{dataset}/{split}: no usable images in the catalog; download and build it first")
    return [(image.image_id, image.path if image.path.is_absolute() else Path(workspace) / image.path)
            for image in usable]


def build_demo_backbones(workspace: Path, seed: int = 0, vision_steps: int = 300, language_steps: int = 300,
                         batch_size: int = 128, out_dir: Path | None = None) -> dict:
    """Stand-in backbones trained on the catalog's COCO train split (the synthetic corpus in a demo
    workspace), saved under out_dir (default workspace/backbones); returns their BackboneSpec as a dict."""
    from ituning.standins import StandinTraining, build_standins_from_images

    with open_catalog(workspace) as catalog:
        captions = catalog.captions(*STANDIN_SPLIT)
    images = [(path, captions[image_id]) for image_id, path in split_images(workspace, *STANDIN_SPLIT)
              if captions.get(image_id)]
    settings = StandinTraining(vision_steps=vision_steps, language_steps=language_steps, batch_size=batch_size,
                               seed=seed)
    spec = build_standins_from_images(images, Path(out_dir or Path(workspace) / "backbones"), settings, progress=False)
    return spec.to_dict()


# ---- feature cache --------------------------------------------------------------------------


def _spec(backbones: dict):
    from ituning.backbones import BackboneSpec

    return BackboneSpec(**backbones)


def _feature_settings(shard_size: int, device: str):
    from ituning.captioner import resolve_device
    from storage.feature_shards import EncodeSettings
    from storage.features import FeatureSettings

    return FeatureSettings(shard_size, EncodeSettings(device=resolve_device(device)))


def feature_entry(workspace: Path, dataset: str, split: str, backbones: dict, device: str = "auto") -> Path:
    """The entry point of the split's feature cache for these backbones: the one of `device`'s
    precision, else a finished one of another precision (storage.features.find_feature_entry)."""
    from storage.features import find_feature_entry

    encode = _feature_settings(1024, device).encode  # the shard size plays no part in where a cache lives
    return find_feature_entry(Path(workspace), dataset, split, _spec(backbones), encode)


def feature_dir(workspace: Path, dataset: str, split: str, backbones: dict, settings) -> Path:
    """Where the split's feature cache is built at the precision of `settings`."""
    from storage.features import split_cache_dir

    return split_cache_dir(Path(workspace), dataset, split, _spec(backbones), settings.encode)


def feature_shards(workspace: Path, dataset: str, split: str, backbones: dict, shard_size: int = 1024) -> list[int]:
    """The shard indices of the split's cache."""
    from storage.feature_shards import ShardPlan

    return list(range(ShardPlan(tuple(split_images(workspace, dataset, split)), shard_size).count))


def cache_feature_shard(workspace: Path, dataset: str, split: str, backbones: dict, shard: int,
                        shard_size: int = 1024, device: str = "auto") -> str:
    """Encode one shard of the split's cache (reused when already finished); returns its file."""
    from storage.features import build_shard

    settings = _feature_settings(shard_size, device)
    out_dir = feature_dir(workspace, dataset, split, backbones, settings)
    return str(build_shard(shard, split_images(workspace, dataset, split), _spec(backbones), out_dir, settings))


def finish_feature_cache(workspace: Path, dataset: str, split: str, backbones: dict, shard_size: int = 1024,
                         device: str = "auto") -> str:
    """Write the entry point once every shard exists (encoding any still missing) and verify the
    cache against the catalog; returns the features.json path. `device` must be the one the
    shards were encoded on: it decides the compute precision, which is part of the cache identity."""
    from storage.features import build_feature_cache, verify_feature_cache

    images = split_images(workspace, dataset, split)
    settings = _feature_settings(shard_size, device)
    out_dir = feature_dir(workspace, dataset, split, backbones, settings)
    entry = build_feature_cache(images, _spec(backbones), out_dir, settings)
    report = verify_feature_cache(entry, [image_id for image_id, _ in images])
    if not report.ok:
        raise RuntimeError(f"{entry}: " + "; ".join(report.problems))
    return str(entry)


# ---- training -------------------------------------------------------------------------------


def resolve_config(config: str, workspace: Path):
    """configs/<config>.yaml (or a YAML path) with local backbone paths made absolute: a relative
    one is taken from the workspace when it exists there (e.g. backbones/vision)."""
    from ituning.config import load_config

    run_config = load_config(config_file(config))
    return replace(run_config, model=replace(run_config.model, **_workspace_backbones(run_config.model, workspace)))


def config_file(config: str) -> Path:
    """A preset's YAML file (configs/<config>.yaml), or the YAML file `config` names."""
    path = Path(config)
    return path if path.suffix else CONFIG_DIR / f"{config}.yaml"


def workspace_backbones(workspace: Path, config: str) -> dict:
    """The config's backbones as training and evaluation load them: local paths taken from the workspace."""
    return resolve_config(config, workspace).model.backbones().to_dict()


def _workspace_backbones(model, workspace: Path) -> dict:
    from ituning.backbones import LOCAL_DIR

    def located(path: str) -> str | None:
        candidate = Path(workspace) / path
        return str(candidate.resolve()) if not Path(path).is_absolute() and candidate.exists() else None

    changed = {}
    if model.vision_model.startswith(LOCAL_DIR) and located(model.vision_model[len(LOCAL_DIR):]):
        changed["vision_model"] = LOCAL_DIR + located(model.vision_model[len(LOCAL_DIR):])
    if model.vision_pretrained and located(model.vision_pretrained):
        changed["vision_pretrained"] = located(model.vision_pretrained)
    if located(model.language_model):
        changed["language_model"] = located(model.language_model)
    return changed


def split_data(workspace: Path, dataset: str, split: str, backbones: dict, device: str = "auto"):
    """(FeatureReader, captions of the images it holds) for a split, checked against the catalog;
    the feature cache is the one of `device`'s precision when there is one."""
    from storage.features import FeatureReader

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
    """The split as a dataset input of the run, with the feature cache's identity as params."""
    tracker.log_dataset(run_id, f"{dataset}/{split}", reader.attrs["image_list_fingerprint"],
                        catalog_path(Path(workspace)).resolve(), context, images=len(reader))
    tracker.log_params(run_id, {f"features.{context}.{key}": value for key, value in reader.attrs.items()})


def train_stage(workspace: Path, config: str, stage: str, parent_run_id: str | None = None,
                init_from: str | None = None, device: str = "auto", resume: bool = True,
                out_dir: str | None = None, progress: bool = False, previous: str | None = None) -> dict:
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
    with child_run(tracker, parent_run_id, run_config.name, stage, settings, stage_config.seed) as run_id:
        data = _stage_inputs(workspace, run_config, stage_config, device)
        _log_stage_inputs(tracker, run_id, workspace, stage_config, data)
        result = _train(workspace, run_config, data, out, device, resume, progress, [tracker.callbacks(run_id)], whole)
        tracker.log_checkpoint(run_id, result["checkpoint"], "checkpoint")
    return {**result, "run_id": run_id}


@contextmanager
def child_run(tracker: ExperimentTracker, parent_run_id: str | None, pipeline: str, stage: str, settings: dict,
              seed: int | None = None):
    """A stage's child run (params: settings, code version, seed), under `parent_run_id` or, when
    None, under a pipeline run of its own; both end FAILED if the block raises."""
    parent = parent_run_id or tracker.start_pipeline(pipeline, settings, seed)
    try:
        with tracker.stage_run(parent, stage, settings) as run_id:
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
    stage_dir = Path(out_dir) / stage
    from ituning.checkpoint import WEIGHTS_FILE

    chosen = _existing_best(stage_dir) or stage_dir / "final"
    if not (chosen / WEIGHTS_FILE).is_file():
        raise FileNotFoundError(f"{config_name}: stage {stage!r} has not been trained in {out_dir} (no {chosen}); "
                                f"train it first (the full-pipeline flow, or `ituning train`), or pass init_from")
    return chosen


def _stage_inputs(workspace: Path, run_config, stage_config, device: str = "auto"):
    from ituning.training import StageData

    backbones = run_config.model.backbones().to_dict()
    data = StageData(*split_data(workspace, stage_config.dataset, stage_config.train_split, backbones, device))
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

    [stage_config] = run_config.stages
    if is_main_process():  # the other processes of a torchrun launch wait for it when they join
        _empty_unless_trained_from(out_dir / stage_config.name,
                                  _trained_from(workspace, run_config, stage_config, data), resume)
    [result] = train_run(run_config, {stage_config.name: data}, out_dir, callbacks=callbacks, device=device,
                         resume=resume, progress=progress, whole_config=whole)
    best = result.best_dir or _existing_best(out_dir / stage_config.name)
    best_cider = result.best_cider if result.best_cider is not None else _recorded_cider(best)
    return {"checkpoint": str(best or result.final_dir), "best_cider": best_cider, "steps": _steps(result)}


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
    return {"settings": config_to_dict(run_config),
            "data": catalog_fingerprint(workspace, splits_of(stage_config)),
            "features": [dict(reader.attrs) for reader in readers],
            "init_from": content_digest(stage_config.init_from) if stage_config.init_from else None}


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
    temporary = stage_dir / f"{TRAINED_FROM}.tmp-{os.getpid()}"
    temporary.write_text(json.dumps(expected, indent=1, sort_keys=True))
    temporary.replace(record)


def _existing_best(stage_dir: Path) -> Path | None:
    return stage_dir / "best" if (stage_dir / "best" / "metrics.json").is_file() else None


def _recorded_cider(best: Path | None) -> float | None:
    return json.loads((best / "metrics.json").read_text()).get("val_CIDEr") if best else None


def _steps(result) -> int:
    """Steps of the stage; for a stage finished by an earlier run, from its trainer state."""
    from ituning.training_state import STATE_FILE, last_checkpoint

    if result.steps >= 0:
        return result.steps
    last = last_checkpoint(result.final_dir.parent)
    return json.loads((last / STATE_FILE).read_text())["trainer"]["step"] if last else 0


# ---- evaluation -----------------------------------------------------------------------------


def evaluate(workspace: Path, checkpoint: str, dataset: str, split: str, parent_run_id: str | None = None,
             gallery_size: int = 50, device: str = "auto", num_beams: int = 5, blind_baseline: bool = False) -> dict:
    """Caption a split from the feature cache, score it (NoCaps by domain; a server-format file for
    NoCaps test, which has no public references) and log captions, scores, gallery and heatmaps to
    a child run. With blind_baseline, also scores the same language model with the modules off."""
    from ituning.captioner import Captioner
    from ituning.decoding import DecodingConfig

    workspace = Path(workspace)
    captioner = Captioner.from_checkpoint(checkpoint, device)
    decoding = DecodingConfig(num_beams=num_beams)
    reader, references = split_data(workspace, dataset, split, captioner.backbones.to_dict(), device)
    tracker = ExperimentTracker(workspace=workspace)
    settings = {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "decoding": asdict(decoding),
                "backbones": captioner.backbones.to_dict()}
    name = f"evaluate-{dataset}-{split}"
    with child_run(tracker, parent_run_id, name, name, settings) as run_id:
        log_split_inputs(tracker, run_id, workspace, dataset, split, reader, "evaluation")
        result = _evaluate_tracked(tracker, run_id, workspace, captioner, reader, references, dataset, split,
                                   decoding, gallery_size, blind_baseline)
    return {**result, "run_id": run_id, "task": evaluation_task(workspace, dataset, split)}


def evaluation_task(workspace: Path, dataset: str, split: str) -> str:
    """What an evaluation's scores are comparable on: the split and the catalog's images and
    references of it (CIDEr depends on the whole reference set), e.g. "coco/test@3f2a...". The
    synthetic corpus's "coco" and the real COCO are different tasks."""
    return f"{dataset}/{split}@{catalog_fingerprint(workspace, [(dataset, split)])[:16]}"


def _evaluate_tracked(tracker, run_id, workspace, captioner, reader, references, dataset, split, decoding,
                      gallery_size, blind_baseline) -> dict:
    from ituning.evaluation import evaluate_split, generate_captions, missing_domains_note, write_nocaps_submission
    from ituning.report import write_report

    images = dict(split_images(workspace, dataset, split))
    out_dir = workspace / "evaluations" / run_id / f"{dataset}-{split}"
    notes = []
    if references:
        domains = _domains(workspace, dataset, split) if dataset == "nocaps" else None
        captions, scores = evaluate_split(captioner, reader, references, domains, decoding)
        notes.append(domains is not None and missing_domains_note(sorted(reader.image_ids), domains))
    else:
        captions, scores = generate_captions(captioner, reader, sorted(reader.image_ids), decoding), {}
        notes.append(f"{dataset}/{split} has no public references: captions only, no scores")
    if dataset == "nocaps" and split == "test":
        submission = write_nocaps_submission(captions, out_dir / "nocaps_test_submission.json", reader.image_ids)
        tracker.client.log_artifact(run_id, str(submission), "submission")
        notes.append("submission/nocaps_test_submission.json is in the evaluation server's format")
    notes = [note for note in notes if note]
    if notes:
        tracker.set_tags(run_id, {"ituning.notes": "; ".join(notes)})
    if blind_baseline and references:
        scores = {**scores, "blind": _blind_scores(captioner, reader, references, decoding)}
    report = write_report(out_dir, f"{dataset} {split}", captions, scores, references, images, captioner,
                          gallery_size)
    tracker.log_evaluation(run_id, f"{dataset}_{split}", captions, scores, report.gallery, report.heatmaps)
    sample = [[image_id, captions[image_id]] for image_id in sorted(captions)[:SAMPLE_SIZE]]
    return {"metrics": scores, "captions_path": str(report.captions), "sample": sample, "notes": notes}


def _domains(workspace: Path, dataset: str, split: str) -> dict[str, str | None]:
    """NoCaps domain by image id; None where the files named none (all of test, val without them)."""
    with open_catalog(workspace) as catalog:
        return {image.image_id: image.domain for image in catalog.usable_images(dataset, split)}


def _blind_scores(captioner, reader, references, decoding) -> dict[str, float]:
    """The caption-blind baseline: the same frozen language model, modules switched off."""
    from ituning.training import default_scorer, evaluate_captions

    return evaluate_captions(captioner.model, captioner.tokenizer, reader, references, default_scorer, decoding,
                             blind=True)


# ---- model registry -------------------------------------------------------------------------


def register_captioner(workspace: Path, checkpoint: str, run_id: str, name: str = "ituning-captioner") -> dict:
    """Log the captioner as a pyfunc model under `run_id` and register it as a new version of `name`."""
    tracker = ExperimentTracker(workspace=workspace)
    model_uri = tracker.log_captioner_model(run_id, checkpoint, registered_name=name)
    versions = tracker.client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    version = max(versions, key=lambda item: int(item.version))
    return {"name": name, "version": str(version.version), "model_uri": model_uri}


def promotion_metric(scores: dict) -> tuple[str, float] | None:
    """The score a champion is chosen by: CIDEr, or the overall CIDEr of scores by NoCaps domain;
    None when there is none (NoCaps test has no public references)."""
    if isinstance(scores.get("CIDEr"), (int, float)):
        return "CIDEr", float(scores["CIDEr"])
    overall = scores.get("overall")
    if isinstance(overall, dict) and isinstance(overall.get("CIDEr"), (int, float)):
        return "overall/CIDEr", float(overall["CIDEr"])
    return None


def promote_evaluated(workspace: Path, name: str, version: str, evaluation: dict) -> dict:
    """promote_if_better with the metric and task of an evaluation's result; when it has no score
    to compare (NoCaps test), the champion stays and the result says why."""
    chosen = promotion_metric(evaluation.get("metrics") or {})
    if chosen is None:
        reason = (f"{evaluation.get('task', 'this evaluation')} has no CIDEr to compare (no public references); "
                  f"champion left as it was. Set it by hand if wanted: "
                  f"MlflowClient().set_registered_model_alias({name!r}, {CHAMPION!r}, {str(version)!r})")
        return {"promoted": False, "candidate": None, "champion": None, "champion_version": None, "reason": reason}
    metric, value = chosen
    return promote_if_better(name, version, metric, value, workspace, task=evaluation.get("task"))


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


# ---- pipeline runs --------------------------------------------------------------------------


def start_pipeline_run(workspace: Path, name: str, parameters: dict) -> str:
    """A parent run with the pipeline's parameters (and its seed, when they hold one); its id."""
    tracker = ExperimentTracker(workspace=workspace)
    return tracker.start_pipeline(name, parameters, parameters.get("seed"))


def finish_pipeline_run(workspace: Path, run_id: str, failed: bool = False) -> None:
    ExperimentTracker(workspace=workspace).finish(run_id, failed)
