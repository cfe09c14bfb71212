"""JPEG files decoded on the GPU (nvJPEG, through torchvision.io.decode_jpeg), resized and cropped there.

Why: on a fast GPU the feature cache is bound by decoding JPEGs on the CPU (on an H200, 15 worker
processes decode about 1,400 images/s while the encoder runs over 4,000). With JPEGs decoded on the
device, the workers only read files and check their headers.

Which files go to the device. A worker reads each file and opens its header with PIL (nothing is
decoded there). A file travels as its bytes when it is a JPEG of mode RGB or L within PIL's pixel
limit, with no EXIF orientation to apply (torchvision applies `apply_exif_orientation` on the CPU
only; nvJPEG returns the stored pixels), small enough to be decoded at full size by open_rgb (see
ituning.images.decode_scale) and ending in the end-of-image marker (a truncated file is refused by
PIL, which nvJPEG might decode in part). Every other file (PNG, CMYK, a rotated photo, a very large
JPEG, an unreadable file) goes through the CPU path of ituning/encoding.py in the worker, unchanged:
its pixels, or the blank image and the reason.

In the main process a batch's JPEGs are decoded with one batched call; if that call raises they
are decoded one by one, and an image nvJPEG cannot decode goes through the CPU path (open_rgb and
the PIL steps) on its own, with the same pixels or the same error as if it had never been sent.
The order of images and the errors are those of the CPU path.

The resize and crop on the device follow the preprocessing's PIL steps (open_clip's
Resize(side, bicubic) of the shorter side, then CenterCrop): the same output size, and PIL's two
passes, width first, each antialiased (PIL's kernels: Keys a = -0.5 for bicubic, widened by the
scale when shrinking), computed in float32 and rounded to uint8 as PIL rounds between its passes;
then the same crop. They differ from PIL's fixed-point arithmetic by rounding only. Measured on 48
rendered scenes with sensor-like noise saved as JPEGs (quality 90; 12 each of 640x480, 480x640,
160x120 (upscaled) and 1024x768), each decoded by PIL and taken to 224x224 both ways: bicubic,
a mean absolute difference of 0.0002 levels, 0.02 % of the values off by one level and none by
more; bilinear (16 of them), a mean of 0.010 levels, 1 % of the values off by one, 0.0002 % by two.
The bound, RESIZE_TOLERANCE, is checked by tests/test_device_jpeg.py.

nvJPEG's own decoding differs from libjpeg's (its IDCT and chroma upsampling): torchvision holds its
CUDA decoder to a mean absolute difference under 2 levels from its CPU decoder at full size, before
any averaging by the resize. The whole device path is held to END_TO_END_TOLERANCE against the
CPU path on CUDA: a bound taken from torchvision's, loosened for a few values at sharp colour edges,
not a measurement.

Before the device path takes over in a process (ituning/fast_paths.py), the first batch of files is
decoded both ways and must agree within END_TO_END_TOLERANCE; otherwise, or if it raises, `auto`
decodes on the CPU from then on (`always` raises). A batch that fails on the device later (out of
memory, a driver error) is decoded on the CPU in the main process, and so is every batch after it.
"""

import io
from collections import defaultdict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import ExifTags, Image
from torch.utils.data import Dataset

from ituning.fast_paths import DEVICE_JPEG, ON
from ituning.images import decode_scale, within_pixel_limit

DECODE_ON_DEVICE = ("auto", "never", "always")
DEVICE_MODES = {"RGB", "L"}  # JPEG modes nvJPEG decodes to the RGB open_rgb gives; CMYK stays on the CPU
END_OF_IMAGE = b"\xff\xd9"
DECODE_ERRORS = (RuntimeError, ValueError)  # what torchvision.io reports for a stream nvJPEG cannot decode
RESIZE_BUDGET = 1 << 26  # float32 values resized at once (256 MiB): bounds the device memory of a batch
PIL_STEPS_WITHOUT_EFFECT = {"MaybeConvertMode", "_convert_to_rgb"}  # convert to RGB: the pixels already are


@dataclass(frozen=True)
class Tolerance:
    """How far, in uint8 levels, the device path's pixels may be from the CPU path's."""

    mean_levels: float  # the mean absolute difference stays under this
    max_levels: int  # a value this far off or nearer counts as close ...
    over_fraction: float  # ... and at most this share of the values are farther


RESIZE_TOLERANCE = Tolerance(mean_levels=0.02, max_levels=1, over_fraction=1e-4)
END_TO_END_TOLERANCE = Tolerance(mean_levels=2.0, max_levels=16, over_fraction=0.01)


@dataclass(frozen=True)
class DeviceResizeCrop:
    """The PIL steps Resize(side) and CenterCrop(crop) on uint8 images (N, 3, H, W) of one size."""

    side: int  # of the shorter side after resizing
    crop: tuple[int, int]  # (height, width)
    interpolation: object  # torchvision InterpolationMode: BICUBIC or BILINEAR

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2.functional import center_crop

        height, width = images.shape[-2:]
        new_height, new_width = resized_size(height, width, self.side)
        wide = self.resize(images, (height, new_width))  # (N, 3, H, new_w): PIL's first pass, rounded as PIL does
        return center_crop(self.resize(wide, (new_height, new_width)), list(self.crop))  # (N, 3, crop_h, crop_w)

    def resize(self, images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """One pass of PIL's separable resize: antialiased, in float32, clamped and rounded to uint8."""
        from torchvision.transforms.v2.functional import resize

        if tuple(images.shape[-2:]) == size:
            return images
        resized = resize(images.to(torch.float32), list(size), self.interpolation, antialias=True)
        return resized.clamp_(0, 255).round_().to(torch.uint8)


def resized_size(height: int, width: int, side: int) -> tuple[int, int]:
    """(height, width) with the shorter side `side` and the longer one truncated, as torchvision's Resize."""
    short, long = sorted((height, width))
    new_long = int(side * long / short)
    return (side, new_long) if height <= width else (new_long, side)


def device_resize_crop(transform) -> DeviceResizeCrop | None:
    """The device steps of a worker transform (encoding.BytePixels) whose PIL steps are exactly a
    Resize of the shorter side (one int, bicubic or bilinear, no max_size) and a CenterCrop, as
    open_clip builds them; None for any other transform, which then runs on the CPU."""
    from torchvision.transforms import CenterCrop, InterpolationMode, Resize

    steps = [step for step in getattr(getattr(transform, "pil_steps", None), "transforms", ())
             if not _without_effect(step)]
    if len(steps) != 2 or type(steps[0]) is not Resize or type(steps[1]) is not CenterCrop:
        return None
    resize, crop = steps
    size = [resize.size] if isinstance(resize.size, int) else list(resize.size)
    usable = (len(size) == 1 and resize.max_size is None
              and resize.interpolation in (InterpolationMode.BICUBIC, InterpolationMode.BILINEAR))
    return DeviceResizeCrop(size[0], tuple(crop.size), resize.interpolation) if usable else None


def _without_effect(step) -> bool:
    """A conversion to RGB (open_clip's MaybeConvertMode): decoded pixels already are RGB."""
    name = getattr(step, "__name__", type(step).__name__)
    return name in PIL_STEPS_WITHOUT_EFFECT and getattr(step, "mode", "RGB") == "RGB"


def jpeg_for_device(path, min_side: int | None) -> torch.Tensor | None:
    """The file's bytes (uint8, 1-D) when nvJPEG can decode it to the pixels open_rgb gives, else
    None. Only the header is read by PIL; nothing is decoded."""
    try:
        data = Path(path).read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            suited = (image.format == "JPEG" and image.mode in DEVICE_MODES
                      and within_pixel_limit(image.width * image.height)
                      and decode_scale(min(image.size), min_side) == 1
                      and image.getexif().get(ExifTags.Base.Orientation, 1) not in range(2, 9))
    except Exception:  # any failure: the CPU path decodes the file and names the reason
        return None
    if not suited or not data.endswith(END_OF_IMAGE):
        return None
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class RoutedItem(NamedTuple):
    """One file as a worker sends it: a JPEG's bytes for the device, or what the CPU path gives."""

    pixels: torch.Tensor | None  # (3, H, W) uint8 from the CPU path (the blank image if unreadable)
    jpeg: torch.Tensor | None  # (bytes,) uint8: the file, to decode on the device
    group: int
    image_id: str
    error: str
    index: int  # in the dataset


class RoutedFiles(Dataset):
    """An encoding.ImageFiles whose items are RoutedItems: JPEGs nvJPEG can decode as open_rgb
    would travel as their bytes, every other file through the CPU path, as before."""

    def __init__(self, files):
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> RoutedItem:
        group, image_id, path = self.files.items[index]
        jpeg = jpeg_for_device(path, self.files.min_side)
        if jpeg is None:
            pixels, group, image_id, error = self.files[index]
            return RoutedItem(pixels, None, group, image_id, error, index)
        return RoutedItem(None, jpeg, group, image_id, "", index)


class RoutedBatch(NamedTuple):
    """A batch as workers send it: the CPU path's pixels and the JPEGs' bytes, each in one tensor."""

    pixels: torch.Tensor  # (N_cpu, 3, H, W) uint8: the rows decoded on the CPU, in batch order
    jpeg_bytes: torch.Tensor  # (total,) uint8: the JPEG files of the other rows, one after another
    jpeg_lengths: list[int]
    jpeg_indices: list[int]  # those rows' dataset indices, for the CPU fallback
    on_device: torch.Tensor  # (B,) bool: the rows sent as JPEG bytes
    groups: torch.Tensor  # (B,)
    image_ids: list[str]
    errors: list[str]


def collate_routed(items: list[RoutedItem]) -> RoutedBatch:
    """One RoutedBatch: two tensors cross between processes, not one per file."""
    pixels = [item.pixels for item in items if item.jpeg is None]
    jpegs = [item for item in items if item.jpeg is not None]
    return RoutedBatch(
        pixels=torch.stack(pixels) if pixels else torch.empty(0, dtype=torch.uint8),
        jpeg_bytes=torch.cat([item.jpeg for item in jpegs]) if jpegs else torch.empty(0, dtype=torch.uint8),
        jpeg_lengths=[len(item.jpeg) for item in jpegs],
        jpeg_indices=[item.index for item in jpegs],
        on_device=torch.tensor([item.jpeg is not None for item in items]),
        groups=torch.tensor([item.group for item in items]),
        image_ids=[item.image_id for item in items],
        errors=[item.error for item in items],
    )


def nvjpeg_decode(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    """uint8 (3, H, W) images on `device` from JPEG bytes on the host, in one batched nvJPEG call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    return decode_jpeg(data, mode=ImageReadMode.RGB, device=device, apply_exif_orientation=True)


class DeviceJpegs:
    """Turns a RoutedBatch into (pixels, groups, image_ids, errors) with uint8 pixels (B, 3, H, W)
    on the device: JPEGs decoded by `decode` (nvJPEG; a stand-in in tests), resized and cropped
    there, the CPU path's rows copied in, each in its place."""

    def __init__(self, files, resize_crop: DeviceResizeCrop, device, decode=nvjpeg_decode, setting: str = "auto"):
        self.files, self.resize_crop, self.device, self.decode = files, resize_crop, torch.device(device), decode
        self.setting, self.failed = setting, False

    def __call__(self, batch: RoutedBatch):
        if not self.failed:
            try:
                return self.on_device(batch)
            except Exception as error:  # noqa: BLE001 (any failure: the CPU path decodes this batch and the rest)
                DEVICE_JPEG.failed_later(self.setting, error)
                self.failed = True
        return self.on_host(batch)

    def on_host(self, batch: RoutedBatch):
        """The batch as the CPU path gives it: the JPEG rows decoded there, in the main process."""
        rows, errors, jpegs = list(batch.pixels), list(batch.errors), iter(batch.jpeg_indices)
        pixels = []
        for row, sent in enumerate(batch.on_device.tolist()):
            if sent:
                image, _, _, errors[row] = self.files[next(jpegs)]
                pixels.append(image)
            else:
                pixels.append(rows.pop(0))
        return torch.stack(pixels), batch.groups, list(batch.image_ids), errors

    def on_device(self, batch: RoutedBatch):
        with torch.inference_mode():
            on_device = batch.on_device.tolist()
            pixels = torch.empty((len(on_device), *self.files.blank.shape), dtype=torch.uint8, device=self.device)
            cpu_rows = [row for row, sent in enumerate(on_device) if not sent]
            if cpu_rows:
                pixels[cpu_rows] = batch.pixels.to(self.device, non_blocking=True)
            errors = list(batch.errors)
            jpeg_rows = [row for row, sent in enumerate(on_device) if sent]
            if jpeg_rows:
                self.decode_jpegs(batch, jpeg_rows, pixels, errors)
        return pixels, batch.groups, list(batch.image_ids), errors

    def decode_jpegs(self, batch: RoutedBatch, rows: list[int], pixels: torch.Tensor, errors: list[str]) -> None:
        """The batch's JPEGs into their rows of `pixels`; one the decoder cannot decode goes through
        the CPU path, which also gives its error, if any."""
        data = list(torch.split(batch.jpeg_bytes, batch.jpeg_lengths))
        by_shape = defaultdict(list)
        for row, image, index in zip(rows, decode_each(self.decode, data, self.device), batch.jpeg_indices):
            if image is None:
                pixels[row], errors[row] = self.cpu_path(index)
            else:
                by_shape[tuple(image.shape)].append((row, image))
        for (_, height, width), members in by_shape.items():  # one resize per size of image
            per_call = max(1, RESIZE_BUDGET // (3 * height * width))
            for first in range(0, len(members), per_call):
                chunk = members[first : first + per_call]
                images = torch.stack([image for _, image in chunk])  # (n, 3, height, width)
                pixels[[row for row, _ in chunk]] = self.resize_crop(images)

    def cpu_path(self, index: int) -> tuple[torch.Tensor, str]:
        """The item decoded as if it had never been sent: encoding.ImageFiles on the CPU."""
        pixels, _, _, error = self.files[index]
        return pixels.to(self.device), error


def decode_each(decode, data: list[torch.Tensor], device) -> list[torch.Tensor | None]:
    """Each JPEG decoded, None where the decoder cannot: one batched call, one by one if it raises."""
    try:
        return [_checked(image) for image in decode(data, device)]
    except DECODE_ERRORS:
        return [_decode_one(decode, one, device) for one in data]


def _decode_one(decode, data: torch.Tensor, device) -> torch.Tensor | None:
    try:
        return _checked(decode([data], device)[0])
    except DECODE_ERRORS:
        return None


def _checked(image: torch.Tensor) -> torch.Tensor | None:
    return image if image.dim() == 3 and image.shape[0] == 3 and image.dtype == torch.uint8 else None


def device_jpegs(files, device, decode_on_device: str = "auto") -> DeviceJpegs | None:
    """The device decoding of `files` (an encoding.ImageFiles) as the setting asks: `auto` where
    it can be done, `never`, or `always` (RuntimeError, with the reason, where it cannot)."""
    if decode_on_device not in DECODE_ON_DEVICE:
        raise ValueError(f"decode_on_device must be one of {DECODE_ON_DEVICE}, not {decode_on_device!r}")
    if decode_on_device == "never":
        return None
    resize_crop = device_resize_crop(files.transform)
    problem = why_not_on_device(torch.device(device), resize_crop)
    if problem and decode_on_device == "always":
        raise RuntimeError(f"decode_on_device='always' cannot be done: {problem}")
    if not DEVICE_JPEG.available(not problem):
        return None
    return DeviceJpegs(files, resize_crop, device, setting=decode_on_device)


def proven(jpegs: DeviceJpegs | None, first_batch: list[int]) -> DeviceJpegs | None:
    """`jpegs` once the files of `first_batch` (dataset indices) decoded on the device agree with the
    CPU path within END_TO_END_TOLERANCE, in this process (ituning/fast_paths.py); None otherwise."""
    if jpegs is None or DEVICE_JPEG.outcome == ON or not first_batch:
        return jpegs
    routed = RoutedFiles(jpegs.files)
    fast = lambda: jpegs.on_device(collate_routed([routed[index] for index in first_batch]))[0].cpu()  # noqa: E731
    plain = lambda: torch.stack([jpegs.files[index][0] for index in first_batch])  # noqa: E731
    used, _ = DEVICE_JPEG.first_use(jpegs.setting, fast, plain, pixel_difference)
    return jpegs if used else None


def pixel_difference(device_pixels: torch.Tensor, cpu_pixels: torch.Tensor,
                     tolerance: Tolerance = END_TO_END_TOLERANCE) -> str:
    """"" when uint8 images (B, 3, H, W) from the two paths are within `tolerance`."""
    if device_pixels.shape != cpu_pixels.shape:
        return f"pixels of shape {tuple(device_pixels.shape)} against {tuple(cpu_pixels.shape)}"
    gap = (device_pixels.int() - cpu_pixels.int()).abs()
    mean, over = gap.float().mean().item(), (gap > tolerance.max_levels).float().mean().item()
    if mean >= tolerance.mean_levels or over > tolerance.over_fraction:
        return (f"mean difference {mean:.3f} levels, {over:.2%} of the values over {tolerance.max_levels} "
                f"(allowed under {tolerance.mean_levels}, {tolerance.over_fraction:.2%})")
    return ""


def why_not_on_device(device: torch.device, resize_crop: DeviceResizeCrop | None) -> str:
    """Why JPEGs cannot be decoded on `device` with these steps ("" when they can)."""
    if device.type != "cuda":
        return f"the device is {device}, and nvJPEG runs on CUDA only"
    if resize_crop is None:
        return ("the preprocessing is not a Resize of the shorter side (bicubic or bilinear) and a "
                "CenterCrop followed by ToTensor and Normalize")
    return nvjpeg_problem(str(device))


@cache
def nvjpeg_problem(device: str) -> str:
    """Why torchvision.io.decode_jpeg cannot decode on `device` ("" when it decodes a small JPEG)."""
    sample = io.BytesIO()
    Image.fromarray(np.full((16, 16, 3), 128, dtype=np.uint8)).save(sample, format="JPEG")
    try:
        decoded = nvjpeg_decode([torch.frombuffer(bytearray(sample.getvalue()), dtype=torch.uint8)], device)
    except Exception as error:  # a torchvision without image operators or nvJPEG: any failure says so
        return f"torchvision.io.decode_jpeg fails on {device}: {error}"
    shape = tuple(decoded[0].shape)
    return "" if shape == (3, 16, 16) else f"torchvision.io.decode_jpeg on {device} gives {shape}, not (3, 16, 16)"
