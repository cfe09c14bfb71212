"""Caption batches for training: which captions an epoch visits, and how they become tensors.

An epoch's order is a pure function of (seed, epoch), so a resumed run only needs the epoch and
the number of steps already taken in it to continue exactly where it stopped. Micro-batches are
collated (tokenized, their visual tokens read and stacked) ahead of the step that needs them, in
DataLoader worker processes when asked for, so the accelerator does not wait on the CPU.

When an epoch visits every caption, an image's captions follow one another, so they land in the
same micro-batch (unless it ends between them); a micro-batch then reads each image's visual tokens
once and the model computes each module's keys and values once per image (`share_visual`).

The batching rules (padding, labels, grouping captions by image, cutting steps into micro-batches)
live here once: `micro_batch` builds every micro-batch, whether its tensors are read on the host
(`collate`) or gathered from data held on the device (ituning/device_data.py).
"""

import multiprocessing
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ituning.decoding import caption_prompt
from ituning.model import ImageGroups

# The modules a worker needs to unpickle its dataset (image transforms, tokenizers): several seconds of
# imports, paid once by the fork server instead of by every worker. A name that fails to import is skipped.
FORK_SERVER_PRELOAD = ("ituning.encoding", "ituning.data", "torchvision.transforms", "open_clip", "transformers")
IGNORE_INDEX = -100  # label of positions that carry no loss (the prompt and the padding)


@dataclass
class CaptionBatch:
    input_ids: torch.Tensor  # (B, T): BOS, caption tokens, EOS, then padding
    labels: torch.Tensor  # (B, T): the token at each position, IGNORE_INDEX on BOS and padding
    attention_mask: torch.Tensor  # (B, T)
    # (B_img, N, d_v) one row per distinct image, or (B, N, d_v) one per caption when image_index is
    # None; in the feature cache's dtype (float16) until on the device
    visual: torch.Tensor
    image_index: torch.Tensor | None = None  # (B,) the row of `visual` each caption shows
    image_groups: ImageGroups | None = None  # image_index's groups, built on the host (see ImageGroups.to)

    def __post_init__(self):
        if self.image_groups is None and self.image_index is not None and self.image_index.device.type == "cpu":
            self.image_groups = ImageGroups.of(self.image_index, self.visual.shape[0])

    @property
    def target_tokens(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())

    def tensors(self) -> tuple[torch.Tensor | None, ...]:
        return self.input_ids, self.labels, self.attention_mask, self.visual, self.image_index

    def to(self, device) -> "CaptionBatch":
        """On the device, dtypes unchanged: float16 visual tokens travel at half the bytes of float32."""
        groups = None if self.image_groups is None else self.image_groups.to(device)
        return CaptionBatch(*(None if tensor is None else tensor.to(device, non_blocking=True)
                              for tensor in self.tensors()), groups)

    def pin_memory(self) -> "CaptionBatch":  # called by a DataLoader with pin_memory=True
        return CaptionBatch(*(None if tensor is None else tensor.pin_memory() for tensor in self.tensors()),
                            self.image_groups)


def images_with_captions(captions: Mapping[str, list[str]]) -> list[str]:
    """The ids of the images that have captions, sorted: the images a split trains or validates on."""
    return sorted(image_id for image_id, texts in captions.items() if texts)


def samples_per_epoch(captions: Mapping[str, list[str]], mode: str) -> int:
    if mode == "all":
        return sum(len(texts) for texts in captions.values())
    return sum(1 for texts in captions.values() if texts)


def epoch_samples(captions: Mapping[str, list[str]], mode: str, seed: int, epoch: int) -> list[tuple[str, int]]:
    """(image_id, caption index) pairs in this epoch's shuffled order.

    mode "all": every caption once, the images in shuffled order and each image's captions together
    (so a micro-batch computes the image's visual keys and values once for all of them);
    mode "random": one caption per image, drawn anew each epoch.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    image_ids = images_with_captions(captions)
    if mode == "all":
        order = torch.randperm(len(image_ids), generator=generator).tolist()
        return [(image_ids[k], index) for k in order for index in range(len(captions[image_ids[k]]))]
    draws = torch.randint(0, 2**31 - 1, (len(image_ids),), generator=generator).tolist()
    pairs = [(image_id, draw % len(captions[image_id])) for image_id, draw in zip(image_ids, draws)]
    order = torch.randperm(len(pairs), generator=generator).tolist()
    return [pairs[index] for index in order]


def caption_token_rows(texts: list[str], tokenizer, max_tokens: int) -> list[list[int]]:
    """BOS + caption tokens + EOS, the caption cut so that the row holds at most max_tokens targets."""
    prompt = caption_prompt(tokenizer)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return [[*prompt, *ids[: max_tokens - 1], tokenizer.eos_token_id] for ids in encoded]


def padded_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows right-padded to the longest with pad_id (B, T), and their lengths (B,)."""
    input_ids = torch.full((len(rows), max(len(row) for row in rows)), pad_id, dtype=torch.long)
    for row_index, row in enumerate(rows):
        input_ids[row_index, : len(row)] = torch.tensor(row)
    return input_ids, torch.tensor([len(row) for row in rows])


def text_tensors(input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels and attention_mask (each (B, T)) of padded caption rows of these lengths: every
    token but the prompt and the padding is a target."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    attention_mask = (positions[None, :] < lengths[:, None]).long()  # (B, T)
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, 0] = IGNORE_INDEX  # the prompt token is given, not predicted
    return input_ids, labels, attention_mask


def pad_caption_rows(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """input_ids, labels and attention_mask (each (B, T)) of right-padded token rows."""
    return text_tensors(*padded_rows(rows, pad_id))


def micro_batch(samples: list[tuple[str, int]], token_rows: Callable, visual_rows: Callable,
                share_visual: bool = True) -> CaptionBatch:
    """The micro-batch of (image_id, caption index) samples, by the one set of batching rules, for
    data on the host and on the device alike. token_rows(samples) gives the captions' token rows
    padded with EOS to the longest (B, T) and their lengths (B,); visual_rows(image_ids) the visual
    tokens of those images, one row each, wherever the data are held. With `share_visual`, each
    distinct image's visual tokens are taken once, in order of first appearance, and every caption
    points at its image's row; otherwise every caption carries its own copy (the reference path)."""
    input_ids, labels, attention_mask = text_tensors(*token_rows(samples))
    image_ids = [image_id for image_id, _ in samples]
    if not share_visual:
        return CaptionBatch(input_ids, labels, attention_mask, visual_rows(image_ids))  # (B, N, d_v)
    distinct, image_index = first_appearances(image_ids)
    groups = ImageGroups.of(image_index, len(distinct)).to(input_ids.device)  # built on the host: no device wait
    return CaptionBatch(input_ids, labels, attention_mask, visual_rows(distinct), groups.image_index, groups)


def collate(samples, captions, features: Mapping, tokenizer, max_tokens: int,
            share_visual: bool = True) -> CaptionBatch:
    """The micro-batch of (image_id, caption index) samples, tokenized and read on the host."""

    def token_rows(chosen: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        texts = [captions[image_id][index] for image_id, index in chosen]
        return padded_rows(caption_token_rows(texts, tokenizer, max_tokens), tokenizer.eos_token_id)

    def visual_rows(image_ids: list[str]) -> torch.Tensor:
        return torch.from_numpy(np.stack([np.asarray(features[image_id]) for image_id in image_ids]))  # (B, N, d_v)

    return micro_batch(samples, token_rows, visual_rows, share_visual)


def first_appearances(keys: list) -> tuple[list, torch.Tensor]:
    """The distinct keys in order of first appearance, and for each key its place among them (B,)."""
    place = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    return list(place), torch.tensor([place[key] for key in keys], dtype=torch.long)


def micro_batch_chunks(steps: list[list], micro_batch_size: int) -> list[list]:
    """Each step cut into micro-batches of micro_batch_size samples (the last may be smaller), in order."""
    return [step[first : first + micro_batch_size] for step in steps
            for first in range(0, len(step), micro_batch_size)]


def micro_batch_count(samples: list, micro_batch_size: int) -> int:
    return -(-len(samples) // micro_batch_size)


class MicroBatches(Dataset):
    """Item k: the k-th micro-batch of a run of steps, each step cut into micro-batches in order."""

    def __init__(self, steps: list[list[tuple[str, int]]], micro_batch_size: int, captions: Mapping,
                 features: Mapping, tokenizer, max_tokens: int, share_visual: bool = True):
        self.chunks = micro_batch_chunks(steps, micro_batch_size)
        self.captions, self.features, self.tokenizer, self.max_tokens = captions, features, tokenizer, max_tokens
        self.share_visual = share_visual

    def __len__(self) -> int:
        return len(self.chunks)

    def __getitem__(self, index: int) -> CaptionBatch:
        return collate(self.chunks[index], self.captions, self.features, self.tokenizer, self.max_tokens,
                       self.share_visual)


def micro_batch_loader(batches: MicroBatches, workers: int, pin_memory: bool) -> DataLoader:
    """The micro-batches in order; with workers > 0, collated ahead in that many processes."""
    workers = usable_workers(workers)
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers, pin_memory=pin_memory,
                      prefetch_factor=4 if workers else None, multiprocessing_context=worker_start_method(workers),
                      generator=torch.Generator().manual_seed(0))  # leaves the global generator untouched


def usable_workers(workers: int) -> int:
    """A daemonic process (a Dask worker process, a multiprocessing pool worker) may not start
    children, so there the work stays in the process itself."""
    return 0 if multiprocessing.current_process().daemon else workers


def worker_start_method(workers: int) -> str | None:
    """Forking while other threads run (a flow's tasks, a writer thread) can copy a lock some thread
    holds into the worker, which then dies or hangs; the fork server starts workers from a clean
    single-threaded process instead. It imports what the workers unpickle (FORK_SERVER_PRELOAD) once,
    before its first worker, so that each worker is forked with them loaded."""
    if workers == 0 or threading.active_count() == 1:
        return None
    multiprocessing.set_forkserver_preload(list(FORK_SERVER_PRELOAD))
    return "forkserver"
