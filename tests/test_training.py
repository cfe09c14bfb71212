import json
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.testing import assert_close

from ituning.checkpoint import WEIGHTS_FILE
from ituning.config import ConfigError, RunConfig, config_from_dict
from ituning.data import IGNORE_INDEX, collate, epoch_samples
from ituning.model import trainable_parameters
from ituning.schedule import warmup_cosine
from ituning.stopping import STOP, TrainingInterrupted, request_stop
from ituning.training import NonFiniteLoss, StageData, StageTrainer, build_model, caption_loss_sum, train_run
from ituning.training_state import StageFolder
from tests.training_fixtures import caption_set, cider_scorer, random_feature_set

WIDTH = 128  # the stand-in vision width


def run_config(backbones, stages: list[dict]) -> RunConfig:
    model = {"vision_model": backbones.vision_model, "vision_pretrained": None,
             "language_model": backbones.language_model}
    return config_from_dict({"name": "test", "device": "cpu", "model": model, "stages": stages})


def stage_dict(**overrides) -> dict:
    return {"name": "finetune", "dataset": "coco", "epochs": 2, "batch_size": 8, "micro_batch_size": 4,
            "learning_rate": 0.01, "warmup_fraction": 0.2, "precision": "fp32", **overrides}


def stage_data(images: int = 12, seed: int = 0) -> StageData:
    captions = caption_set(images)
    val_captions = caption_set(4, prefix="val")
    return StageData(random_feature_set(captions, WIDTH, seed), captions,
                     random_feature_set(val_captions, WIDTH, seed + 1), val_captions)


class Recorder:
    def __init__(self, stop_at_step: int | None = None):
        self.steps, self.epochs, self.checkpoints, self.stages = [], [], [], []
        self.stop_at_step = stop_at_step

    def on_step(self, step, metrics):
        if step == self.stop_at_step:
            raise KeyboardInterrupt("killed")
        self.steps.append((step, metrics))

    def on_epoch(self, epoch, metrics):
        self.epochs.append((epoch, metrics))

    def on_checkpoint(self, path):
        self.checkpoints.append(Path(path))

    def on_stage(self, name, config):
        self.stages.append(name)


@pytest.fixture
def model_and_tokenizer(standin_backbones):
    config = run_config(standin_backbones, [stage_dict()])
    return build_model(config, "cpu")


def test_labels_cover_caption_and_eos_but_not_prompt_or_padding(model_and_tokenizer):
    _, tokenizer, _ = model_and_tokenizer
    captions = {"a": ["a red circle in the middle"], "b": ["a blue square"]}
    features = random_feature_set(captions, WIDTH)
    batch = collate([("a", 0), ("b", 0)], captions, features, tokenizer, max_tokens=40)
    for row, text in enumerate(["a red circle in the middle", "a blue square"]):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        targets = batch.labels[row][batch.labels[row] != IGNORE_INDEX].tolist()
        assert targets == ids + [tokenizer.eos_token_id]
        assert batch.input_ids[row, 0] == tokenizer.bos_token_id
        assert batch.attention_mask[row].sum() == len(ids) + 2
    assert batch.visual.shape == (2, 5, WIDTH)
    short = collate([("a", 0)], captions, features, tokenizer, max_tokens=3)
    assert (short.labels != IGNORE_INDEX).sum() == 3 and short.labels[0, -1] == tokenizer.eos_token_id


def test_padding_does_not_change_a_caption_loss(model_and_tokenizer):
    model, tokenizer, _ = model_and_tokenizer
    torch.nn.init.normal_(model.wrapped_layers[0].ituning.output.weight, std=0.1)  # image-dependent
    captions = {"a": ["a red circle"], "b": ["three green triangles at the bottom of a grey picture"]}
    features = random_feature_set(captions, WIDTH)
    together = caption_loss_sum(model, collate([("a", 0), ("b", 0)], captions, features, tokenizer, 40))
    alone = sum(caption_loss_sum(model, collate([s], captions, features, tokenizer, 40)) for s in [("a", 0), ("b", 0)])
    assert_close(together, alone, rtol=1e-5, atol=1e-5)


def test_epoch_order_covers_every_caption_or_one_per_image():
    captions = caption_set(10, per_image=3)
    every = epoch_samples(captions, "all", seed=0, epoch=0)
    assert sorted(every) == sorted((i, k) for i in captions for k in range(3))
    assert every == epoch_samples(captions, "all", seed=0, epoch=0)
    assert every != epoch_samples(captions, "all", seed=0, epoch=1)
    draws = [epoch_samples(captions, "random", seed=0, epoch=e) for e in range(4)]
    for draw in draws:
        assert sorted(i for i, _ in draw) == sorted(captions)
    assert len({tuple(sorted(draw)) for draw in draws}) > 1  # other captions in other epochs


def test_warmup_then_cosine_decay():
    multiplier = warmup_cosine(total_steps=100, warmup_steps=10)
    assert multiplier(0) == pytest.approx(0.1) and multiplier(9) == pytest.approx(1.0)
    assert multiplier(10) == pytest.approx(1.0) and multiplier(55) == pytest.approx(0.5)
    assert multiplier(100) == pytest.approx(0.0, abs=1e-9)
    values = [multiplier(step) for step in range(10, 101)]
    assert values == sorted(values, reverse=True)


def gradients_after_one_step(backbones, tmp_path, micro_batch_size):
    config = run_config(backbones, [stage_dict(micro_batch_size=micro_batch_size, epochs=1)])
    torch.manual_seed(0)
    model, tokenizer, spec = build_model(config, "cpu")
    torch.nn.init.normal_(model.wrapped_layers[1].ituning.output.weight, std=0.1)
    trainer = StageTrainer(model, tokenizer, spec, config.stages[0], stage_data(), tmp_path, cider_scorer,
                           progress=False)
    samples = epoch_samples(trainer.data.captions, "all", 0, 0)[:8]
    trainer.optimizer.zero_grad = lambda set_to_none=True: None  # keep the gradients to compare them
    metrics = trainer.train_step(samples)
    return metrics["loss"], [p.grad.clone() for p in trainable_parameters(model)]


def test_gradient_accumulation_matches_one_large_batch(standin_backbones, tmp_path):
    loss_whole, grads_whole = gradients_after_one_step(standin_backbones, tmp_path / "a", micro_batch_size=8)
    loss_split, grads_split = gradients_after_one_step(standin_backbones, tmp_path / "b", micro_batch_size=2)
    assert loss_whole == pytest.approx(loss_split, rel=1e-5)
    for whole, split in zip(grads_whole, grads_split):
        assert_close(whole, split, rtol=1e-4, atol=1e-6)


def test_training_lowers_the_loss_and_touches_only_the_modules(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=4, val_split=None)])
    recorder = Recorder()
    model, _, _ = build_model(config, "cpu")
    frozen = {name: p.clone() for name, p in model.named_parameters() if not p.requires_grad}
    results = train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [recorder], progress=False)
    losses = [metrics["loss"] for _, metrics in recorder.steps]
    assert len(losses) == 4 * 3 and np.mean(losses[-3:]) < np.mean(losses[:3])
    assert {"loss", "lr", "captions_per_s", "grad_norm"} <= set(recorder.steps[0][1])
    assert recorder.stages == ["finetune"] and [epoch for epoch, _ in recorder.epochs] == [0, 1, 2, 3]
    weights = load_file(results[0].final_dir / WEIGHTS_FILE)
    assert all(key.startswith("layers.") for key in weights)
    reloaded, _, _ = build_model(config, "cpu")
    for name, parameter in reloaded.named_parameters():
        if name in frozen:
            assert torch.equal(parameter, frozen[name]), name


def test_best_checkpoint_follows_validation_cider(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=3, val_beams=2, val_max_length=8)])
    recorder = Recorder()
    [result] = train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [recorder], progress=False)
    ciders = [metrics["val_CIDEr"] for _, metrics in recorder.epochs]
    assert len(ciders) == 3 and result.best_cider == max(ciders)
    best = json.loads((result.best_dir / "metrics.json").read_text())
    assert best["val_CIDEr"] == max(ciders) and best["epoch"] == ciders.index(max(ciders))
    assert result.best_dir in recorder.checkpoints and tmp_path / "finetune" / "last" in recorder.checkpoints


def test_validation_scores_cider_alone_unless_the_stage_asks_for_more(standin_backbones, tmp_path):
    """With the real scorer (pycocoevalcap): METEOR's Java process only where val_metrics names it."""
    recorded = {}
    for metrics in (None, ["CIDEr", "METEOR", "BLEU-4"]):
        stage = stage_dict(epochs=1, val_max_length=6) | ({"val_metrics": metrics} if metrics else {})
        recorder = Recorder()
        train_run(run_config(standin_backbones, [stage]), {"finetune": stage_data()}, tmp_path / str(metrics),
                  callbacks=[recorder], progress=False)
        recorded[str(metrics)] = sorted(name for name in recorder.epochs[0][1] if name.startswith("val_"))
    assert recorded == {"None": ["val_CIDEr"], str(["CIDEr", "METEOR", "BLEU-4"]): ["val_BLEU-4", "val_CIDEr",
                                                                                   "val_METEOR"]}
    with pytest.raises(ConfigError, match="must include CIDEr"):
        run_config(standin_backbones, [stage_dict(val_metrics=["METEOR"])])


def test_micro_batches_collated_in_worker_processes_train_exactly_the_same(standin_backbones, tmp_path):
    data = stage_data(images=18)
    data.features = {image_id: tokens.astype(np.float16) for image_id, tokens in data.features.items()}  # as cached
    losses, weights = {}, {}
    for workers in (0, 2):
        config = run_config(standin_backbones, [stage_dict(data_workers=workers, val_split=None, micro_batch_size=2)])
        recorder = Recorder()
        [result] = train_run(config, {"finetune": data}, tmp_path / str(workers), cider_scorer, [recorder],
                             progress=False)
        losses[workers] = [metrics["loss"] for _, metrics in recorder.steps]
        weights[workers] = load_file(result.final_dir / WEIGHTS_FILE)
    assert len(losses[0]) == 10 and losses[2] == losses[0]  # 2 epochs of 5 steps
    assert all(torch.equal(weights[2][name], weights[0][name]) for name in weights[0])


def test_fresh_modules_follow_the_config_seed_not_the_global_generator(standin_backbones):
    def module_weights(seed: int, global_seed: int) -> dict:
        torch.manual_seed(global_seed)
        model, _, _ = build_model(run_config(standin_backbones, [stage_dict(seed=seed)]), "cpu")
        return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}

    first, again, other = module_weights(3, global_seed=1), module_weights(3, global_seed=2), module_weights(4, 1)
    assert all(torch.equal(first[name], again[name]) for name in first)
    assert not all(torch.equal(first[name], other[name]) for name in first)


def test_a_killed_run_resumes_to_the_same_losses(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=3, checkpoint_every_steps=2, captions="random")])
    data = {"finetune": stage_data(images=18)}  # 3 steps per epoch: 8, 8 and 2 images
    uninterrupted = Recorder()
    train_run(config, data, tmp_path / "a", cider_scorer, [uninterrupted], progress=False)
    killed = Recorder(stop_at_step=6)  # dies during step 6; the checkpoint of step 4 survives
    with pytest.raises(KeyboardInterrupt):
        train_run(config, data, tmp_path / "b", cider_scorer, [killed], progress=False)
    resumed = Recorder()
    train_run(config, data, tmp_path / "b", cider_scorer, [resumed], progress=False)
    assert [step for step, _ in resumed.steps] == list(range(5, 10))
    expected = {step: metrics for step, metrics in uninterrupted.steps}
    for step, metrics in resumed.steps:
        assert metrics["loss"] == expected[step]["loss"] and metrics["lr"] == expected[step]["lr"]
    assert [m["val_CIDEr"] for _, m in resumed.epochs] == [m["val_CIDEr"] for _, m in uninterrupted.epochs[1:]]
    final_a = load_file(tmp_path / "a" / "finetune" / "final" / WEIGHTS_FILE)
    final_b = load_file(tmp_path / "b" / "finetune" / "final" / WEIGHTS_FILE)
    for key in final_a:
        assert torch.equal(final_a[key], final_b[key]), key


class StopFromAnotherThread(Recorder):
    """Asks for a stop from another thread (as a Ctrl-C handler would) once `step` is done."""

    def __init__(self, step: int):
        super().__init__()
        self.stop_after = step

    def on_step(self, step, metrics):
        super().on_step(step, metrics)
        if step == self.stop_after:
            asker = threading.Thread(target=request_stop)
            asker.start()
            asker.join()


def test_a_requested_stop_keeps_that_step_and_a_rerun_ends_as_an_uninterrupted_run(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=2, captions="random")])
    data = {"finetune": stage_data(images=18)}  # 3 steps per epoch
    uninterrupted = Recorder()
    train_run(config, data, tmp_path / "a", cider_scorer, [uninterrupted], progress=False)
    expected = {step: metrics["loss"] for step, metrics in uninterrupted.steps}
    final_a = load_file(tmp_path / "a" / "finetune" / "final" / WEIGHTS_FILE)
    for stop_after in (2, 3):  # within an epoch, and at its end (after validation)
        stopped, folder = StopFromAnotherThread(stop_after), tmp_path / f"stopped-{stop_after}"
        with pytest.raises(TrainingInterrupted) as interruption:
            train_run(config, data, folder, cider_scorer, [stopped], progress=False)
        assert interruption.value.step == stop_after and isinstance(interruption.value, KeyboardInterrupt)
        assert [step for step, _ in stopped.steps] == list(range(1, stop_after + 1)) and not STOP.is_set()
        assert StageFolder(folder / "finetune").resumable_step() == stop_after
        resumed = Recorder()
        train_run(config, data, folder, cider_scorer, [resumed], progress=False)
        assert {step: metrics["loss"] for step, metrics in resumed.steps} == {
            step: loss for step, loss in expected.items() if step > stop_after}
        final_b = load_file(folder / "finetune" / "final" / WEIGHTS_FILE)
        assert all(torch.equal(final_a[key], final_b[key]) for key in final_a)
    train_run(config, data, tmp_path / "at-the-end", cider_scorer, [StopFromAnotherThread(6)], progress=False)
    assert not STOP.is_set()  # asked during the last step: the run ends as usual, and a later run is not stopped


class PoisonedFeatures(dict):
    """Visual tokens that turn to NaN after a number of reads."""

    def __init__(self, features, good_reads):
        super().__init__(features)
        self.reads_left = good_reads

    def __getitem__(self, key):
        self.reads_left -= 1
        value = super().__getitem__(key)
        return value if self.reads_left >= 0 else np.full_like(value, np.nan)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=3, checkpoint_every_steps=1, val_split=None)])
    data = stage_data()
    data.features = PoisonedFeatures(data.features, good_reads=4 * 4)  # four good steps of 8 captions, 4 images
    with pytest.raises(NonFiniteLoss, match=r"loss became nan at step 5 .*last"):
        train_run(config, {"finetune": data}, tmp_path, cider_scorer, progress=False)
    state = json.loads((tmp_path / "finetune" / "last" / "trainer_state.json").read_text())
    assert state["trainer"]["step"] == 4
    weights = load_file(tmp_path / "finetune" / "last" / WEIGHTS_FILE)
    assert all(torch.isfinite(tensor).all() for tensor in weights.values())
    assert not (tmp_path / "finetune" / "final").exists()


def test_fine_tuning_starts_from_the_pretrained_modules(standin_backbones, tmp_path):
    pretrain = stage_dict(name="pretrain", dataset="vg", train_split="pretrain", val_split=None, epochs=1)
    config = run_config(standin_backbones, [pretrain, stage_dict(epochs=1, learning_rate=1e-12)])
    recorder = Recorder()
    data = {"pretrain": stage_data(seed=3), "finetune": stage_data()}
    results = train_run(config, data, tmp_path, cider_scorer, [recorder], progress=False)
    assert recorder.stages == ["pretrain", "finetune"]
    pretrained = load_file(results[0].final_dir / WEIGHTS_FILE)
    finetuned = load_file(results[1].final_dir / WEIGHTS_FILE)
    assert any(torch.count_nonzero(tensor) for tensor in pretrained.values())
    for key in pretrained:  # a negligible learning rate: fine-tuning ends where pre-training did
        assert_close(finetuned[key], pretrained[key], rtol=1e-6, atol=1e-6)
    rerun = train_run(config, data, tmp_path, cider_scorer, progress=False)  # both stages done: nothing trains
    assert [result.steps for result in rerun] == [-1, -1]


def test_init_from_loads_an_external_module_checkpoint(standin_backbones, tmp_path):
    first = run_config(standin_backbones, [stage_dict(epochs=1, val_split=None)])
    [result] = train_run(first, {"finetune": stage_data()}, tmp_path / "a", cider_scorer, progress=False)
    second = run_config(standin_backbones, [stage_dict(epochs=1, val_split=None, learning_rate=1e-12,
                                                       init_from=str(result.final_dir))])
    [again] = train_run(second, {"finetune": stage_data()}, tmp_path / "b", cider_scorer, progress=False)
    start, end = load_file(result.final_dir / WEIGHTS_FILE), load_file(again.final_dir / WEIGHTS_FILE)
    for key in start:
        assert_close(end[key], start[key], rtol=1e-6, atol=1e-6)


def test_missing_stage_data_is_refused(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict()])
    with pytest.raises(ValueError, match="finetune"):
        train_run(config, {}, tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_bf16_step_on_cuda_lowers_the_loss(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=3, precision="bf16", val_split=None)])
    recorder = Recorder()
    train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [recorder], device="cuda", progress=False)
    losses = [metrics["loss"] for _, metrics in recorder.steps]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])


@pytest.mark.filterwarnings("ignore::UserWarning")  # CUDA autocast built on a CPU-only machine
def test_autocast_is_bf16_on_cuda_only(monkeypatch):
    from ituning.precision import autocast

    assert isinstance(autocast(torch.device("cpu"), "bf16"), type(autocast(torch.device("cpu"), "auto")))
    assert not isinstance(autocast(torch.device("cpu"), "bf16"), torch.autocast)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # auto means bf16 on a CUDA device that has it
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True)
    assert isinstance(autocast(torch.device("cuda"), "auto"), torch.autocast)
    assert not isinstance(autocast(torch.device("cuda"), "fp32"), torch.autocast)


def test_a_kill_during_the_checkpoint_swap_resumes_from_the_previous_one(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=2, val_split=None)])
    killed = Recorder(stop_at_step=5)  # 3 steps per epoch: the epoch-1 checkpoint (step 3) exists
    with pytest.raises(KeyboardInterrupt):
        train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [killed], progress=False)
    stage_dir = tmp_path / "finetune"
    (stage_dir / "last").rename(stage_dir / "last.previous")  # as if killed between the two renames
    resumed = Recorder()
    train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [resumed], progress=False)
    assert [step for step, _ in resumed.steps] == [4, 5, 6]
    assert (stage_dir / "last").is_dir() and not (stage_dir / "last.previous").exists()


def test_a_run_killed_before_removing_the_previous_checkpoint_resumes_and_checkpoints_again(standin_backbones,
                                                                                            tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=2, val_split=None, checkpoint_every_steps=1)])
    uninterrupted = Recorder()
    train_run(config, {"finetune": stage_data()}, tmp_path / "a", cider_scorer, [uninterrupted], progress=False)
    killed = Recorder(stop_at_step=3)  # checkpoints of steps 1 and 2 written
    with pytest.raises(KeyboardInterrupt):
        train_run(config, {"finetune": stage_data()}, tmp_path / "b", cider_scorer, [killed], progress=False)
    stage_dir = tmp_path / "b" / "finetune"
    shutil.copytree(stage_dir / "last", stage_dir / "last.previous")  # the new `last` in, the old one not yet gone
    resumed = Recorder()
    train_run(config, {"finetune": stage_data()}, tmp_path / "b", cider_scorer, [resumed], progress=False)
    assert [(step, metrics["loss"]) for step, metrics in resumed.steps] == [
        (step, metrics["loss"]) for step, metrics in uninterrupted.steps[2:]]
    assert sorted(path.name for path in stage_dir.iterdir()) == ["final", "last"]


def test_a_final_checkpoint_without_its_metrics_is_not_finished_and_is_written_again(standin_backbones, tmp_path):
    config = run_config(standin_backbones, [stage_dict(epochs=1, val_split=None)])
    train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, progress=False)
    final = tmp_path / "finetune" / "final"
    written = {path.name: path.read_bytes() for path in final.iterdir()}
    (final / "metrics.json").unlink()  # killed after the weights, before the metrics
    rerun = Recorder()
    [result] = train_run(config, {"finetune": stage_data()}, tmp_path, cider_scorer, [rerun], progress=False)
    assert rerun.steps == [] and result.final_dir == final  # nothing trains again: the last checkpoint is the end
    assert {path.name: path.read_bytes() for path in final.iterdir()} == written
