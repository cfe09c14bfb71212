"""Data-parallel training under torchrun on CPU (gloo): 2 processes, each with half of every step's
captions, follow the same losses and reach the same weights as 1 process on the whole batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file
from torch.testing import assert_close

from ituning.checkpoint import WEIGHTS_FILE
from ituning.distributed import shard, summed, world
from tests.test_services import free_port

ROOT = Path(__file__).resolve().parent.parent


def torchrun(processes: int, backbones, out: Path) -> list[float]:
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={processes}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(ROOT / "tests" / "ddp_training.py"),
               backbones.vision_model, backbones.language_model, str(out)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads((out / "losses.json").read_text())


def test_without_a_process_group_nothing_is_sharded_or_summed():
    assert world() == (0, 1)
    assert shard([1, 2, 3]) == [1, 2, 3] and summed(2.5) == 2.5


@pytest.mark.slow
def test_two_processes_match_one_at_the_same_effective_batch(standin_backbones, tmp_path):
    single = torchrun(1, standin_backbones, tmp_path / "one")
    double = torchrun(2, standin_backbones, tmp_path / "two")
    assert len(single) == len(double) == 6  # 2 epochs of 3 steps (24 captions, batch 8)
    assert_close(double, single, rtol=1e-5, atol=1e-6)
    one = load_file(tmp_path / "one" / "finetune" / "final" / WEIGHTS_FILE)
    two = load_file(tmp_path / "two" / "finetune" / "final" / WEIGHTS_FILE)
    for name in one:  # AdamW divides by the gradient's own scale: rounding in near-zero gradients shows at 1e-4
        assert_close(two[name], one[name], rtol=1e-3, atol=1e-3)
