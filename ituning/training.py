"""Training the I-Tuning modules on cached visual tokens (the paper's Section 3, "Training Objective").

The objective is the autoregressive language-model loss on caption tokens (EOS appended, padding
masked) given the image's visual tokens: L = -Σ_t log P(x_t | x_<t, V). Only the modules train
(AdamW over the parameters with requires_grad); the backbones stay frozen and in eval mode, so
GPT-2's dropout is off and a step is a deterministic function of the data and the weights.

A step averages the loss over every caption token of the whole effective batch (4,096 captions in
the paper), accumulated over micro-batches, so the gradient does not depend on how the batch is
split: into micro-batches, or across the processes of a torchrun launch (DistributedDataParallel,
see ituning/distributed.py). Within a micro-batch, each image's visual keys and values are computed
once and shared by its captions (`share_visual`, on by default; off recomputes them per caption,
the same loss and gradients at more cost). The learning rate warms up linearly, then decays along
a cosine to zero. Stages run in order (VG pre-training, then COCO or Flickr30k fine-tuning), each
starting from the modules the previous stage ended with. Progress goes to plain callbacks: any
objects with some of `on_step(step, metrics)`, `on_epoch(epoch, metrics)`, `on_checkpoint(path)`
between stages, `on_stage(name, config)`, and once a stage knows how it runs, `on_plan(name,
settings)` (the micro-batch `auto` chose, whether the data are on the device and the step compiled).

Read top to bottom: `train_run` runs each stage's `StageTrainer.run` (resume, epochs, `final/`),
`run_epoch` (steps, checkpoints), `train_step` (micro-batches, one optimizer step) and `end_epoch`
(validation, `best/`). A checkpoint is `TrainingState.save(dir)` / `.restore(dir)`
(ituning/training_state.py); `request_stop()` ends a run early, resumably.
"""

import json
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property, partial
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ituning.backbones import BackboneSpec, load_language_model, vision_width
from ituning.captioner import resolve_device
from ituning.checkpoint import load_weights_into, read_provenance
from ituning.config import RunConfig, StageConfig, config_to_dict
from ituning.data import (CaptionBatch, MicroBatches, epoch_samples, images_with_captions, micro_batch_chunks,
                          micro_batch_count, micro_batch_loader, samples_per_epoch)
from ituning.decoding import DecodingConfig
from ituning.device_data import DeviceCaptionData, batch_difference, holds_on_device, visual_bytes
from ituning.distributed import (barrier, data_parallel, gradient_sync, is_main_process, join_from_environment,
                                 process_device, shard, summed, unwrapped, world)
from ituning.evaluation import score_captions
from ituning.fast_paths import COMPILE, DATA_ON_DEVICE, ON
from ituning.micro_batch import resolve_micro_batch, worst_micro_batch
from ituning.model import ITuningCaptioner, trainable_parameters
from ituning.precision import autocast
from ituning.progress import Progress
from ituning.provenance import Provenance, TrainingSplit, is_standin_backbone
from ituning.schedule import warmup_cosine
from ituning.stopping import STOP, TrainingInterrupted, counted_as_running, stop_requested
from ituning.training_state import Position, StageFolder, TrainingState, read_metrics
from ituning.validation import Scorer, evaluate_captions

class NonFiniteLoss(RuntimeError):
    """The loss (or the gradient norm) became NaN or infinite; training stopped."""


@dataclass
class StageData:
    """What a stage reads: visual tokens by image id (a FeatureReader or a dict) and captions."""

    features: Mapping  # image_id -> array (N, d_v)
    captions: dict[str, list[str]]
    val_features: Mapping | None = None
    val_captions: dict[str, list[str]] | None = None
    splits: tuple[TrainingSplit, ...] = ()  # what the two are, for the checkpoints' provenance


@dataclass
class StageResult:
    name: str
    steps: int
    final_dir: Path
    best_dir: Path | None
    best_cider: float | None
    last_loss: float | None
    history: list[dict]


def caption_loss_sum(model: ITuningCaptioner, batch: CaptionBatch) -> torch.Tensor:
    """Σ over the batch's caption tokens of -log P(token | prefix, image)."""
    dtype = next(model.parameters()).dtype  # on the device when the batch is: cached tokens travel as float16
    logits = model(batch.input_ids, visual=batch.visual.to(dtype), image_index=batch.image_index,
                   image_groups=batch.image_groups, attention_mask=batch.attention_mask).logits
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), batch.labels[:, 1:].flatten(), reduction="sum"
    )  # position t predicts token t + 1


def training_loss(setting: bool | str, device: torch.device) -> Callable:
    """caption_loss_sum, compiled by torch.compile when `setting` says so (auto: on CUDA only, where
    fewer kernel launches pay for the compile time, and not after the compiled loss fell back in this
    process). Shapes are dynamic from the start: caption lengths and images per micro-batch change
    from one micro-batch to the next. The trainer checks the compiled loss on its first micro-batch."""
    off_here = COMPILE.fell_back or not COMPILE.available(device.type == "cuda")
    plain = setting is False or (setting == "auto" and off_here)
    return caption_loss_sum if plain else torch.compile(caption_loss_sum, dynamic=True)


# How close the compiled loss and module gradients must come to the eager ones: relative to the
# eager values' size, float32 rounding in float32, a few bf16/fp16 steps (2^-8 = 0.4 %) under autocast.
COMPILE_TOLERANCE = {"float32": 1e-4, "reduced": 2e-2}


def gradients_difference(tolerance: float) -> Callable:
    """difference((loss, gradients) compiled, (loss, gradients) eager): "" when close."""

    def difference(compiled: tuple, eager: tuple) -> str:
        (compiled_loss, compiled_grads), (eager_loss, eager_grads) = compiled, eager
        if abs(compiled_loss - eager_loss) > tolerance * max(1.0, abs(eager_loss)):
            return f"loss {compiled_loss:.6g} against {eager_loss:.6g}"
        for index, (fast, plain) in enumerate(zip(compiled_grads, eager_grads)):
            gap = float((fast.float() - plain.float()).norm())
            if not math.isfinite(gap) or gap > tolerance * max(float(plain.float().norm()), 1e-12):
                return f"module gradient {index} off by {gap:.3g} (norm {float(plain.float().norm()):.3g})"
        return ""

    return difference


class StageTrainer:
    """One stage: epochs of accumulated steps, checkpoints, validation, resume.

    `model` may be the captioner in DistributedDataParallel (`data_parallel`): training forwards go
    through it, checkpoints and validation use the captioner inside."""

    def __init__(self, model: nn.Module, tokenizer, backbones: BackboneSpec, stage: StageConfig,
                 data: StageData, stage_dir: Path, score: Scorer | None = None, callbacks=(), progress=True,
                 provenance: Provenance | None = None, workspace: Path | None = None):
        self.replica, self.model = model, unwrapped(model)
        self.tokenizer, self.backbones = tokenizer, backbones
        self.stage, self.data, self.folder = stage, data, StageFolder(Path(stage_dir))
        self.score = score or partial(score_captions, metrics=stage.val_metrics)
        self.callbacks, self.progress = list(callbacks), progress
        self.device = next(self.model.parameters()).device
        self.optimizer = torch.optim.AdamW(
            trainable_parameters(self.model), lr=stage.learning_rate, weight_decay=stage.weight_decay
        )
        self.steps_per_epoch = math.ceil(samples_per_epoch(data.captions, stage.captions) / stage.batch_size)
        total = self.steps_per_epoch * stage.epochs
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, warmup_cosine(total, round(stage.warmup_fraction * total))
        )
        # what a checkpoint saves and restores; checkpoints name the backbones inside `workspace` relative to it
        self.state = TrainingState(self.model, backbones, self.optimizer, self.scheduler, provenance, workspace)
        self.loss_sum = training_loss(stage.compile, self.device)

    @cached_property
    def device_data(self) -> DeviceCaptionData | None:
        """The split held on the device, when the stage's `data_on_device` says so (see
        ituning/device_data.py) and its first micro-batch equals the one collated on the host."""
        needed = lambda: visual_bytes(self.data.features, images_with_captions(self.data.captions))  # noqa: E731
        if not holds_on_device(self.stage.data_on_device, self.device, needed):
            return None
        first = self.first_samples()

        def held() -> tuple[DeviceCaptionData, CaptionBatch]:
            data = DeviceCaptionData(self.data.captions, self.data.features, self.tokenizer,
                                     self.stage.max_caption_tokens, self.device, self.stage.share_visual,
                                     self.progress and is_main_process())
            return data, data.collate(first)

        used, (data, _) = DATA_ON_DEVICE.first_use(self.stage.data_on_device, held,
                                                    lambda: (None, self.host_collate(first)), batch_difference)
        return data if used else None

    def first_samples(self) -> list[tuple[str, int]]:
        """A few captions of the first step: what the fast paths' first-use checks run on."""
        samples = epoch_samples(self.data.captions, self.stage.captions, self.stage.seed, 0)
        return samples[: min(8, self.stage.batch_size)]

    def host_collate(self, samples: list[tuple[str, int]]) -> CaptionBatch:
        """One micro-batch collated on the host from the features, as streaming does."""
        return MicroBatches([samples], len(samples), self.data.captions, self.data.features, self.tokenizer,
                            self.stage.max_caption_tokens, self.stage.share_visual)[0]

    def collate_on_device(self, samples: list[tuple[str, int]]) -> CaptionBatch:
        """A micro-batch gathered on the device; if that fails later in the run (auto), the data are
        let go and this and every later micro-batch are collated on the host instead."""
        if self.device_data is not None:
            try:
                return self.device_data.collate(samples)
            except Exception as error:  # noqa: BLE001 (any failure: the host path continues from here)
                DATA_ON_DEVICE.failed_later(self.stage.data_on_device, error)
                self.__dict__["device_data"] = None
        return self.host_collate(samples).to(self.device)

    @cached_property
    def micro_batch_size(self) -> int:
        """The stage's micro-batch, measured against the free memory for `auto` (ituning/micro_batch.py),
        after the data are on the device when they go there."""
        _ = self.device_data
        return resolve_micro_batch(self.stage.micro_batch_size, self.stage.batch_size, self.device, self.probe)

    def plan(self) -> dict:
        """How this stage runs here, where its config leaves the choice to the machine."""
        return {"micro_batch_size": self.micro_batch_size, "data_on_device": self.device_data is not None,
                "compiled": self.loss_sum is not caption_loss_sum}

    def check_compiled_loss(self, batch: CaptionBatch | None = None) -> None:
        """Before the compiled loss takes over: its loss and module gradients on `batch` (by default a
        few captions of the first step) against the eager ones (ituning/fast_paths.py); through the
        captioner itself, so no gradient is all-reduced."""
        if self.loss_sum is caption_loss_sum or COMPILE.outcome == ON:
            return
        batch = batch if batch is not None else self.host_collate(self.first_samples())
        reduced = self.device.type == "cuda" and self.stage.precision not in ("float32", "fp32")
        tolerance = COMPILE_TOLERANCE["reduced" if reduced else "float32"]
        used, _ = COMPILE.first_use(self.stage.compile, lambda: self.loss_and_gradients(self.loss_sum, batch),
                                    lambda: self.loss_and_gradients(caption_loss_sum, batch),
                                    gradients_difference(tolerance))
        if not used:
            self.loss_sum = caption_loss_sum

    def loss_and_gradients(self, loss_sum: Callable, batch: CaptionBatch) -> tuple[float, list[torch.Tensor]]:
        """(loss, module gradients) of one micro-batch; the gradients are cleared again."""
        with autocast(self.device, self.stage.precision):
            loss = loss_sum(self.model, batch.to(self.device))
        loss.backward()
        gradients = [parameter.grad.detach().clone() for parameter in trainable_parameters(self.model)
                     if parameter.grad is not None]
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), gradients

    def probe(self, size: int) -> None:
        """A forward and backward pass on the worst micro-batch of `size` captions; no weight changes."""
        sample = np.asarray(next(iter(self.data.features.values())))
        batch = worst_micro_batch(size, self.stage.max_caption_tokens + 1, sample.shape,
                                  torch.from_numpy(sample).dtype, self.device)
        with autocast(self.device, self.stage.precision):
            self.loss_sum(self.model, batch).backward()
        self.optimizer.zero_grad(set_to_none=True)

    def notify(self, event: str, *args) -> None:
        if not is_main_process():  # one report per step, not one per process
            return
        for callback in self.callbacks:
            handler = getattr(callback, event, None)
            if handler is not None:
                handler(*args)

    @property
    def position(self) -> Position:
        return self.state.position

    def start(self, resume: bool = True) -> None:
        """Continue from the last checkpoint if there is one, else from `init_from` if given."""
        checkpoint = self.folder.resumable() if resume else None
        if checkpoint is not None:
            self.state.restore(checkpoint)
            return
        if self.stage.init_from:
            self.state.load_modules(self.stage.init_from)
        torch.manual_seed(self.stage.seed)

    def run(self, resume: bool = True) -> StageResult:
        with counted_as_running():
            return self._run(resume)

    def _run(self, resume: bool) -> StageResult:
        if self.steps_per_epoch == 0:
            raise ValueError(f"stage {self.stage.name}: no training captions")
        self.start(resume)
        self.model.eval()  # frozen backbones: no dropout; the modules have none
        self.check_compiled_loss()
        self.notify("on_plan", self.stage.name, self.plan())
        total = self.steps_per_epoch * self.stage.epochs
        show = self.progress and is_main_process()
        with Progress(total, self.stage.name, "steps", initial=self.position.step, enabled=show) as bar:
            while self.position.epoch < self.stage.epochs:
                self.run_epoch(bar)
        if is_main_process():
            self.state.save_modules(self.folder.final, self.position.history)
        barrier()  # a next stage in another train_run may load `final` at once
        best = self.folder.best if self.folder.best.exists() else None
        return StageResult(self.stage.name, self.position.step, self.folder.final, best, self.position.best_cider,
                           self.position.last_loss, self.position.history)

    def run_epoch(self, bar) -> None:
        position = self.position
        samples = epoch_samples(self.data.captions, self.stage.captions, self.stage.seed, position.epoch)
        size, every = self.stage.batch_size, self.stage.checkpoint_every_steps
        steps = [samples[k * size : (k + 1) * size] for k in range(position.step_in_epoch, self.steps_per_epoch)]
        shares = [shard(step) for step in steps]  # under torchrun: this process's share of each step
        loaded = iter(self.loader(shares))
        for step, share in zip(steps, shares):
            batches = [next(loaded) for _ in range(micro_batch_count(share, self.micro_batch_size))]
            metrics = self.train_step(step, batches)
            position.step += 1
            position.step_in_epoch += 1
            position.epoch_loss_sum += metrics["loss"]
            position.last_loss = metrics["loss"]
            bar.update(1, loss=f"{metrics['loss']:.3f}")
            self.notify("on_step", position.step, metrics)
            if position.step_in_epoch < self.steps_per_epoch:  # the epoch's last step: end_epoch saves
                if stop_requested():
                    self.save()
                    self.interrupt()
                if every and position.step % every == 0:
                    self.save()
        self.end_epoch()
        if stop_requested() and position.epoch < self.stage.epochs:
            self.interrupt()  # end_epoch saved this step

    def interrupt(self) -> NoReturn:  # as `request_stop` asked, the checkpoint of this step written
        barrier()  # every process stops here, after rank 0 wrote the checkpoint
        STOP.clear()
        raise TrainingInterrupted(self.position.step, self.folder.last)

    def loader(self, shares: list[list[tuple[str, int]]]):
        if self.device_data is not None:
            return map(self.collate_on_device, micro_batch_chunks(shares, self.micro_batch_size))
        workers = self.stage.data_workers
        if workers is None:
            workers = 4 if self.device.type == "cuda" else 0
        return micro_batch_loader(self.micro_batch_set(shares), workers, pin_memory=self.device.type == "cuda")

    def micro_batch_set(self, steps: list[list[tuple[str, int]]]) -> MicroBatches:
        return MicroBatches(steps, self.micro_batch_size, self.data.captions, self.data.features,
                            self.tokenizer, self.stage.max_caption_tokens, self.stage.share_visual)

    def train_step(self, samples: list[tuple[str, int]], batches: list[CaptionBatch] | None = None) -> dict:
        """One optimizer step on `samples`; `batches`, when given, are this process's share of them,
        already collated."""
        started = time.perf_counter()
        if batches is None:
            batches = self.micro_batches(shard(samples))
        tokens, processes = summed(sum(batch.target_tokens for batch in batches)), world()[1]
        # DDP averages gradients over the processes, so each backpropagates its token sum / all tokens
        # × processes: the average is (Σ over every token) / all tokens, one process's gradient on the batch.
        share = processes if batches else 0
        if not batches:  # fewer captions than processes: join the all-reduce with a zero gradient
            batches = self.micro_batches(samples[:1])
        loss_total = torch.zeros((), device=self.device)
        for index, batch in enumerate(batches):
            with gradient_sync(self.replica, now=index == len(batches) - 1):
                loss_total += self.backward(batch, tokens, share)
        self.check_finite(loss_total, "loss")  # once per step: reading a value waits for the device
        loss_total = summed(loss_total.item()) / processes
        norm = torch.nn.utils.clip_grad_norm_(trainable_parameters(self.model), self.stage.max_grad_norm)
        self.check_finite(norm, "gradient norm")
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        seconds = time.perf_counter() - started
        return {"loss": loss_total, "lr": learning_rate, "grad_norm": float(norm),
                "captions_per_s": len(samples) / seconds, "epoch": float(self.position.epoch)}

    def micro_batches(self, samples: list[tuple[str, int]]) -> list[CaptionBatch]:
        """One step's micro-batches, collated here and now."""
        if self.device_data is not None:
            return list(self.loader([samples]))
        batches = self.micro_batch_set([samples])
        return [batches[index] for index in range(len(batches))]

    def backward(self, batch: CaptionBatch, tokens: float, share: int) -> torch.Tensor:
        batch = batch.to(self.device)
        with autocast(self.device, self.stage.precision):
            try:
                loss = self.loss_sum(self.replica, batch) / tokens * share
            except Exception as error:  # noqa: BLE001 (e.g. a recompilation for a new shape fails)
                if self.loss_sum is caption_loss_sum:
                    raise
                COMPILE.failed_later(self.stage.compile, error)  # nothing accumulated yet: eager continues
                self.loss_sum = caption_loss_sum
                loss = self.loss_sum(self.replica, batch) / tokens * share
        loss.backward()
        return loss.detach()

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        if not torch.isfinite(value).all():
            kept = self.folder.resumable()
            raise NonFiniteLoss(
                f"stage {self.stage.name}: the {what} became {value.item()} at step {self.position.step + 1} "
                f"(epoch {self.position.epoch}); stopped. Last good checkpoint: "
                f"{kept if kept else 'none written yet'}"
            )

    def end_epoch(self) -> None:
        position = self.position
        epoch = position.epoch
        metrics = {"train_loss": position.epoch_loss_sum / max(1, position.step_in_epoch)}
        if self.stage.val_split and self.data.val_captions and (epoch + 1) % self.stage.validate_every_epochs == 0:
            metrics.update(self.validate())
            self.keep_if_best(metrics)
        position.history.append({"epoch": epoch, **metrics})
        position.epoch, position.step_in_epoch, position.epoch_loss_sum = epoch + 1, 0, 0.0
        self.save()
        self.notify("on_epoch", epoch, metrics)

    def validate(self) -> dict[str, float]:
        image_ids = images_with_captions(self.data.val_captions)[: self.stage.val_images]
        decoding = DecodingConfig(num_beams=self.stage.val_beams, max_length=self.stage.val_max_length)
        with autocast(self.device, self.stage.precision):
            scores = evaluate_captions(self.model, self.tokenizer, self.data.val_features,
                                       {i: self.data.val_captions[i] for i in image_ids}, self.score, decoding)
        return {f"val_{name}": value for name, value in scores.items()}

    def keep_if_best(self, metrics: dict[str, float]) -> None:
        cider, position = metrics["val_CIDEr"], self.position
        if (position.best_cider is None or cider > position.best_cider) and is_main_process():
            position.best_cider = cider
            self.notify("on_checkpoint", self.state.save_modules(self.folder.best, {"epoch": position.epoch, **metrics}))

    def save(self) -> None:
        if not is_main_process():  # every process holds the same weights; one writes them
            return
        self.notify("on_checkpoint", self.state.save(self.folder.last))


def build_model(config: RunConfig, device: str = "auto"):
    """The frozen language model with fresh modules, its tokenizer and the backbone spec."""
    device = resolve_device(config.device if device == "auto" else device)
    backbones = config.model.backbones()
    language_model, tokenizer = load_language_model(backbones.language_model, device)
    torch.manual_seed(config.stages[0].seed)  # the fresh modules' initial weights follow the config
    model = ITuningCaptioner(language_model, vision_width(backbones.vision_model), config.model.ituning())
    return model.to(device), tokenizer, backbones


def train_run(config: RunConfig, data: dict[str, StageData], out_dir: str | Path, score: Scorer | None = None,
              callbacks=(), device: str = "auto", resume: bool = True, progress: bool = True,
              whole_config: RunConfig | None = None, workspace: str | Path | None = None) -> list[StageResult]:
    """Every stage of `config` in order, each on `data[stage.name]`, under out_dir/<stage>/.

    A stage whose final checkpoint exists is not trained again (its modules are loaded), a stage
    with a `last` checkpoint continues from it; what a kill left of a checkpoint write is settled
    first. out_dir/config.json records `whole_config` (default `config`): the run's every stage,
    when `config` holds only the ones trained now. Checkpoints name the backbones inside
    `workspace` relative to it (ituning.checkpoint).
    """
    missing = [stage.name for stage in config.stages if stage.name not in data]
    if missing:
        raise ValueError(f"no data given for stage(s) {missing}")
    device = process_device(resolve_device(config.device if device == "auto" else device))
    join_from_environment(torch.device(device))
    model, tokenizer, backbones = build_model(config, device)
    replica = data_parallel(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config_to_dict(whole_config or config), indent=1))
    if is_main_process():
        for stage in config.stages:
            StageFolder(out_dir / stage.name).settle()
    barrier()  # no process reads a stage folder rank 0 is still settling
    results, provenance = [], None
    for stage in config.stages:
        folder = StageFolder(out_dir / stage.name)
        provenance = stage_provenance(config, stage, data[stage.name], provenance)
        trainer = StageTrainer(replica, tokenizer, backbones, stage, data[stage.name], folder.path, score,
                               callbacks, progress, provenance, workspace)
        trainer.notify("on_stage", stage.name, config_to_dict(stage))
        if resume and folder.finished():
            load_weights_into(model, folder.final, backbones)
            results.append(StageResult(stage.name, -1, folder.final, None, None, None, read_metrics(folder.final)))
            continue
        results.append(trainer.run(resume))
    STOP.clear()  # a stop asked for during the last step: the run has ended anyway
    return results


def stage_provenance(config: RunConfig, stage: StageConfig, data: StageData,
                     before: Provenance | None = None) -> Provenance:
    """What a stage's checkpoints record of where they come from: its splits on top of those of the
    checkpoint it starts from (`init_from`'s record, else `before`, the previous stage's), stand-in
    backbones (the config says so, or their folders do) and the config's licence."""
    backbones = config.model.backbones()
    standins = config.model.standins or any(is_standin_backbone(name) for name in
                                            (backbones.vision_model, backbones.language_model))
    earlier = read_provenance(stage.init_from) if stage.init_from else before
    return Provenance(data.splits, standins, config.license).after(earlier)
