"""Visual keys/values computed once per image and shared by its captions: the same loss and
gradients as computing them per caption, and the data path that groups captions by image."""

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from ituning.checkpoint import WEIGHTS_FILE
from ituning.config import config_from_dict
from ituning.data import MicroBatches, collate, epoch_samples
from ituning.model import ITuningConfig, trainable_parameters
from ituning.training import StageData, StageTrainer, build_model, caption_loss_sum
from tests.conftest import random_visual, tiny_captioner
from tests.training_fixtures import caption_set, cider_scorer, random_feature_set

STANDIN_WIDTH = 128  # the stand-in vision width
UNEVEN = torch.tensor([2, 0, 0, 1, 0, 2, 0])  # caption b shows image UNEVEN[b]: 4, 1 and 2 captions, interleaved


def run_config(backbones, **stage):
    model = {"vision_model": backbones.vision_model, "vision_pretrained": None,
             "language_model": backbones.language_model}
    stage = {"name": "finetune", "dataset": "coco", "epochs": 2, "batch_size": 8, "micro_batch_size": 4,
             "learning_rate": 0.01, "precision": "float32", "val_split": None, **stage}
    return config_from_dict({"name": "shared", "device": "cpu", "model": model, "stages": [stage]})


def loss_and_gradients(model, run) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = run()
    loss.backward()
    return loss.detach(), [parameter.grad.clone() for parameter in trainable_parameters(model)]


def test_shared_keys_values_give_the_unshared_loss_and_gradients_in_float64():
    model = tiny_captioner(ITuningConfig(zero_init_output=False, drop_first=1)).double()
    visual = random_visual(3).double()  # (3 images, N, d_v)
    input_ids = torch.randint(0, 100, (len(UNEVEN), 6))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 4:] = attention_mask[5, 2:] = 0  # padded captions

    def loss(**visual_input):
        logits = model(input_ids, attention_mask=attention_mask, **visual_input).logits
        return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten(),
                                                 reduction="none").mul(attention_mask[:, 1:].flatten()).sum()

    shared = loss_and_gradients(model, lambda: loss(visual=visual, image_index=UNEVEN))
    unshared = loss_and_gradients(model, lambda: loss(visual=visual[UNEVEN]))  # the per-caption call
    assert_close(shared[0], unshared[0])
    assert len(shared[1]) == 2 * 8  # 2 modules x (query, key, value: weight and bias; W_o, b_o)
    for with_sharing, without in zip(shared[1], unshared[1]):
        assert with_sharing.abs().sum() > 0
        assert_close(with_sharing, without)


def test_a_collated_micro_batch_trains_exactly_like_per_caption_copies(standin_backbones):
    model, tokenizer, _ = build_model(run_config(standin_backbones), "cpu")
    model.double()
    for layer in model.wrapped_layers.values():  # W_o = 0 would leave Q, K and V without gradient
        torch.nn.init.normal_(layer.ituning.output.weight, std=0.1)
    captions = caption_set(3, per_image=3)
    features = random_feature_set(captions, STANDIN_WIDTH)
    samples = [("img2", 1), ("img0", 0), ("img0", 2), ("img1", 0), ("img0", 1), ("img2", 0)]
    batches = {share: collate(samples, captions, features, tokenizer, 40, share_visual=share) for share in (True, False)}
    assert batches[True].visual.shape[0] == 3 and batches[False].visual.shape[0] == len(samples)
    shared = loss_and_gradients(model, lambda: caption_loss_sum(model, batches[True]))
    unshared = loss_and_gradients(model, lambda: caption_loss_sum(model, batches[False]))
    assert_close(shared[0], unshared[0])
    for with_sharing, without in zip(shared[1], unshared[1]):
        assert with_sharing.abs().sum() > 0
        assert_close(with_sharing, without)


def test_collate_reads_each_image_once_and_points_every_caption_at_it(standin_backbones):
    _, tokenizer, _ = build_model(run_config(standin_backbones), "cpu")
    captions = caption_set(3, per_image=3)
    features = random_feature_set(captions, STANDIN_WIDTH)
    samples = [("img1", 0), ("img1", 1), ("img0", 0), ("img1", 2), ("img2", 1)]
    shared = collate(samples, captions, features, tokenizer, 40)
    assert shared.image_index.tolist() == [0, 0, 1, 0, 2]
    for row, image_id in enumerate(["img1", "img0", "img2"]):  # in order of first appearance
        assert np.array_equal(shared.visual[row].numpy(), features[image_id])
    per_caption = collate(samples, captions, features, tokenizer, 40, share_visual=False)
    assert per_caption.image_index is None
    assert torch.equal(shared.visual[shared.image_index], per_caption.visual)
    assert torch.equal(shared.input_ids, per_caption.input_ids) and torch.equal(shared.labels, per_caption.labels)


def test_an_epoch_keeps_each_image_captions_together_and_micro_batches_read_each_image_once(standin_backbones):
    _, tokenizer, _ = build_model(run_config(standin_backbones), "cpu")
    captions = {f"img{i}": [f"a red circle number {k}" for k in range(1 + i % 4)] for i in range(9)}  # 1 to 4 each
    order = epoch_samples(captions, "all", seed=0, epoch=0)
    assert sorted(order) == sorted((i, k) for i, texts in captions.items() for k in range(len(texts)))
    images_in_order = [image_id for image_id, _ in order]
    runs = [image_id for position, image_id in enumerate(images_in_order)
            if position == 0 or images_in_order[position - 1] != image_id]
    assert sorted(runs) == sorted(captions)  # one run of adjacent captions per image
    assert runs != [image_id for image_id, _ in epoch_samples(captions, "all", seed=0, epoch=1)][: len(runs)]
    batches = MicroBatches([order], 4, captions, random_feature_set(captions, STANDIN_WIDTH), tokenizer, 40)
    for index, chunk in enumerate(batches.chunks):
        batch = batches[index]
        assert batch.visual.shape[0] == len({image_id for image_id, _ in chunk})
        assert [list(dict.fromkeys(i for i, _ in chunk))[k] for k in batch.image_index] == [i for i, _ in chunk]


def test_an_image_index_outside_the_images_is_refused():
    model = tiny_captioner()
    with pytest.raises(ValueError, match=r"image_index must lie in \[0, 2\) for 2 images"):
        model(torch.randint(0, 100, (3, 4)), visual=random_visual(2), image_index=torch.tensor([0, 2, 1]))


def test_a_stage_trains_the_same_with_and_without_sharing_in_float64(standin_backbones, tmp_path):
    captions = caption_set(6, per_image=5)  # COCO's 5 captions per image; micro-batches of 4 split some images
    data = StageData(random_feature_set(captions, STANDIN_WIDTH), captions)
    losses, weights = {}, {}
    for share in (True, False):
        stage = run_config(standin_backbones, share_visual=share, epochs=1, micro_batch_size=4, batch_size=12)
        model, tokenizer, backbones = build_model(stage, "cpu")
        steps = []
        recorder = type("Steps", (), {"on_step": lambda self, step, metrics: steps.append(metrics["loss"])})()
        trainer = StageTrainer(model.double(), tokenizer, backbones, stage.stages[0], data, tmp_path / str(share),
                               cider_scorer, [recorder], progress=False)
        straddling = trainer.micro_batch_set([epoch_samples(captions, "all", 0, 0)[3:7]])[0]  # 2 + 2 captions
        assert (straddling.image_index is not None) is share and len(straddling.visual) == (2 if share else 4)
        result = trainer.run(resume=False)
        losses[share], weights[share] = steps, load_file(result.final_dir / WEIGHTS_FILE)
    assert len(losses[True]) == 3  # 30 captions, 12 a step
    assert_close(losses[True], losses[False])
    for name, tensor in weights[True].items():
        assert_close(tensor, weights[False][name])


def test_the_stage_setting_turns_sharing_off(standin_backbones):
    assert run_config(standin_backbones).stages[0].share_visual is True
    assert run_config(standin_backbones, share_visual=False).stages[0].share_visual is False
