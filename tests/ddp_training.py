"""Run by the DDP test under torchrun: a short two-stage training run on the stand-in backbones. Rank 0
writes OUT/run.json (step losses, the type of model the training forwards went through, and the
number of gradient values DDP all-reduced during each optimizer step); the weights go to
OUT/<stage>/final.

    torchrun --nproc_per_node=2 tests/ddp_training.py VISION_DIR LANGUAGE_DIR OUT

Stage "finetune" splits every step evenly (8 captions, micro-batches of 2). Stage "uneven" takes 7
captions in steps of 3, one per micro-batch: one process runs two micro-batches where the other runs
one, and in the last step (1 caption) one process has none.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

import ituning.training
from ituning.backbones import BackboneSpec
from ituning.distributed import is_main_process
from ituning.training import train_run
from tests.test_training import Recorder, run_config, stage_data, stage_dict
from tests.training_fixtures import cider_scorer


class ReductionCounter(Recorder):
    """Wraps the training's own data_parallel: the replica it made, and DDP's gradient all-reduces
    (through DDP's default averaging hook) counted in values per optimizer step."""

    def __init__(self):
        super().__init__()
        self.replica_type, self.reduced, self.reduced_per_step = None, 0, []

    def data_parallel(self, model):
        replica = wrap(model)
        self.replica_type = type(replica).__name__
        if isinstance(replica, torch.nn.parallel.DistributedDataParallel):
            replica.register_comm_hook(None, self.count_and_reduce)
        return replica

    def count_and_reduce(self, state, bucket):
        self.reduced += bucket.buffer().numel()
        return allreduce_hook(state, bucket)

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        self.reduced_per_step.append(self.reduced)
        self.reduced = 0


wrap = ituning.training.data_parallel


def main(vision: str, language: str, out: str) -> None:
    torch.manual_seed(0)  # the same fresh modules in the one-process run as on rank 0 of the two
    backbones = BackboneSpec(vision_model=vision, vision_pretrained=None, language_model=language)
    stages = [stage_dict(epochs=2, val_split=None, batch_size=8, micro_batch_size=2),
              stage_dict(name="uneven", epochs=1, val_split=None, batch_size=3, micro_batch_size=1, captions="random")]
    config = run_config(backbones, stages)
    recorder = ReductionCounter()
    ituning.training.data_parallel = recorder.data_parallel
    train_run(config, {"finetune": stage_data(), "uneven": stage_data(images=7, seed=1)}, out, cider_scorer,
              [recorder], progress=False)
    if is_main_process():
        record = {"losses": [metrics["loss"] for _, metrics in recorder.steps], "replica": recorder.replica_type,
                  "reduced_per_step": recorder.reduced_per_step}
        Path(out, "run.json").write_text(json.dumps(record))
    if dist.is_initialized():  # train_run joined it: torchrun gave WORLD_SIZE > 1
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
