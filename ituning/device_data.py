"""Training data held on the device: a split's visual tokens and caption ids loaded once per run.

Streaming reads every caption's visual tokens from HDF5 and collates micro-batches on the CPU, at
each step of each epoch. When the split's tokens fit in the device's memory (COCO's Karpathy train,
113,287 x 197 x 768 in float16, is 33.5 GB: an H200 holds it with room to spare), they are loaded
once, shard by shard, with every caption's token ids; a micro-batch is then two gathers on the
device, built by the same rules (`ituning.data.micro_batch`). Its tensors equal those of
`ituning.data.collate` exactly, so training is the same either way.

`data_on_device` in a stage's config: true holds the data on the training device (the CPU's memory
on a CPU), false streams, auto holds it on a CUDA device when it takes at most FREE_MEMORY_SHARE of
the free memory (the rest is for the model's activations) and streams otherwise. Before the held
data take over, the trainer checks that their first micro-batch equals the one collated on the host
(`batch_difference`, ituning/fast_paths.py), and streams if not.
"""

from collections.abc import Callable, Mapping

import numpy as np
import torch

from ituning.data import CaptionBatch, caption_token_rows, images_with_captions, micro_batch, padded_rows
from ituning.fast_paths import DATA_ON_DEVICE
from ituning.progress import Progress

FREE_MEMORY_SHARE = 0.5
LOAD_BLOCK = 1024  # images stacked per copy when the features are not in shards


class DataDoesNotFit(RuntimeError):
    """`data_on_device: true` asked for more memory than the device has free."""


def visual_bytes(features: Mapping, image_ids: list[str]) -> int:
    """Bytes of every image's visual tokens, in the dtype they are stored in."""
    return len(image_ids) * np.asarray(features[image_ids[0]]).nbytes if image_ids else 0


def free_bytes(device: torch.device) -> int | None:
    """Free memory of a CUDA device; None elsewhere (host memory is not judged here)."""
    if device.type != "cuda":
        return None
    return torch.cuda.mem_get_info(device)[0]


def holds_on_device(setting: bool | str, device: torch.device, needed: Callable[[], int]) -> bool:
    """Whether a split whose visual tokens take needed() bytes is held on `device` (needed() is
    only asked where the answer depends on it)."""
    free = free_bytes(device)
    if setting is False or (setting == "auto" and DATA_ON_DEVICE.fell_back):
        return False
    if setting == "auto" and free is None:
        return DATA_ON_DEVICE.available(False)  # off the GPU auto streams (a test may inject a fault)
    if setting is True:
        if free is not None and (size := needed()) > free:
            raise DataDoesNotFit(
                f"data_on_device: true, but the split's visual tokens take {size / 2**30:.1f} GiB and "
                f"{device} has {free / 2**30:.1f} GiB free; set data_on_device: auto (streams what does not "
                f"fit) or false")
        return True
    return needed() <= FREE_MEMORY_SHARE * free


def batch_difference(held: tuple, streamed: tuple) -> str:
    """difference((data, batch gathered on the device), (None, batch collated on the host)): "" when
    every tensor of the two micro-batches is equal (`collate`'s promise: no tolerance)."""
    (_, gathered), (_, collated) = held, streamed
    for name in ("input_ids", "labels", "attention_mask", "visual", "image_index"):
        mine, theirs = getattr(gathered, name), getattr(collated, name)
        if (mine is None) != (theirs is None):
            return f"{name}: one micro-batch has it, the other not"
        if mine is not None and not torch.equal(mine.cpu(), theirs.cpu()):
            return f"{name} of the first micro-batch differs from the one collated on the host"
    return ""


class DeviceCaptionData:
    """A split's visual tokens (I, N, d_v) and padded caption ids (C, L) on one device; `collate`
    gathers a micro-batch there."""

    def __init__(self, captions: Mapping[str, list[str]], features: Mapping, tokenizer, max_tokens: int,
                 device: torch.device, share_visual: bool = True, progress: bool = True):
        image_ids = images_with_captions(captions)
        self.device, self.share_visual = device, share_visual
        self.image_row = {image_id: row for row, image_id in enumerate(image_ids)}
        self.visual = load_visual_tokens(features, self.image_row, device, progress)  # (I, N, d_v)
        texts = [text for image_id in image_ids for text in captions[image_id]]
        counts = [len(captions[image_id]) for image_id in image_ids]
        self.first_caption = dict(zip(image_ids, np.cumsum([0, *counts[:-1]]).tolist()))
        rows = caption_token_rows(texts, tokenizer, max_tokens)
        self.lengths = [len(row) for row in rows]
        input_ids, _ = padded_rows(rows, tokenizer.eos_token_id)
        self.token_ids = input_ids.to(device)  # (C, L), padded with EOS as collate pads
        self.token_lengths = torch.tensor(self.lengths, device=device)  # (C,)

    def collate(self, samples: list[tuple[str, int]]) -> CaptionBatch:
        """The micro-batch of (image_id, caption index) samples, as `ituning.data.collate` makes it:
        the same rules (`ituning.data.micro_batch`), the tensors gathered on the device."""
        return micro_batch(samples, self.token_rows, self.visual_rows, self.share_visual)

    def token_rows(self, samples: list[tuple[str, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        rows = [self.first_caption[image_id] + index for image_id, index in samples]
        length = max(self.lengths[row] for row in rows)  # known on the host: no wait for the device
        caption_rows = self.on_device(rows)
        return self.token_ids[caption_rows, :length], self.token_lengths[caption_rows]  # (B, T), (B,)

    def visual_rows(self, image_ids: list[str]) -> torch.Tensor:
        return self.visual[self.on_device([self.image_row[image_id] for image_id in image_ids])]  # (B, N, d_v)

    def on_device(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long).to(self.device, non_blocking=True)


def load_visual_tokens(features: Mapping, image_row: dict[str, int], device: torch.device,
                       progress: bool = True) -> torch.Tensor:
    """Every image's visual tokens in one tensor on `device`, row image_row[image_id]; read shard by
    shard from a feature cache (its reader's `shard_blocks`), else LOAD_BLOCK images at a time."""
    image_ids = list(image_row)
    first = torch.from_numpy(np.asarray(features[image_ids[0]]))
    visual = torch.empty((len(image_ids), *first.shape), dtype=first.dtype, device=device)  # (I, N, d_v)
    loaded = set()
    with Progress(len(image_ids), f"visual tokens to {device}", "images", enabled=progress) as bar:
        for block_ids, tokens in feature_blocks(features, image_ids):
            wanted = [index for index, image_id in enumerate(block_ids) if image_id in image_row]
            if not wanted:
                continue
            rows = torch.tensor([image_row[block_ids[index]] for index in wanted], device=device)
            visual[rows] = torch.from_numpy(np.ascontiguousarray(tokens[wanted])).to(device)
            loaded.update(block_ids[index] for index in wanted)
            bar.update(len(wanted))
    missing = [image_id for image_id in image_ids if image_id not in loaded]
    if missing:
        raise KeyError(f"no visual tokens for {len(missing)} image(s) with captions, e.g. {missing[:3]}")
    return visual


def feature_blocks(features: Mapping, image_ids: list[str]):
    """(image ids, tokens) blocks covering at least `image_ids`."""
    if hasattr(features, "shard_blocks"):
        yield from features.shard_blocks()
        return
    for start in range(0, len(image_ids), LOAD_BLOCK):
        block = image_ids[start : start + LOAD_BLOCK]
        yield block, np.stack([np.asarray(features[image_id]) for image_id in block])
