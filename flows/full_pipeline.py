"""full-pipeline: data, catalog, feature cache, training stages, evaluation and registration as one DAG.

Downloads and feature shards run side by side; training waits for the features it reads, each
stage for the one before it, evaluation for the final checkpoint. Every expensive task is cached by
its real inputs, so a rerun after a crash, or with nothing changed, reuses what finished and says so
in the log and in the run's summary artifact.
"""

from prefect import flow

from flows.parameters import (BackboneSteps, Corpora, Device, Evaluation, GallerySize, ImageArchives, Manifests,
                              ModelName, Overrides, Preset, ShardSize, Source, SyntheticImages, Workspace,
                              resolve_workspace)
from flows.steps import (DataSources, backbones_for, data_records, encode_splits, evaluate_all, fetch_datasets,
                         prepare, step_record, train_in_order)
from pipeline.registry import registration_note
from tasks.data import apply_config_overrides, plan_pipeline
from tasks.reports import publish_report
from tasks.training import finish_pipeline_run, promote_if_better, register_captioner, start_pipeline_run


@flow(name="full-pipeline", log_prints=True)
def full_pipeline(config: Preset = "demo", source: Source = "synthetic", workspace: Workspace = None,
                  synthetic_images: SyntheticImages = 600, shard_size: ShardSize = 1024,
                  evaluate_on: list[Evaluation] = ["test"], device: Device = "auto", gallery_size: GallerySize = 50,
                  register_as: ModelName = None, image_archives: ImageArchives = None,
                  backbone_steps: BackboneSteps = 100, manifests: Manifests = None, corpora: Corpora = None,
                  overrides: Overrides = None) -> dict:
    root = resolve_workspace(workspace)
    plan = plan_pipeline(apply_config_overrides(config, overrides or [], root), evaluate_on)
    data = DataSources(source, synthetic_images, image_archives or {}, manifests or {}, corpora or {})
    run_id = start_pipeline_run(root, f"full-pipeline-{config}", {"config": config, **data.parameters()})
    try:
        outcome = _run_plan(root, plan, run_id, data, shard_size, device, gallery_size,
                            register_as or plan["model_name"], backbone_steps)
    except BaseException:
        finish_pipeline_run(root, run_id, failed=True)
        raise
    finish_pipeline_run(root, run_id, all_reused=nothing_ran(outcome))
    return outcome


def nothing_ran(outcome: dict) -> bool:
    """Every step was reused from an earlier run and the registry already held the weights."""
    return all(record["cached"] or record.get("already_done") for record in outcome["steps"]) \
        and not outcome["model"]["new_version"]


def _run_plan(root, plan, run_id, data, shard_size, device, gallery_size, register_as, backbone_steps) -> dict:
    # ---- data: datasets in parallel, then the catalog, then the backbones that encode it
    downloads = fetch_datasets(root, plan["datasets"], data)
    catalog = prepare(root, plan["datasets"], downloads)
    backbones, built = backbones_for(root, plan["config"], plan["demo_backbones"], catalog, backbone_steps)
    # ---- feature cache: every shard of every split at once
    entries = encode_splits(root, plan["feature_splits"], backbones, shard_size, device, catalog)
    # ---- training stages in order, then every evaluation of the final checkpoint
    trained = train_in_order(root, plan["config"], plan["stages"], entries, run_id, device)
    final = trained[-1].result()
    evaluations = evaluate_all(root, final["checkpoint"], plan["evaluations"], entries, run_id, gallery_size, device)
    # ---- registry: register the checkpoint, make it champion when it scores best on the same task
    records = [step_record(stage["name"], future) for stage, future in zip(plan["stages"], trained)]
    records += [step_record(f"evaluate {d}/{s}", future) for (d, s), future in zip(plan["evaluations"], evaluations)]
    first = evaluations[0].result()
    model = register_captioner(root, final["checkpoint"], final["run_id"], register_as)
    promotion = promote_if_better(root, model["name"], model["version"], first, model.get("waiting"))
    notes = [registration_note(model, promotion), f"pipeline parent run: {run_id}"]
    before = data_records(plan["datasets"], downloads, catalog, built, entries)
    publish_report(f"full-pipeline ({plan['config']})", before + records, root, first.get("sample", [])[:5], notes)
    return {"parent_run_id": run_id, "data": before, "steps": records, "test": first["metrics"], "model": model,
            "promotion": promotion, "sample": first.get("sample", [])[:5]}
