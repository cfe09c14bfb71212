"""`ituning train`, `ituning evaluate` and `ituning standins`."""

import json
from pathlib import Path
from typing import Annotated, Literal, NoReturn

import typer

from cli.errors import INTERRUPTED, fail, interrupted_in, refused_writes_told, training_stopped
from pipeline.step_locks import DEFAULT_WAIT_S, set_step_wait
from storage.datasets import evaluated

WAIT_HELP = (f"seconds to wait for another process training the same stage (or building the stand-ins, or "
             f"registering) before stopping; default ITUNING_WAIT, else {DEFAULT_WAIT_S:g}")

KARPATHY_HELP = "a corpus in the Karpathy format (dataset_coco.json style) instead of the catalog and feature cache"


def train(
    config: Annotated[Path, typer.Option(help="a YAML file from configs/")],
    karpathy_json: Annotated[Path | None, typer.Option(help=KARPATHY_HELP)] = None,
    images: Annotated[Path | None, typer.Option(help="image root of --karpathy-json")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder; default WORKSPACE/runs/<config name>")] = None,
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    device: Annotated[str, typer.Option(help="auto (the config's), cpu, cuda, cuda:1 ...")] = "auto",
    fresh: Annotated[bool, typer.Option(help="ignore checkpoints of an earlier run in the same folder")] = False,
    set_: Annotated[list[str] | None, typer.Option("--set", help="KEY=VALUE: change one setting of the config, "
                                                   "read as YAML (repeatable), e.g. stages[0].epochs=3")] = None,
    wait: Annotated[float | None, typer.Option(min=0, help=WAIT_HELP)] = None,
):
    """Train the I-Tuning modules stage by stage; a rerun continues from the last checkpoint.

    Without --karpathy-json, captions come from the catalog and visual tokens from the feature
    cache (encoded first where missing), and the run is tracked in MLflow."""
    from ituning.config import ConfigError
    from ituning.distributed import is_main_process
    from ituning.training import NonFiniteLoss

    from pipeline.presets import with_overrides
    from storage.locks import StepBusy

    set_step_wait(wait)
    try:
        config = Path(with_overrides(str(config), set_ or [], workspace))
        with refused_writes_told(lambda: tracking_database(workspace) if karpathy_json is None else None):
            if karpathy_json is None:
                lines = train_from_catalog(config, workspace, out, device, fresh)
            else:
                lines = train_from_corpus(config, karpathy_json, images, workspace, out, device, fresh)
    except typer.Exit:  # a refused write, already told
        raise
    except KeyboardInterrupt:
        stop_interrupted(str(config), workspace, out)
    except Exception as error:
        if interrupted_in(error):  # a tracking call cut short by Ctrl-C can fail the cleanup after it
            stop_interrupted(str(config), workspace, out)
        if isinstance(error, StepBusy):
            fail(error, 1)
        if isinstance(error, (ConfigError, NonFiniteLoss, OSError, ValueError, ImportError, RuntimeError)):
            fail(error)
        raise
    if not is_main_process():  # under torchrun the lines come once, from rank 0
        return
    for line in lines:
        typer.echo(line)


def stop_interrupted(config: str, workspace: Path, out: Path | None) -> NoReturn:
    """Ctrl-C: one line saying where a rerun resumes, exit 130 (no traceback)."""
    from pipeline import presets, training

    training_stopped()
    run_config = presets.resolve_config(config, workspace)
    folder = out or workspace / "runs" / run_config.name
    typer.echo(training.interrupted_line(folder, [stage.name for stage in run_config.stages]), err=True)
    raise typer.Exit(INTERRUPTED)


def tracking_database(workspace: Path) -> str | None:
    """The SQLite file MLflow tracks in (named when SQLite refuses a write); None for a server."""
    from pipeline.tracking import tracking_uri

    try:
        uri = tracking_uri(workspace)
    except OSError:  # the workspace cannot be created: the run itself will say why
        return None
    return uri.removeprefix("sqlite:///") if uri.startswith("sqlite:///") else None


def train_from_catalog(config: Path, workspace: Path, out: Path | None, device: str, fresh: bool) -> list[str]:
    """Every stage through pipeline.training.train_stage, as child runs of one pipeline run (under
    torchrun every process trains, rank 0 tracks)."""
    from ituning.config import config_to_dict
    from ituning.distributed import is_main_process, launched_processes
    from pipeline import presets, tracking, training

    run_config = presets.resolve_config(str(config), workspace)
    backbones = run_config.model.backbones().to_dict()
    if launched_processes() > 1:
        require_features(workspace, run_config.stages, backbones)
    main = is_main_process()
    parent = tracking.start_pipeline_run(workspace, run_config.name, config_to_dict(run_config)) if main else None
    lines, previous, failed = [], None, True
    try:
        for stage in run_config.stages:
            encode_missing_features(workspace, stage, backbones, device)
            result = training.train_stage(workspace, str(config), stage.name, parent, None, device, resume=not fresh,
                                        out_dir=out and str(out), progress=True, previous=previous)
            previous = result["checkpoint"]
            cider = "" if result["best_cider"] is None else f", best val CIDEr {result['best_cider']:.3f}"
            lines.append(f"{stage.name}: modules at {result['checkpoint']}{cider} (MLflow run {result['run_id']})")
        failed = False
    finally:
        if main:
            tracking.finish_pipeline_run(workspace, parent, failed)
    return lines


def missing_features(workspace: Path, stage, backbones: dict) -> list[str]:
    from pipeline import features, training

    return [split for dataset, split in training.splits_of(stage)
            if not features.feature_entry(workspace, dataset, split, backbones).is_file()]


def encode_missing_features(workspace: Path, stage, backbones: dict, device: str) -> None:
    from pipeline import features

    for split in missing_features(workspace, stage, backbones):
        typer.echo(f"encoding {stage.dataset}/{split} into the feature cache ...", err=True)
        features.finish_feature_cache(workspace, stage.dataset, split, backbones, device=device)


def require_features(workspace: Path, run_stages, backbones: dict) -> None:
    """Under torchrun the feature cache must exist beforehand: one process encoding a split while the
    others wait for it could outlast the process group's timeout."""
    missing = [f"{stage.dataset}/{split}" for stage in run_stages
               for split in missing_features(workspace, stage, backbones)]
    if missing:
        vision = f"--vision {backbones['vision_model']} --vision-pretrained {backbones['vision_pretrained'] or 'none'}"
        raise ValueError(f"no feature cache for {', '.join(missing)}: under torchrun build it first "
                         f"(`ituning features --dataset DATASET --split SPLIT {vision}`)")


def train_from_corpus(config: Path, karpathy_json: Path, images: Path | None, workspace: Path, out: Path | None,
                      device: str, fresh: bool) -> list[str]:
    """Untracked training on a Karpathy-format corpus, its visual tokens computed in memory."""
    from ituning.training import train_run
    from pipeline.presets import load_run_config

    run_config = load_run_config(config)
    data = stage_inputs(run_config, karpathy_json, images, device)
    results = train_run(run_config, data, out or workspace / "runs" / run_config.name, device=device,
                        resume=not fresh)
    lines = []
    for result in results:
        best = f", best val CIDEr {result.best_cider:.3f} at {result.best_dir}" if result.best_dir else ""
        lines.append(f"{result.name}: modules at {result.final_dir}{best}")
    return lines


def stage_inputs(run_config, karpathy_json: Path, images: Path | None, device: str):
    """StageData per stage from a Karpathy corpus (features computed in memory)."""
    from ituning.captioner import resolve_device
    from ituning.karpathy import captions_by_id, encode_images
    from pipeline.small_corpus import read_karpathy_split
    from ituning.provenance import TrainingSplit
    from ituning.training import StageData
    from storage.jsonfields import load_json
    from storage.sources import marked_synthetic

    spec = run_config.model.backbones()
    encode_on = resolve_device(run_config.device if device == "auto" else device)
    root = images or karpathy_json.parent
    synthetic = marked_synthetic(load_json(karpathy_json))  # the synthetic corpus's file says so
    data = {}
    for stage in run_config.stages:
        train_images = read_karpathy_split(karpathy_json, root, stage.train_split)
        val_images = read_karpathy_split(karpathy_json, root, stage.val_split) if stage.val_split else []
        data[stage.name] = StageData(
            encode_images(train_images, spec, device=encode_on), captions_by_id(train_images),
            encode_images(val_images, spec, device=encode_on) if val_images else None,
            captions_by_id(val_images) if val_images else None,
            tuple(TrainingSplit(stage.dataset, split, synthetic) for split in (stage.train_split, stage.val_split)
                  if split),
        )
    return data


def evaluate(
    checkpoint: Annotated[Path, typer.Option(help="a module checkpoint folder (e.g. RUN/finetune/best)")],
    dataset: Annotated[Literal[tuple(dataset.name for dataset in evaluated())], typer.Option(
        help="the dataset the split is of")] = "coco",
    split: Annotated[str, typer.Option(help="test, val ...")] = "test",
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    beams: Annotated[int, typer.Option(min=1)] = 5,
    blind_baseline: Annotated[bool, typer.Option(help="also score the language model with the modules off")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:1 ...")] = "auto",
    clip_model: Annotated[str | None, typer.Option(
        help="CLIP for CLIP-S and RefCLIP-S: an open_clip name, hf-hub:org/name, local-dir:PATH, or none; "
             "default the one the checkpoint's run config names, else ViT-B-32")] = None,
    clip_pretrained: Annotated[str | None, typer.Option(help="its open_clip tag or weights file")] = "openai",
):
    """Caption a split from the feature cache, score it (COCO metrics, CLIP-S, RefCLIP-S) and track
    captions, scores, gallery and heatmaps."""
    from ituning.checkpoint import read_config
    from pipeline import evaluation, features

    try:
        spec = read_config(checkpoint)["backbones"]
        if not features.feature_entry(workspace, dataset, split, spec).is_file():
            features.finish_feature_cache(workspace, dataset, split, spec, device=device)
        result = evaluation.evaluate(workspace, str(checkpoint), dataset, split, device=device, num_beams=beams,
                                     blind_baseline=blind_baseline,
                                     scoring=evaluation.scoring_from_options(clip_model, clip_pretrained))
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        fail(error)
    for note in result["notes"]:
        typer.echo(f"note: {note}", err=True)
    typer.echo(json.dumps(result["metrics"], indent=1))
    typer.echo(f"captions: {result['captions_path']} (MLflow run {result['run_id']})")


def standins(
    karpathy_json: Annotated[Path | None, typer.Option(help="a corpus to learn from (its train split); "
                                                           "default the catalog's COCO train split")] = None,
    images: Annotated[Path | None, typer.Option(help="image root; default the JSON's folder")] = None,
    out: Annotated[Path | None, typer.Option(help="writes OUT/vision and OUT/language; default WORKSPACE/backbones")] = None,
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    vision_steps: Annotated[int, typer.Option(min=1)] = 300,
    language_steps: Annotated[int, typer.Option(min=1)] = 300,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Build small trained stand-in backbones (CLIP-style ViT, GPT-2, BPE tokenizer) from a corpus."""
    from ituning.backbones import BackboneSpec
    from ituning.standins import StandinTraining
    from pipeline.small_corpus import build_trained_standins
    from pipeline.data import build_demo_backbones

    settings = StandinTraining(vision_steps=vision_steps, language_steps=language_steps, seed=seed)
    try:
        if karpathy_json is None:
            spec = BackboneSpec(**build_demo_backbones(workspace, seed, vision_steps, language_steps, out_dir=out))
        else:
            spec = build_trained_standins(karpathy_json, images or karpathy_json.parent,
                                          out or workspace / "backbones", settings)
    except (OSError, ValueError, KeyError) as error:
        fail(error)
    typer.echo(f"vision_model: {spec.vision_model}\nlanguage_model: {spec.language_model}")
