"""Scoring a checkpoint on a split as a child run of the pipeline's MLflow run: captions, COCO
metrics, CLIPScore and RefCLIPScore, NoCaps domains and the evaluation report.
"""

import json
import logging
from dataclasses import asdict
from pathlib import Path

from ituning.config import EvaluationSettings, config_from_dict
from ituning.evaluation import OVERALL, score_by_domain
from pipeline.data import catalog_fingerprint, open_catalog, split_images
from pipeline.presets import workspace_clip_score_model
from pipeline.tracking import ExperimentTracker
from pipeline.training import child_run, log_split_inputs, split_data
from storage.datasets import get_dataset
from storage.sources import NOCAPS_DOMAINS, unknown_domains

SAMPLE_SIZE = 5
RUN_CONFIG = "config.json"  # what training writes into a run folder: the whole run config, resolved

log = logging.getLogger(__name__)


def evaluate(workspace: Path, checkpoint: str, dataset: str, split: str, parent_run_id: str | None = None,
             gallery_size: int = 50, device: str = "auto", num_beams: int = 5, blind_baseline: bool = False,
             scoring: EvaluationSettings | None = None) -> dict:
    """Caption a split from the feature cache, score it (NoCaps by domain; a server-format file for
    NoCaps test, which has no public references) and log captions, scores, gallery and heatmaps to
    a child run. With blind_baseline, also scores the same language model with the modules off.
    CLIP-S and RefCLIP-S use the CLIP `scoring` names; by default the checkpoint's run config's."""
    from ituning.captioner import Captioner
    from ituning.decoding import DecodingConfig
    from ituning.fast_paths import fallbacks

    workspace = Path(workspace)
    captioner = Captioner.from_checkpoint(checkpoint, device)
    decoding = DecodingConfig(num_beams=num_beams)
    reader, references = split_data(workspace, dataset, split, captioner.backbones.to_dict(), device)
    tracker = ExperimentTracker(workspace=workspace)
    scoring = scoring or workspace_clip_score_model(evaluation_settings(checkpoint), workspace)
    settings = {"checkpoint": str(checkpoint), "dataset": dataset, "split": split, "decoding": asdict(decoding),
                "backbones": captioner.backbones.to_dict(),
                "clip_score": {**asdict(scoring), "standin": clip_is_standin(scoring, captioner)}}
    name = f"evaluate-{dataset}-{split}"
    with child_run(tracker, parent_run_id, name, name, settings) as run_id:
        log_split_inputs(tracker, run_id, workspace, dataset, split, reader, "evaluation")
        result = _evaluate_tracked(tracker, run_id, workspace, captioner, reader, references, dataset, split,
                                   decoding, gallery_size, blind_baseline, scoring)
    return {**result, "run_id": run_id, "task": evaluation_task(workspace, dataset, split), "fallbacks": fallbacks()}


def score_nocaps(candidates: dict[str, str], references: dict[str, list[str]], domains: dict[str, str | None],
                 metrics=None) -> dict[str, dict[str, float]]:
    """Scores by NoCaps domain and overall; a domain NoCaps does not have is an error."""
    unknown = unknown_domains(domains)
    if unknown:
        raise ValueError(f"images with unknown domains {unknown}; expected {', '.join(NOCAPS_DOMAINS)}")
    return score_by_domain(candidates, references, domains, metrics)


def evaluation_settings(checkpoint: str | Path) -> EvaluationSettings:
    """How a checkpoint's evaluations score: the `evaluation` settings of the run config its training
    recorded (runs/<config>/config.json beside the stage folder; a CLIP in the workspace named
    relative to it, as `evaluate` finds it with presets.workspace_clip_score_model), or the defaults (the paper's
    ViT-B/32 for CLIPScore) for a checkpoint kept elsewhere."""
    stage_dir = Path(checkpoint).parent
    record = stage_dir.parent / RUN_CONFIG
    try:
        config = config_from_dict(json.loads(record.read_text()))
    except (OSError, ValueError):  # no record, not JSON, or not a run config (ConfigError)
        return EvaluationSettings()
    return config.evaluation if stage_dir.name in {stage.name for stage in config.stages} else EvaluationSettings()


def clip_is_standin(scoring: EvaluationSettings, captioner) -> bool:
    """Whether CLIPScore's CLIP is a stand-in: its folder says so, or it is the folder of the vision
    stand-in the checkpoint was trained on."""
    from ituning.provenance import is_standin_backbone

    model = scoring.clip_score_model
    trained_on_standins = captioner.provenance is not None and captioner.provenance.standin_backbones
    return bool(model) and (is_standin_backbone(model) or
                            (trained_on_standins and model == captioner.backbones.vision_model))


def scoring_from_options(clip_model: str | None, clip_pretrained: str | None) -> EvaluationSettings | None:
    """The command line's choice of CLIPScore model: None to keep the run config's, "none" for no CLIPScore."""
    if clip_model is None:
        return None
    return EvaluationSettings(None if clip_model.strip().lower() == "none" else clip_model, clip_pretrained)


def evaluation_task(workspace: Path, dataset: str, split: str) -> str:
    """What an evaluation's scores are comparable on: the split and the catalog's images and
    references of it (CIDEr depends on the whole reference set), e.g. "coco/test@3f2a...". The
    synthetic corpus's "coco" and the real COCO are different tasks."""
    return f"{dataset}/{split}@{catalog_fingerprint(workspace, [(dataset, split)])[:16]}"


def _evaluate_tracked(tracker, run_id, workspace, captioner, reader, references, dataset, split, decoding,
                      gallery_size, blind_baseline, scoring) -> dict:
    from ituning.evaluation import missing_domains_note, write_nocaps_submission
    from ituning.validation import evaluate_split, generate_captions
    from pipeline.report import write_report

    images = dict(split_images(workspace, dataset, split))
    out_dir = workspace / "evaluations" / run_id / f"{dataset}-{split}"
    notes = []
    scored_by = get_dataset(dataset)
    if references:
        domains = _domains(workspace, dataset, split) if scored_by.domains else None
        captions, scores = evaluate_split(captioner, reader, references, domains, decoding)
        notes.append(domains is not None and missing_domains_note(sorted(reader.image_ids), domains))
    else:
        captions, scores = generate_captions(captioner, reader, sorted(reader.image_ids), decoding), {}
        notes.append(f"{dataset}/{split} has no public references: captions only, no scores")
    if split == scored_by.server_only_split:
        submission = write_nocaps_submission(captions, out_dir / f"{dataset}_{split}_submission.json",
                                             reader.image_ids)
        tracker.log_artifact(run_id, submission, "submission")
        notes.append(f"submission/{submission.name} is in the evaluation server's format")
    scores, image_scores, clip_note = _with_clip_scores(scores, scoring, captions, images, references,
                                                        str(captioner.device))
    notes.append(clip_note)
    notes = [note for note in notes if note]
    if notes:
        tracker.set_tag(run_id, "ituning.notes", "; ".join(notes))
    if blind_baseline and references:
        scores = {**scores, "blind": _blind_scores(captioner, reader, references, decoding)}
    report = write_report(out_dir, f"{dataset} {split}", captions, scores, references, images, captioner,
                          gallery_size, image_scores=image_scores)
    if image_scores:
        tracker.log_json(run_id, image_scores, f"clip_scores/{dataset}_{split}.json")
    tracker.log_evaluation(run_id, f"{dataset}_{split}", captions, scores, report.gallery, report.heatmaps)
    sample = [[image_id, captions[image_id]] for image_id in sorted(captions)[:SAMPLE_SIZE]]
    return {"metrics": scores, "captions_path": str(report.captions), "sample": sample, "notes": notes}


def _with_clip_scores(scores: dict, scoring: EvaluationSettings, captions: dict[str, str], images: dict[str, Path],
                      references: dict[str, list[str]], device: str) -> tuple[dict, dict, str | None]:
    """(scores with the corpus CLIP-S and RefCLIP-S beside the COCO metrics (NoCaps: in "overall"),
    {image_id: its CLIP-S and RefCLIP-S}, a note when they are left out). Like SPICE without
    CoreNLP, a CLIP that cannot be loaded leaves the other scores standing."""
    from ituning.backbones import BackboneUnavailable
    from ituning.clip_score import load_clip_scorer

    if not references or not scoring.clip_score_model:
        return scores, {}, None
    try:
        scorer = load_clip_scorer(scoring.clip_score_model, scoring.clip_score_pretrained, device)
    except BackboneUnavailable as error:
        log.warning("CLIPScore left out: %s", error)
        return scores, {}, (f"CLIP-S and RefCLIP-S left out: {error} (name a CLIP in the config's "
                            "evaluation.clip_score_model or `ituning evaluate --clip-model`; none turns them off)")
    scored = {key: captions[key] for key in captions if key in images}
    clip = scorer.score(scored, images, {key: references[key] for key in scored})
    if OVERALL in scores:
        return {**scores, OVERALL: {**scores[OVERALL], **clip.means()}}, clip.per_image(), None
    return {**scores, **clip.means()}, clip.per_image(), None


def _domains(workspace: Path, dataset: str, split: str) -> dict[str, str | None]:
    """NoCaps domain by image id; None where the files named none (all of test, val without them)."""
    with open_catalog(workspace) as catalog:
        return {image.image_id: image.domain for image in catalog.usable_images(dataset, split)}


def _blind_scores(captioner, reader, references, decoding) -> dict[str, float]:
    """The caption-blind baseline: the same frozen language model, modules switched off."""
    from ituning.validation import evaluate_captions

    return evaluate_captions(captioner.model, captioner.tokenizer, reader, references, decoding=decoding,
                             blind=True)
