"""Data-parallel training under torchrun on CPU (gloo): 2 processes in DistributedDataParallel, each with
half of every step's captions, follow the same losses and reach the same weights as 1 process on the
whole batch, also when the processes get unequal shares or one gets none."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from ituning.checkpoint import WEIGHTS_FILE
from ituning.distributed import data_parallel, shard, summed, world
from ituning.model import count_trainable
from ituning.training import build_model
from tests.ports import free_port
from tests.test_training import run_config, stage_dict

ROOT = Path(__file__).resolve().parent.parent


def torchrun(processes: int, backbones, out: Path) -> dict:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "tests" / "ddp_training.py"),
               backbones.vision_model, backbones.language_model, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "run.json").read_text())


def test_without_a_process_group_nothing_is_sharded_summed_or_wrapped():
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3] and summed(2.5) == 2.5
    model = torch.nn.Linear(2, 2)
    assert data_parallel(model) is model


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_effective_batch(standin_backbones, tmp_path):
    single = torchrun(1, standin_backbones, tmp_path / "one")
    double = torchrun(2, standin_backbones, tmp_path / "two")
    assert single["replica"] == "ITuningCaptioner" and double["replica"] == "DistributedDataParallel"
    trainable = count_trainable(build_model(run_config(standin_backbones, [stage_dict()]), "cpu")[0])
    # finetune: 2 epochs of 3 steps (24 captions, batch 8); uneven: 3 steps (7 captions, batch 3)
    assert double["reduced_per_step"] == [trainable] * 9  # one all-reduce per step, the modules only
    assert_close(double["losses"], single["losses"], rtol=1e-5, atol=0)  # float32 noise that AdamW amplifies (below)
    for stage in ("finetune", "uneven"):
        one = load_file(tmp_path / "one" / stage / "final" / WEIGHTS_FILE)
        two = load_file(tmp_path / "two" / stage / "final" / WEIGHTS_FILE)
        assert one.keys() == two.keys() and all(name.startswith("layers.") for name in two)
        # A key bias has no gradient in exact arithmetic (softmax ignores a shift shared by every key), so
        # AdamW scales the rounding noise of its gradient into full steps: no two summation orders agree there.
        for name in (name for name in one if not name.endswith("key.bias")):
            assert_close(two[name], one[name], rtol=1e-3, atol=1e-3)
