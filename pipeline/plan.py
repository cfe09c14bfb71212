"""What a run configuration needs from the data side: datasets, splits to encode, stages in order."""

from dataclasses import asdict, dataclass

from pipeline.data import STANDIN_SPLIT
from pipeline.presets import config_file, load_run_config
from storage.datasets import get_dataset


@dataclass(frozen=True)
class PipelinePlan:
    config: str
    stages: list[dict]          # [{"name", "dataset", "splits"}] in training order
    feature_splits: list[list[str]]   # [[dataset, split]] to encode
    evaluations: list[list[str]]      # [[dataset, split]] scored with the final checkpoint
    datasets: list[str]
    demo_backbones: bool
    # The registered model its captioners go to by default: one per preset, so that only captioners
    # of the same task compete for its champion (the demo never meets a real model).
    model_name: str

    def to_dict(self) -> dict:
        return asdict(self)


def plan_for_config(config: str, evaluate_on: list[str]) -> PipelinePlan:
    run = load_run_config(config_file(config))
    stages, splits = [], []
    for stage in run.stages:
        dataset = stage.dataset
        stage_splits = [s for s in (stage.train_split, stage.val_split) if s]
        stages.append({"name": stage.name, "dataset": dataset, "splits": stage_splits})
        splits += [[dataset, split] for split in stage_splits]
    final = stages[-1]["dataset"]
    evaluations = [_evaluation(item, final) for item in evaluate_on]
    splits += evaluations
    standins = [STANDIN_SPLIT[0]] if run.model.standins else []  # the demo's stand-ins learn from its captions
    datasets = _with_needs(sorted({dataset for dataset, _ in splits} | set(standins)))
    return PipelinePlan(str(config), stages, _unique(splits), evaluations, datasets, run.model.standins,
                        f"ituning-{run.name}")


def _evaluation(item: str, final_dataset: str) -> list[str]:
    """`test` means the final stage's dataset; `nocaps/val` names one."""
    dataset, _, split = item.rpartition("/")
    return [dataset or final_dataset, split]


def _with_needs(datasets: list[str]) -> list[str]:
    """The datasets and those they need catalogued first (the Visual Genome split leaves out COCO's
    val and test images), as the registry says."""
    needed, waiting = set(), list(datasets)
    while waiting:
        dataset = waiting.pop()
        if dataset not in needed:
            needed.add(dataset)
            waiting += get_dataset(dataset).needs
    return sorted(needed)


def _unique(pairs: list[list[str]]) -> list[list[str]]:
    seen, kept = set(), []
    for pair in pairs:
        if tuple(pair) not in seen:
            seen.add(tuple(pair))
            kept.append(pair)
    return kept
