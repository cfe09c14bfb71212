"""retrain: the scheduled retraining. Refreshes the feature cache where the catalog changed, trains
the preset's last stage again on the current catalog (from the stage before it as the workspace
holds it, or from `init_from`), evaluates, registers the new version and moves the "champion" alias
only when it beats the champion on the same task; the comparison is kept on the model version
(tags) and in the run's summary artifact. The parent MLflow run ends FAILED when anything fails."""

from prefect import flow

from flows.parameters import Device, GallerySize, ModelName, Preset, ShardSize, Workspace, resolve_workspace
from flows.steps import encode_splits, evaluate_all, step_record, train_in_order
from pipeline.registry import registration_note
from tasks.caching import flow_result
from tasks.data import configured_backbones, plan_pipeline
from tasks.reports import publish_report
from tasks.training import finish_pipeline_run, promote_if_better, register_captioner, start_pipeline_run


@flow(name="retrain", log_prints=True)
def retrain(config: Preset = "demo", workspace: Workspace = None, init_from: str | None = None,
            device: Device = "auto", register_as: ModelName = None, shard_size: ShardSize = 1024,
            gallery_size: GallerySize = 50) -> dict:
    root = resolve_workspace(workspace)
    plan = plan_pipeline(config, ["test"])
    run_id = start_pipeline_run(root, f"retrain-{config}", {"config": config, "init_from": init_from})
    try:
        outcome = _retrain(root, plan, run_id, init_from, device, register_as or plan["model_name"], shard_size,
                           gallery_size)
    except BaseException:
        finish_pipeline_run(root, run_id, failed=True)
        raise
    finish_pipeline_run(root, run_id)
    return outcome


def _retrain(root, plan, run_id, init_from, device, register_as, shard_size, gallery_size) -> dict:
    stage = plan["stages"][-1]
    # ---- feature cache of what the stage and the test read (reused where the catalog is unchanged)
    splits = [[stage["dataset"], split] for split in stage["splits"]] + plan["evaluations"]
    entries = encode_splits(root, splits, configured_backbones(root, plan["config"]), shard_size, device)
    # ---- a schedule asks for new weights: the training and evaluation caches are refreshed, never read
    [trained] = train_in_order(root, plan["config"], [stage], entries, run_id, device, init_from=init_from,
                               refresh_last=True)
    checkpoint = flow_result(root, trained.result())["checkpoint"]
    [scored] = evaluate_all(root, checkpoint, plan["evaluations"], entries, run_id, gallery_size, device, refresh=True)
    # ---- registry
    model = register_captioner(root, checkpoint, trained.result()["run_id"], register_as)
    promotion = promote_if_better(root, model["name"], model["version"], scored.result(),
                                  model.get("waiting"))
    dataset, split = plan["evaluations"][0]
    publish_report(f"retrain ({plan['config']})", [step_record(stage["name"], trained),
                                                   step_record(f"evaluate {dataset}/{split}", scored)], root,
                   notes=[registration_note(model, promotion)], key="retrain-summary")
    return {"model": model, "promotion": promotion, "checkpoint": checkpoint, "metrics": scored.result()["metrics"]}
