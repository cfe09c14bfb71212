"""The training speed settings change how fast a stage runs, never what it computes: data held on
the device gives collate's micro-batches and the same training, `micro_batch_size: auto` picks a
micro-batch that divides the batch and fits, `compile` gives the eager loss and gradients."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from ituning.checkpoint import WEIGHTS_FILE
from ituning.config import config_from_dict
from ituning.data import collate, epoch_samples
from ituning.device_data import DataDoesNotFit, DeviceCaptionData, holds_on_device, load_visual_tokens
from ituning.micro_batch import HOST_MICRO_BATCH, fitting_micro_batch, resolve_micro_batch, worst_micro_batch
from ituning.model import ITuningConfig, trainable_parameters
from ituning.training import StageData, StageTrainer, build_model, caption_loss_sum, training_loss
from tests.conftest import tiny_captioner
from tests.training_fixtures import caption_set, cider_scorer, random_feature_set

STANDIN_WIDTH = 128  # the stand-in vision width
CPU = torch.device("cpu")


def run_config(backbones, device="cpu", **stage):
    model = {"vision_model": backbones.vision_model, "vision_pretrained": None,
             "language_model": backbones.language_model}
    stage = {"name": "finetune", "dataset": "coco", "epochs": 2, "batch_size": 8, "micro_batch_size": 4,
             "learning_rate": 0.01, "precision": "float32", "val_split": None, **stage}
    return config_from_dict({"name": "speed", "device": device, "model": model, "stages": [stage]})


def assert_same_batch(actual, expected):
    for name in ("input_ids", "labels", "attention_mask", "visual"):
        assert torch.equal(getattr(actual, name), getattr(expected, name)), name
    assert (actual.image_index is None) == (expected.image_index is None)
    if expected.image_index is not None:
        assert torch.equal(actual.image_index, expected.image_index)
        assert torch.equal(actual.image_groups.slot, expected.image_groups.slot)
        assert actual.image_groups.per_image == expected.image_groups.per_image


@pytest.mark.parametrize("share_visual", [True, False])
def test_micro_batches_gathered_on_the_device_equal_collated_ones(standin_backbones, share_visual):
    _, tokenizer, _ = build_model(run_config(standin_backbones), "cpu")
    captions = {**caption_set(4, per_image=3), "img9": ["a " + "very " * 60 + "long caption"], "empty": []}
    features = random_feature_set(captions, STANDIN_WIDTH)
    held = DeviceCaptionData(captions, features, tokenizer, 12, CPU, share_visual, progress=False)
    assert held.visual.shape == (5, 5, STANDIN_WIDTH) and held.visual.dtype == torch.float16  # "empty" has no caption
    for samples in ([("img2", 1), ("img0", 0), ("img0", 2), ("img9", 0), ("img0", 1), ("img2", 0)],
                    [("img3", 2)], epoch_samples(captions, "all", 0, 0)):
        expected = collate(samples, captions, features, tokenizer, 12, share_visual)
        assert_same_batch(held.collate(samples), expected)
    assert held.collate([("img9", 0)]).input_ids.shape == (1, 13)  # cut to 12 targets, as collate cuts


def test_a_stage_with_its_data_on_the_device_trains_exactly_like_a_streaming_one(standin_backbones, tmp_path):
    captions = caption_set(6, per_image=5)
    data = StageData(random_feature_set(captions, STANDIN_WIDTH), captions)
    losses, weights = {}, {}
    for on_device in (True, False):
        config = run_config(standin_backbones, data_on_device=on_device, epochs=2, batch_size=12)
        model, tokenizer, backbones = build_model(config, "cpu")
        steps = []
        recorder = type("Steps", (), {"on_step": lambda self, step, metrics: steps.append(metrics["loss"])})()
        trainer = StageTrainer(model, tokenizer, backbones, config.stages[0], data, tmp_path / str(on_device),
                               cider_scorer, [recorder], progress=False)
        assert (trainer.device_data is not None) is on_device
        result = trainer.run(resume=False)
        losses[on_device], weights[on_device] = steps, load_file(result.final_dir / WEIGHTS_FILE)
    assert len(losses[True]) == 6  # 30 captions, 12 a step, 2 epochs
    assert losses[True] == losses[False]
    for name, tensor in weights[True].items():
        assert torch.equal(tensor, weights[False][name]), name


def test_where_the_data_are_held():
    assert holds_on_device(True, CPU, lambda: 10**15)  # asked for: the CPU's memory is not judged
    assert not holds_on_device(False, CPU, lambda: 1) and not holds_on_device("auto", CPU, lambda: 1)  # auto: CUDA only


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_auto_holds_what_fits_and_true_refuses_what_cannot():
    device = torch.device("cuda")
    free = torch.cuda.mem_get_info(device)[0]
    assert holds_on_device("auto", device, lambda: free // 4) and not holds_on_device("auto", device, lambda: free)
    with pytest.raises(DataDoesNotFit, match="data_on_device: true, but the split's visual tokens take"):
        holds_on_device(True, device, lambda: 2 * free)


def test_images_missing_from_the_features_are_named():
    features = random_feature_set(["a", "b"], 8)
    with pytest.raises(KeyError, match=r"no visual tokens for 1 image\(s\) with captions, e.g. \['c'\]"):
        load_visual_tokens(_WithoutKey(features), {"a": 0, "b": 1, "c": 2}, CPU, progress=False)


class _WithoutKey(dict):
    """Features whose blocks leave out an image, as a cache missing an unreadable image would."""

    def shard_blocks(self):
        ids = list(self)
        yield ids, np.stack([self[image_id] for image_id in ids])


def test_an_automatic_micro_batch_divides_the_batch_and_fits_the_budget():
    assert fitting_micro_batch(4096, budget_bytes=100e9, fixed_bytes=2e9, bytes_per_caption=100e6) == 512
    assert fitting_micro_batch(4096, budget_bytes=100e9, fixed_bytes=2e9, bytes_per_caption=1e6) == 4096
    assert fitting_micro_batch(100, budget_bytes=10e9, fixed_bytes=1e9, bytes_per_caption=200e6) == 25
    assert fitting_micro_batch(64, budget_bytes=1e9, fixed_bytes=2e9, bytes_per_caption=1) == 1  # nothing fits
    assert resolve_micro_batch(32, 4096, CPU, run_size=None) == 32
    assert resolve_micro_batch("auto", 4096, CPU, run_size=None) == HOST_MICRO_BATCH
    assert resolve_micro_batch("auto", 100, CPU, run_size=None) == 50


def test_a_stage_with_an_automatic_micro_batch_runs_on_the_cpu(standin_backbones, tmp_path):
    config = run_config(standin_backbones, micro_batch_size="auto", epochs=1, batch_size=6)
    model, tokenizer, backbones = build_model(config, "cpu")
    captions = caption_set(4, per_image=3)
    trainer = StageTrainer(model, tokenizer, backbones, config.stages[0],
                           StageData(random_feature_set(captions, STANDIN_WIDTH), captions), tmp_path, progress=False)
    assert trainer.micro_batch_size == 6
    assert trainer.run(resume=False).steps == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_on_cuda_the_automatic_micro_batch_is_measured_and_runs(standin_backbones, tmp_path):
    config = run_config(standin_backbones, "cuda", epochs=1, batch_size=64, micro_batch_size="auto",
                        precision="auto")
    model, tokenizer, backbones = build_model(config, "cuda")
    captions = caption_set(16, per_image=4)
    trainer = StageTrainer(model, tokenizer, backbones, config.stages[0],
                           StageData(random_feature_set(captions, STANDIN_WIDTH), captions), tmp_path, progress=False)
    assert trainer.micro_batch_size == 64  # a tiny model: the whole batch fits
    assert trainer.run(resume=False).steps == 1


def test_the_worst_micro_batch_has_every_caption_long_and_on_its_own_image():
    batch = worst_micro_batch(3, 41, (5, 8), torch.float16, CPU)
    assert batch.input_ids.shape == (3, 41) and batch.visual.shape == (3, 5, 8)
    assert batch.image_groups.per_image == 1 and batch.target_tokens == 3 * 41


def test_compiling_is_off_on_the_cpu_unless_asked_for():
    assert training_loss("auto", CPU) is caption_loss_sum and training_loss(False, CPU) is caption_loss_sum
    assert training_loss(True, CPU) is not caption_loss_sum


@pytest.mark.slow  # compiling forward and backward takes about a minute on 2 CPU cores
def test_the_compiled_training_loss_equals_the_eager_one_across_batch_shapes():
    torch.manual_seed(0)
    model = tiny_captioner(ITuningConfig(zero_init_output=False))
    compiled = training_loss(True, CPU)
    for captions, length, images in ((6, 7, 3), (8, 9, 4), (5, 4, 2)):  # shapes change: compiled once, dynamic
        input_ids = torch.randint(0, 100, (captions, length))
        batch = collate_like(input_ids, images)
        results = []
        for loss_sum in (compiled, caption_loss_sum):
            model.zero_grad(set_to_none=True)
            loss = loss_sum(model, batch)
            loss.backward()
            results.append((loss.detach(), [p.grad.clone() for p in trainable_parameters(model)]))
        assert_close(results[0][0], results[1][0], rtol=1e-4, atol=1e-4)
        for compiled_grad, eager_grad in zip(results[0][1], results[1][1]):
            assert_close(compiled_grad, eager_grad, rtol=1e-4, atol=1e-4)


def collate_like(input_ids: torch.Tensor, images: int):
    from ituning.data import CaptionBatch
    from tests.conftest import random_visual

    image_index = torch.arange(len(input_ids)) % images  # uneven captions per image
    return CaptionBatch(input_ids, input_ids.clone(), torch.ones_like(input_ids), random_visual(images), image_index)
