"""JPEGs decoded on the device (ituning/device_jpeg.py): the resize and crop on tensors against
PIL's, which files travel as bytes, the fallbacks to the CPU path, and the setting that turns it on.

nvJPEG needs CUDA, so on the CPU the routing tests decode the JPEG bytes with a stand-in that uses
PIL; the test at the end runs the real nvJPEG path where a GPU is present."""

import io
import random

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image
from torch.utils.data import DataLoader

import ituning.encoding
from ituning.backbones import BackboneSpec, load_vision_encoder
from ituning.device_jpeg import (
    END_TO_END_TOLERANCE, RESIZE_TOLERANCE, DeviceJpegs, DeviceResizeCrop, RoutedFiles, Tolerance, collate_routed,
    device_jpegs, device_resize_crop, jpeg_for_device,
)
from ituning.encoding import (
    BytePixels, EncodeSettings, ImageFiles, encode_batches, encode_pixels, image_loader, split_preprocess,
)
from ituning.images import open_rgb
from ituning.standins import save_vision_standin
from storage.scenes import random_scene, render_scene

from torchvision.transforms import CenterCrop, Compose, InterpolationMode, RandomResizedCrop, Resize  # noqa: E402

SIDE = 224  # ViT-B-16's input side
OPEN_CLIP_STEPS = [Resize(SIDE, interpolation=InterpolationMode.BICUBIC), CenterCrop(SIDE)]


def textured_jpeg(path, width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A rendered scene plus sensor-like noise, saved as a JPEG: as large and as hard to resize as a photo."""
    image = render_scene(random_scene(random.Random(seed)), size=max(width, height)).resize((width, height))
    noise = np.random.default_rng(seed).integers(-24, 25, (height, width, 3), dtype=np.int16)
    noisy = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    Image.fromarray(noisy).convert(mode).save(path, quality=90)
    return path


def distance(got: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> tuple[float, float]:
    """(mean absolute difference in levels, share of values more than tolerance.max_levels away)."""
    difference = (got.to(torch.int16) - expected.to(torch.int16)).abs()
    return difference.float().mean().item(), (difference > tolerance.max_levels).float().mean().item()


def assert_within(got: torch.Tensor, expected: torch.Tensor, tolerance: Tolerance) -> None:
    assert got.shape == expected.shape and got.dtype == expected.dtype == torch.uint8
    mean, over = distance(got, expected, tolerance)
    assert mean < tolerance.mean_levels and over <= tolerance.over_fraction, (mean, over)


def pil_standin(data: list[torch.Tensor], device) -> list[torch.Tensor]:
    """Stands in for nvJPEG, which cannot run without CUDA: the same bytes decoded by PIL on the CPU."""
    return [pil_tensor(Image.open(io.BytesIO(one.numpy().tobytes())).convert("RGB")).to(device) for one in data]


def pil_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1).contiguous()  # (3, H, W)


# ---- (a) the resize and crop on tensors against the PIL steps ----

@pytest.mark.parametrize("size, interpolation", [
    ((640, 480), InterpolationMode.BICUBIC),  # landscape, COCO's commonest size
    ((480, 640), InterpolationMode.BICUBIC),  # portrait
    ((120, 90), InterpolationMode.BICUBIC),  # small: upscaled
    ((1600, 1200), InterpolationMode.BICUBIC),  # large: shrunk over 5 times
    ((640, 480), InterpolationMode.BILINEAR),
])
def test_device_resize_and_crop_are_within_the_stated_tolerance_of_pil(tmp_path, size, interpolation):
    steps = Compose([Resize(SIDE, interpolation=interpolation), CenterCrop(SIDE)])
    resize_crop = device_resize_crop(BytePixels(steps))
    assert resize_crop == DeviceResizeCrop(SIDE, (SIDE, SIDE), interpolation)
    decoded = [open_rgb(textured_jpeg(tmp_path / f"{seed}.jpg", *size, seed)) for seed in range(3)]
    got = resize_crop(torch.stack([pil_tensor(image) for image in decoded]))  # (3, 3, 224, 224)
    expected = torch.stack([BytePixels(steps)(image) for image in decoded])
    assert got.shape == (3, 3, SIDE, SIDE)
    assert_within(got, expected, RESIZE_TOLERANCE)
    assert (got.to(torch.int16) - expected).abs().max() <= 2  # PIL's rounding, never more


def test_device_steps_are_derived_only_from_a_shorter_side_resize_and_a_centre_crop(tmp_path):
    encoder = load_vision_encoder(BackboneSpec(save_vision_standin(tmp_path / "vision", seed=0), None))
    transform, _, _ = split_preprocess(encoder.preprocess, (64, 64))  # open_clip's: Resize, CenterCrop, RGB
    assert device_resize_crop(transform) == DeviceResizeCrop(64, (64, 64), InterpolationMode.BICUBIC)
    others = [
        [Resize((SIDE, SIDE)), CenterCrop(SIDE)],  # squashes, no shorter side
        [Resize(SIDE, interpolation=InterpolationMode.NEAREST), CenterCrop(SIDE)],
        [Resize(SIDE, max_size=300), CenterCrop(SIDE)],
        [RandomResizedCrop(SIDE)],
        [*OPEN_CLIP_STEPS, lambda image: image.rotate(90)],
    ]
    assert [device_resize_crop(BytePixels(Compose(steps))) for steps in others] == [None] * len(others)
    assert device_resize_crop(encoder.preprocess) is None  # a whole transform, not split into PIL steps


# ---- (b) which files travel as bytes, and the fallbacks ----

def mixed_files(folder) -> list[tuple[int, str, object]]:
    """(group, image_id, path) of every kind of file a split may hold."""
    textured_jpeg(folder / "rgb.jpg", 96, 80, seed=1)
    textured_jpeg(folder / "gray.jpg", 80, 96, seed=2, mode="L")
    textured_jpeg(folder / "cmyk.jpg", 90, 90, seed=3, mode="CMYK")
    render_scene(random_scene(random.Random(4)), size=72).save(folder / "scene.png")
    (folder / "broken.jpg").write_bytes(b"not an image at all")
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = 6
    render_scene(random_scene(random.Random(5)), size=88).save(folder / "rotated.jpg", exif=exif)
    whole = (folder / "rgb.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    textured_jpeg(folder / "large.jpg", 400, 300, seed=6)  # over 4 x 64 on its shorter side: reduced decode
    names = ["rgb", "gray", "cmyk", "scene", "broken", "rotated", "truncated", "large"]
    paths = {name: next(folder.glob(f"{name}.*")) for name in names}
    return [(0, name, paths[name]) for name in names]


SENT_AS_BYTES = {"rgb", "gray"}


@pytest.fixture
def files(tmp_path) -> ImageFiles:
    transform = BytePixels(Compose([Resize(64, interpolation=InterpolationMode.BICUBIC), CenterCrop(64)]))
    return ImageFiles(mixed_files(tmp_path), transform, torch.zeros(3, 64, 64, dtype=torch.uint8), 64)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_only_jpegs_that_nvjpeg_decodes_as_open_rgb_travel_as_bytes(files, monkeypatch):
    sent = {image_id for _, image_id, path in files.items if jpeg_for_device(path, 64) is not None}
    assert sent == SENT_AS_BYTES
    rgb = files.items[0][2]
    assert torch.equal(jpeg_for_device(rgb, 64), torch.frombuffer(bytearray(rgb.read_bytes()), dtype=torch.uint8))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 96 * 80 - 1)
    assert jpeg_for_device(rgb, 64) is None  # over the limit: the CPU path names the reason


def routed_batch(files) -> object:
    return collate_routed([RoutedFiles(files)[index] for index in range(len(files))])


def cpu_path(files) -> tuple[torch.Tensor, list[str]]:
    samples = [files[index] for index in range(len(files))]
    return torch.stack([pixels for pixels, *_ in samples]), [error for *_, error in samples]


def test_a_mixed_batch_gives_the_cpu_paths_pixels_and_errors(files):
    batch = routed_batch(files)
    assert batch.on_device.tolist() == [image_id in SENT_AS_BYTES for _, image_id, _ in files.items]
    assert batch.pixels.shape == (6, 3, 64, 64) and batch.jpeg_indices == [0, 1]
    pixels, groups, image_ids, errors = DeviceJpegs(files, device_resize_crop(files.transform), "cpu", pil_standin)(batch)
    expected_pixels, expected_errors = cpu_path(files)
    assert image_ids == [image_id for _, image_id, _ in files.items] and groups.tolist() == [0] * 8
    assert errors == expected_errors
    assert [bool(error) for error in errors] == [False, False, False, False, True, False, True, False]
    assert "broken.jpg: not an image file" in errors[4] and "truncated.jpg: cannot decode" in errors[6]
    assert torch.equal(pixels[2:], expected_pixels[2:])  # the CPU path's own pixels, blanks included
    assert_within(pixels[:2], expected_pixels[:2], RESIZE_TOLERANCE)


def test_a_decoder_failure_falls_back_to_the_cpu_path_for_that_image_only(files):
    calls = []

    def failing_on_grayscale(data, device):
        """Stands in for nvJPEG failing on one stream: the batched call raises, and so does that image alone."""
        calls.append(len(data))
        if any(Image.open(io.BytesIO(one.numpy().tobytes())).mode == "L" for one in data):
            raise RuntimeError("Error while decoding JPEG images")
        return pil_standin(data, device)

    batch = routed_batch(files)
    decode = DeviceJpegs(files, device_resize_crop(files.transform), "cpu", failing_on_grayscale)
    pixels, _, _, errors = decode(batch)
    expected_pixels, expected_errors = cpu_path(files)
    assert calls == [2, 1, 1]  # the batch, then each JPEG on its own
    assert errors == expected_errors
    assert torch.equal(pixels[1:], expected_pixels[1:])  # the grayscale JPEG went through the CPU path
    assert_within(pixels[:1], expected_pixels[:1], RESIZE_TOLERANCE)


def test_a_fallback_that_cannot_read_the_file_gives_the_cpu_paths_blank_and_error(files):
    def refusing(data, device):
        """Stands in for nvJPEG refusing every stream."""
        raise RuntimeError("Error while decoding JPEG images")

    batch = routed_batch(files)
    gray = files.items[1][2]
    gray.unlink()  # gone since the worker read it
    pixels, _, _, errors = DeviceJpegs(files, device_resize_crop(files.transform), "cpu", refusing)(batch)
    expected_pixels, expected_errors = cpu_path(files)
    assert errors == expected_errors and errors[1] == f"{gray}: no such file"
    torch.testing.assert_close(pixels, expected_pixels, rtol=0, atol=0)  # every row from the CPU path
    assert not pixels[1].any()  # the blank image


# ---- (c) the setting ----

@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_vision_encoder(BackboneSpec(save_vision_standin(tmp_path_factory.mktemp("vision"), seed=0), None))


def encoded(encoder, items, settings: EncodeSettings) -> tuple[torch.Tensor, list[str], list[str]]:
    batches = list(encode_batches(encoder, items, settings))
    return (torch.cat([batch.tokens for batch in batches]), [i for batch in batches for i in batch.image_ids],
            [error for batch in batches for error in batch.errors])


def test_auto_on_the_cpu_keeps_todays_path_and_its_tokens(encoder, tmp_path):
    items = mixed_files(tmp_path)
    loader, _ = image_loader(encoder, items, EncodeSettings(batch_size=3, num_workers=0))
    assert isinstance(loader, DataLoader) and type(loader.dataset) is ImageFiles
    auto = encoded(encoder, items, EncodeSettings(batch_size=3, num_workers=0, decode_on_device="auto"))
    never = encoded(encoder, items, EncodeSettings(batch_size=3, num_workers=0, decode_on_device="never"))
    assert auto[1:] == never[1:] and auto[1] == [image_id for _, image_id, _ in items]
    assert [bool(error) for error in auto[2]] == [False, False, False, False, True, False, True, False]
    torch.testing.assert_close(auto[0], never[0], rtol=0, atol=0)
    transform, blank, finish = split_preprocess(encoder.preprocess, (64, 64))
    files = ImageFiles(items, transform, blank, 64)
    by_hand = [encode_pixels(encoder, torch.stack([files[i][0] for i in batch]), "cpu", "float32", finish)
               for batch in ([0, 1, 2], [3, 4, 5], [6, 7])]  # the workers' uint8 pixels, batch by batch
    torch.testing.assert_close(auto[0], torch.cat(by_hand).half(), rtol=0, atol=0)


def test_always_without_cuda_and_unknown_values_are_refused(encoder, tmp_path):
    items = mixed_files(tmp_path)
    with pytest.raises(RuntimeError, match="decode_on_device='always' cannot be done: the device is cpu, and nvJPEG"):
        image_loader(encoder, items, EncodeSettings(decode_on_device="always"))
    with pytest.raises(ValueError, match="decode_on_device must be one of"):
        image_loader(encoder, items, EncodeSettings(decode_on_device="sometimes"))


@pytest.mark.parametrize("workers", [0, 2])
def test_the_encoding_loop_with_jpegs_decoded_by_the_stand_in(encoder, tmp_path, monkeypatch, workers):
    """The whole loop of ituning/encoding.py with the device path forced on the CPU, decoding with
    the PIL stand-in for nvJPEG: same order, same errors, tokens of pixels within the tolerance."""
    def standin_jpegs(files, device, decode_on_device):
        return DeviceJpegs(files, device_resize_crop(files.transform), device, pil_standin)

    items = mixed_files(tmp_path)
    settings = EncodeSettings(batch_size=3, num_workers=workers)
    cpu_tokens, cpu_ids, cpu_errors = encoded(encoder, items, settings)
    monkeypatch.setattr(ituning.encoding, "device_jpegs", standin_jpegs)
    tokens, image_ids, errors = encoded(encoder, items, settings)
    assert (image_ids, errors) == (cpu_ids, cpu_errors)
    torch.testing.assert_close(tokens[2:], cpu_tokens[2:], rtol=0, atol=0)  # not JPEGs for the device
    torch.testing.assert_close(tokens[:2], cpu_tokens[:2], rtol=0, atol=0.05)  # a level at a few pixels


# ---- (d) the real nvJPEG path ----

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_path_is_within_the_stated_tolerance_of_the_cpu_path(tmp_path):
    sizes = [(640, 480), (480, 640), (120, 90), (800, 600)]
    items = [(0, f"{index}", textured_jpeg(tmp_path / f"{index}.jpg", *size, seed=index))
             for index, size in enumerate(sizes)]
    items.append((0, "gray", textured_jpeg(tmp_path / "gray.jpg", 640, 480, seed=9, mode="L")))
    items += [item for item in mixed_files(tmp_path) if item[1] in {"cmyk", "scene", "broken", "rotated", "truncated"}]
    files = ImageFiles(items, BytePixels(Compose(OPEN_CLIP_STEPS)), torch.zeros(3, SIDE, SIDE, dtype=torch.uint8), SIDE)
    jpegs = device_jpegs(files, "cuda", "always")
    pixels, _, image_ids, errors = jpegs(routed_batch(files))
    expected_pixels, expected_errors = cpu_path(files)
    assert pixels.device.type == "cuda" and errors == expected_errors
    assert routed_batch(files).on_device.tolist()[:5] == [True] * 5
    assert_within(pixels[:5].cpu(), expected_pixels[:5], END_TO_END_TOLERANCE)
    assert torch.equal(pixels[5:].cpu(), expected_pixels[5:])
