"""Images to visual tokens: the one path from image files through the frozen vision encoder.

Images are decoded by ituning.images.open_rgb (upright, 16-bit scaled, over-limit images
unreadable). One whose shorter side exceeds REDUCE_ABOVE (4) times the model's input side is decoded
at reduced size (JPEG DCT scaling, then a box reduction, to at least twice the input side) before
the preprocessing resize, so its pixels come from that reduced decode; every other image is decoded
exactly as stored.

`encode_batches` decodes and preprocesses in DataLoader worker processes (in the process itself
where that one may not have children, e.g. a Dask worker), which send uint8 images (scaling and
normalisation, the same arithmetic, happen on the device). On CUDA, JPEGs are decoded, resized and
cropped on the device instead where nvJPEG can (EncodeSettings.decode_on_device,
ituning/device_jpeg.py): the workers send those files' bytes. The encoder runs in the caller's
thread under the autocast of the compute precision (ituning/precision.py); its tokens, cast to the
output dtype, travel to the host asynchronously on CUDA, so the next batch is launched while one is
copied.
The feature cache (pipeline/features.py) and the small-corpus path (ituning/karpathy.py) encode
through it; the captioner decodes its files one batch at a time and shares the pixel and encoder
steps (`stack_pixels`, `encode_pixels`).
"""

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from itertools import groupby

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ituning.data import usable_workers, worker_start_method
from ituning.device_jpeg import RoutedFiles, collate_routed, device_jpegs, proven
from ituning.images import UnreadableImage, open_rgb
from ituning.precision import autocast

OUTPUT_DTYPES = {"float16": torch.float16, "float32": torch.float32}
TO_TENSOR_STEPS = {"ToTensor", "MaybeToTensor"}


@dataclass(frozen=True)
class EncodeSettings:
    batch_size: int = 64
    num_workers: int = 2
    device: str = "cpu"
    dtype: str = "float16"  # of the tokens handed back (and stored): a key of OUTPUT_DTYPES
    precision: str = "auto"  # compute precision (ituning/precision.py): autocast on CUDA
    queue_batches: int = 4  # encoded batches that may wait for the feature cache's writer
    decode_on_device: str = "auto"  # JPEGs decoded by nvJPEG: auto (where CUDA has it), never, always


@dataclass
class EncodedBatch:
    group: int  # a batch never spans two groups (the feature cache's shards)
    image_ids: list[str]
    errors: list[str]  # "" for an image that decoded, else why not; its row then holds a blank image's tokens
    tokens: torch.Tensor  # (B, 1 + P, width) on the host; complete once `ready` has fired (CUDA) or at once (CPU)
    ready: object = None

    def host_tokens(self) -> np.ndarray:
        """The tokens as an array, once their copy to the host is complete."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.tokens.numpy()


class ImageFiles(Dataset):
    """(group, image_id, path) -> (pixels, group, image_id, error); an unreadable file gives the
    blank image and its reason instead of stopping the run. `min_side`: the model's input side (see
    open_rgb)."""

    def __init__(self, items, transform, blank: torch.Tensor, min_side: int | None = None):
        self.items, self.transform, self.blank, self.min_side = items, transform, blank, min_side

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        group, image_id, path = self.items[index]
        try:
            return self.transform(open_rgb(path, self.min_side)), group, image_id, ""
        except UnreadableImage as error:
            return self.blank, group, image_id, str(error)


class BytePixels:
    """The PIL steps of a preprocessing transform, then the image as uint8 (3, H, W)."""

    def __init__(self, pil_steps):
        self.pil_steps = pil_steps

    def __call__(self, image) -> torch.Tensor:
        array = np.array(self.pil_steps(image), dtype=np.uint8, copy=True)  # (H, W, 3)
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()  # (3, H, W)


@dataclass(frozen=True)
class ScaleAndNormalize:
    """ToTensor's scaling and Normalize, on a uint8 batch already on the device: the same
    arithmetic, so the same pixels as the whole transform run on the CPU."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.functional import normalize

        return normalize(pixels.to(torch.float32).div(255), self.mean, self.std)


def split_preprocess(preprocess, size: tuple[int, int]):
    """(worker transform, blank image, device step). Where the transform ends in ToTensor and
    Normalize, workers send uint8 images (a quarter of the bytes between processes and to the
    GPU) and the device step finishes them; otherwise workers run all of it and the step is None."""
    from torchvision.transforms import Compose

    steps = list(getattr(preprocess, "transforms", ()))
    if len(steps) >= 2 and type(steps[-2]).__name__ in TO_TENSOR_STEPS and hasattr(steps[-1], "std"):
        finish = ScaleAndNormalize(tuple(steps[-1].mean), tuple(steps[-1].std))
        return BytePixels(Compose(steps[:-2])), torch.zeros(3, *size, dtype=torch.uint8), finish
    return preprocess, torch.zeros(3, *size), None


def image_size(encoder) -> tuple[int, int]:
    size = encoder.visual.image_size
    return (size, size) if isinstance(size, int) else tuple(size)


def input_side(encoder) -> int:
    """The side images are resized to for the encoder (the shorter one if not square)."""
    return min(image_size(encoder))


def stack_pixels(images, preprocess) -> torch.Tensor:
    """Preprocessed pixels (B, 3, H, W) of decoded images."""
    return torch.stack([preprocess(image) for image in images])


def load_pixels(paths, preprocess, min_side: int | None = None) -> torch.Tensor:
    """Preprocessed pixels (B, 3, H, W) of image files, decoded as the feature cache decodes them."""
    return stack_pixels([open_rgb(path, min_side) for path in paths], preprocess)


def encode_pixels(encoder, pixels: torch.Tensor, device, precision: str = "float32", finish=None) -> torch.Tensor:
    """The encoder's tokens (B, 1 + P, width) for a pixel batch, on `device`; `finish` is the device
    step of split_preprocess, if the pixels still need it."""
    pixels = pixels.to(device, non_blocking=True)
    with autocast(device, precision):
        pixels = finish(pixels) if finish is not None else pixels  # (B, 3, H, W) float
        return encoder(pixels)


def group_batches(groups: list, batch_size: int) -> list[list[int]]:
    """Batches of item indices, at most `batch_size` consecutive items each, never spanning two groups."""
    batches, start = [], 0
    for _, members in groupby(groups):
        size = len(list(members))
        batches += [list(range(first, min(first + batch_size, start + size)))
                    for first in range(start, start + size, batch_size)]
        start += size
    return batches


def encode_batches(encoder, items, settings: EncodeSettings) -> Iterator[EncodedBatch]:
    """The tokens of (group, image_id, path) items, one EncodedBatch per batch, in order. The loader
    is made here, before the first batch is asked for: its workers' start method depends on the
    threads running now (ituning.data.worker_start_method), not on those started meanwhile."""
    loader, finish = image_loader(encoder, items, settings)
    return _encoded(encoder, loader, finish, settings)


def image_loader(encoder, items, settings: EncodeSettings) -> tuple[Iterable, object]:
    """(batches of (pixels, groups, image_ids, errors), device step or None). Where JPEGs are
    decoded on the device, the workers send their bytes and the pixels arrive there already."""
    size = image_size(encoder)
    transform, blank, finish = split_preprocess(encoder.preprocess, size)
    files = ImageFiles(items, transform, blank, min(size))
    batches = group_batches([group for group, _, _ in items], settings.batch_size)
    jpegs = proven(device_jpegs(files, settings.device, settings.decode_on_device), batches[0] if batches else [])
    workers = usable_workers(max(0, min(settings.num_workers, len(batches) - 1)))  # one batch: decoded here
    loader = DataLoader(files if jpegs is None else RoutedFiles(files), batch_sampler=batches, num_workers=workers,
                        collate_fn=None if jpegs is None else collate_routed,
                        pin_memory=torch.device(settings.device).type == "cuda", persistent_workers=False,
                        multiprocessing_context=worker_start_method(workers))
    return (loader if jpegs is None else map(jpegs, loader)), finish


def _encoded(encoder, loader: Iterable, finish, settings: EncodeSettings) -> Iterator[EncodedBatch]:
    device, dtype = torch.device(settings.device), OUTPUT_DTYPES[settings.dtype]
    for pixels, groups, image_ids, errors in loader:
        with torch.inference_mode():
            tokens = encode_pixels(encoder, pixels, device, settings.precision, finish).to(dtype)
            host, ready = to_host(tokens)
        yield EncodedBatch(int(groups[0]), list(image_ids), list(errors), host, ready)


def to_host(tokens: torch.Tensor):
    """A host copy of the tokens; on CUDA an asynchronous copy into pinned memory plus its event,
    so the next batch is launched while this one travels."""
    if tokens.device.type != "cuda":
        return tokens, None
    host = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
    host.copy_(tokens, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return host, ready


def encoder_weights_digest(encoder) -> str:
    """sha256 over the encoder's tensors: catches a local encoder re-saved under the same name."""
    digest = hashlib.sha256()
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(dtype=torch.uint8).numpy())
    return digest.hexdigest()


def encoder_layers_digest(encoder) -> str:
    """sha256 over the encoder's layer types in order: the same weights run with another activation
    (QuickGELU, as OpenAI's CLIP was trained, or GELU) give other tokens."""
    return hashlib.sha256(",".join(type(module).__name__ for module in encoder.modules()).encode()).hexdigest()
