"""pretrain-vlp, finetune and evaluate: the training stages and the test on their own.

Each reads the catalog and feature cache that full-pipeline (or download-datasets, prepare-splits
and cache-features) left in the workspace.
"""

from prefect import flow

from flows.parameters import Dataset, Device, GallerySize, Preset, Workspace, resolve_workspace
from flows.steps import step_record
from tasks.caching import flow_result
from tasks.reports import publish_report
from tasks.training import evaluate_checkpoint, train_stage


@flow(name="pretrain-vlp", log_prints=True)
def pretrain_vlp(config: Preset = "coco-gpt2-vlp", workspace: Workspace = None, device: Device = "auto") -> dict:
    """The Visual Genome stage of a `-vlp` preset."""
    return _train(resolve_workspace(workspace), config, "pretrain", None, device)


@flow(name="finetune", log_prints=True)
def finetune(config: Preset = "demo", workspace: Workspace = None, init_from: str | None = None,
             device: Device = "auto") -> dict:
    """The caption fine-tuning stage, optionally from a pre-trained module checkpoint."""
    return _train(resolve_workspace(workspace), config, "finetune", init_from, device)


@flow(name="evaluate", log_prints=True)
def evaluate(checkpoint: str, dataset: Dataset = "coco", split: str = "test", workspace: Workspace = None,
             gallery_size: GallerySize = 50) -> dict:
    root = resolve_workspace(workspace)
    future = evaluate_checkpoint.submit(root, checkpoint, dataset, split, gallery_size=gallery_size)
    publish_report(f"evaluate {dataset}/{split}", [step_record(f"evaluate {dataset}/{split}", future)], root,
                   future.result().get("sample", [])[:5], key="evaluation-summary")
    return flow_result(root, future.result())


def _train(root, config: str, stage: str, init_from: str | None, device: str) -> dict:
    future = train_stage.submit(root, config, stage, init_from=init_from, device=device)
    publish_report(f"{stage} ({config})", [step_record(stage, future)], root, key=f"{stage}-summary")
    return flow_result(root, future.result())
