"""`ituning train` and `ituning standins`."""

from pathlib import Path
from typing import Annotated

import typer

KARPATHY_HELP = "a corpus in the Karpathy format (dataset_coco.json style) instead of the catalog and feature cache"


def train(
    config: Annotated[Path, typer.Option(help="a YAML file from configs/")],
    karpathy_json: Annotated[Path | None, typer.Option(help=KARPATHY_HELP)] = None,
    images: Annotated[Path | None, typer.Option(help="image root of --karpathy-json")] = None,
    out: Annotated[Path | None, typer.Option(help="run folder; default WORKSPACE/runs/<config name>")] = None,
    workspace: Annotated[Path, typer.Option(envvar="ITUNING_WORKSPACE")] = Path("workspace"),
    device: Annotated[str, typer.Option(help="auto (the config's), cpu, cuda, cuda:1 ...")] = "auto",
    fresh: Annotated[bool, typer.Option(help="ignore checkpoints of an earlier run in the same folder")] = False,
):
    """Train the I-Tuning modules stage by stage; a rerun continues from the last checkpoint."""
    from ituning.config import ConfigError, load_config
    from ituning.training import NonFiniteLoss, train_run

    try:
        run_config = load_config(config)
        data = stage_inputs(run_config, karpathy_json, images, workspace, device)
        results = train_run(run_config, data, out or workspace / "runs" / run_config.name, device=device,
                            resume=not fresh)
    except (ConfigError, NonFiniteLoss, OSError, ValueError, ImportError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    for result in results:
        best = f", best val CIDEr {result.best_cider:.3f} at {result.best_dir}" if result.best_dir else ""
        typer.echo(f"{result.name}: modules at {result.final_dir}{best}")


def stage_inputs(run_config, karpathy_json: Path | None, images: Path | None, workspace: Path, device: str):
    """StageData per stage: from a Karpathy corpus (features computed in memory) when given."""
    if karpathy_json is None:
        raise ImportError(
            "reading the catalog and the feature cache is not available in this build; "
            "pass --karpathy-json and --images to train on a corpus directly"
        )
    from ituning.captioner import resolve_device
    from ituning.karpathy import captions_by_id, encode_images, read_karpathy_split
    from ituning.training import StageData

    spec = run_config.model.backbones()
    encode_on = resolve_device(run_config.device if device == "auto" else device)
    root = images or karpathy_json.parent
    data = {}
    for stage in run_config.stages:
        train_images = read_karpathy_split(karpathy_json, root, stage.train_split)
        val_images = read_karpathy_split(karpathy_json, root, stage.val_split) if stage.val_split else []
        data[stage.name] = StageData(
            encode_images(train_images, spec, device=encode_on), captions_by_id(train_images),
            encode_images(val_images, spec, device=encode_on) if val_images else None,
            captions_by_id(val_images) if val_images else None,
        )
    return data


def standins(
    karpathy_json: Annotated[Path, typer.Option(help="the corpus to learn from (its train split)")],
    images: Annotated[Path | None, typer.Option(help="image root; default the JSON's folder")] = None,
    out: Annotated[Path, typer.Option(help="writes OUT/vision and OUT/language")] = Path("workspace/backbones"),
    vision_steps: Annotated[int, typer.Option(min=1)] = 300,
    language_steps: Annotated[int, typer.Option(min=1)] = 300,
    seed: Annotated[int, typer.Option()] = 0,
):
    """Build small trained stand-in backbones (CLIP-style ViT, GPT-2, BPE tokenizer) from a corpus."""
    from ituning.standins import StandinTraining, build_trained_standins

    settings = StandinTraining(vision_steps=vision_steps, language_steps=language_steps, seed=seed)
    try:
        spec = build_trained_standins(karpathy_json, images or karpathy_json.parent, out, settings)
    except (OSError, ValueError, KeyError) as error:
        typer.echo(f"error: {error}", err=True)
        raise typer.Exit(2)
    typer.echo(f"vision_model: {spec.vision_model}\nlanguage_model: {spec.language_model}")
