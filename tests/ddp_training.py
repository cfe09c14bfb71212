"""Run by the DDP test under torchrun: a short training run on the stand-in backbones whose step
losses (from rank 0) go to OUT/losses.json and whose weights go to OUT/finetune/final.

    torchrun --nproc_per_node=2 tests/ddp_training.py VISION_DIR LANGUAGE_DIR OUT
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ituning.backbones import BackboneSpec
from ituning.distributed import is_main_process
from ituning.training import train_run
from tests.test_training import Recorder, run_config, stage_data, stage_dict
from tests.training_fixtures import cider_scorer


def main(vision: str, language: str, out: str) -> None:
    torch.manual_seed(0)  # the same fresh modules in the one-process run as on rank 0 of the two
    backbones = BackboneSpec(vision_model=vision, vision_pretrained=None, language_model=language)
    config = run_config(backbones, [stage_dict(epochs=2, val_split=None, batch_size=8, micro_batch_size=2)])
    recorder = Recorder()
    train_run(config, {"finetune": stage_data()}, out, cider_scorer, [recorder], progress=False)
    if is_main_process():
        Path(out, "losses.json").write_text(json.dumps([metrics["loss"] for _, metrics in recorder.steps]))
    if dist.is_initialized():  # train_run joined it: torchrun gave WORLD_SIZE > 1
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
