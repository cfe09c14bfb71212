"""retrain: the scheduled retraining. Fine-tunes on the current catalog and feature cache (afresh
when they or the settings changed since the stage was last trained), evaluates, registers the new
version and moves the "champion" alias only when its CIDEr beats the champion's; the comparison is
kept on the model version (tags) and in the run's summary artifact."""

from prefect import flow

from flows.parameters import Device, Preset, Workspace, resolve_workspace
from flows.steps import stage_record
from tasks.data import plan_pipeline
from tasks.reports import publish_report
from tasks.training import (evaluate_checkpoint, finish_pipeline_run, promote_if_better, register_captioner,
                            start_pipeline_run, train_stage)


@flow(name="retrain", log_prints=True)
def retrain(config: Preset = "demo", workspace: Workspace = None, init_from: str | None = None,
            device: Device = "auto", register_as: str = "ituning-captioner") -> dict:
    root = resolve_workspace(workspace)
    plan = plan_pipeline(config, ["test"])
    stage, (dataset, split) = plan["stages"][-1], plan["evaluations"][0]
    run_id = start_pipeline_run(root, f"retrain-{config}", {"config": config, "stage": stage["name"]})
    # A schedule asks for new weights: the cache is refreshed, never read.
    trained = train_stage.with_options(refresh_cache=True).submit(root, config, stage["name"], parent_run_id=run_id,
                                                                   init_from=init_from, device=device)
    checkpoint = trained.result()["checkpoint"]
    scored = evaluate_checkpoint.with_options(refresh_cache=True).submit(root, checkpoint, dataset, split,
                                                                         parent_run_id=run_id, device=device)
    model = register_captioner(root, checkpoint, trained.result()["run_id"], register_as)
    cider = scored.result()["metrics"].get("CIDEr")
    promotion = promote_if_better(root, model["name"], model["version"], "CIDEr", cider)
    finish_pipeline_run(root, run_id)
    publish_report(f"retrain ({config})", [stage_record(stage["name"], trained),
                                           stage_record(f"evaluate {dataset}/{split}", scored)], root,
                   notes=[comparison_note(model, promotion)], key="retrain-summary")
    return {"model": model, "promotion": promotion}


def comparison_note(model: dict, promotion: dict) -> str:
    champion = promotion.get("champion")
    before = "no champion yet" if champion is None else f"champion CIDEr {champion:.4f} (version {promotion.get('champion_version')})"
    verdict = "promoted to champion" if promotion["promoted"] else "champion kept"
    return f"{model['name']} version {model['version']}: CIDEr {promotion['candidate']} vs {before}: {verdict}"
