"""Scoring a checkpoint on a split as a child run of the pipeline's MLflow run: captions, COCO
metrics, NoCaps domains and the evaluation report.
"""

from dataclasses import asdict
from pathlib import Path

from ituning.evaluation import score_by_domain
from pipeline.data import catalog_fingerprint, open_catalog, split_images
from pipeline.tracking import ExperimentTracker
from pipeline.training import child_run, log_split_inputs, split_data
from storage.sources import NOCAPS_DOMAINS, unknown_domains

SAMPLE_SIZE = 5


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


def score_nocaps(candidates: dict[str, str], references: dict[str, list[str]], domains: dict[str, str | None],
                 metrics=None) -> dict[str, dict[str, float]]:
    """Scores by NoCaps domain and overall; a domain NoCaps does not have is an error."""
    unknown = unknown_domains(domains)
    if unknown:
        raise ValueError(f"images with unknown domains {unknown}; expected {', '.join(NOCAPS_DOMAINS)}")
    return score_by_domain(candidates, references, domains, metrics)


def evaluation_task(workspace: Path, dataset: str, split: str) -> str:
    """What an evaluation's scores are comparable on: the split and the catalog's images and
    references of it (CIDEr depends on the whole reference set), e.g. "coco/test@3f2a...". The
    synthetic corpus's "coco" and the real COCO are different tasks."""
    return f"{dataset}/{split}@{catalog_fingerprint(workspace, [(dataset, split)])[:16]}"


def _evaluate_tracked(tracker, run_id, workspace, captioner, reader, references, dataset, split, decoding,
                      gallery_size, blind_baseline) -> dict:
    from ituning.evaluation import evaluate_split, generate_captions, missing_domains_note, write_nocaps_submission
    from pipeline.report import write_report

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
        tracker.client.set_tag(run_id, "ituning.notes", "; ".join(notes))
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
