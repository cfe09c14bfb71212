"""Images that decode wrongly or not at all: 16-bit PNGs, EXIF-rotated JPEGs, images over PIL's pixel
limit and very large images, through every reader of image files (the catalog check, the feature
cache, captioning, the served model and the Karpathy-split path), which all decode with open_rgb."""

import base64
import io
import json
import struct
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import ExifTags, Image, JpegImagePlugin

from ituning.captioner import Captioner
from ituning.images import UnreadableImage, open_rgb
from ituning.encoding import BytePixels, EncodeSettings, ImageFiles, load_pixels
from storage.catalog import Catalog
from pipeline.data import build_dataset
from pipeline.gallery import thumbnail_jpeg
from pipeline.image_check import inspect_image, inspect_images

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
PNG_COLOUR_TYPES = {1: 0, 2: 4, 3: 2, 4: 6}  # channels -> colour type: gray, gray + alpha, RGB, RGBA
UPRIGHT_SIZE = (64, 40)
STORED_AS = {3: Image.Transpose.ROTATE_180, 6: Image.Transpose.ROTATE_90, 8: Image.Transpose.ROTATE_270}
HUGE_SIDE = 30_000  # 900,000,000 pixels: over twice PIL's default limit, so PIL refuses it outright
HUGE_REASON = "too large to decode: 900,000,000 pixels, over the limit of 89,478,485 (PIL.Image.MAX_IMAGE_PIXELS)"


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def write_png(path, pixels: np.ndarray, bit_depth: int = 16):
    """A PNG written byte by byte (Pillow writes no 16-bit colour PNGs): unfiltered rows."""
    height, width = pixels.shape[:2]
    channels = 1 if pixels.ndim == 2 else pixels.shape[2]
    rows = b"".join(b"\0" + row.astype(">u2" if bit_depth == 16 else "u1").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", width, height, bit_depth, PNG_COLOUR_TYPES[channels], 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(rows))
                     + _chunk(b"IEND", b""))
    return path


def write_huge_png(path, side: int = HUGE_SIDE):
    """A few hundred bytes whose header claims side x side pixels."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(PNG_SIGNATURE + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(bytes(side + 1)))
                     + _chunk(b"IEND", b""))
    return path


def sixteen_bit(channels: int, size=(48, 40)) -> np.ndarray:
    """Values over the whole 16-bit range, nearly all of them above 255."""
    shape = (size[1], size[0]) if channels == 1 else (size[1], size[0], channels)
    return np.random.default_rng(channels).integers(0, 65536, shape).astype(np.uint16)


def high_bytes_as_rgb(pixels: np.ndarray) -> np.ndarray:
    colour = pixels if pixels.ndim == 2 else pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., 0]
    colour = (colour >> 8).astype(np.uint8)
    return np.repeat(colour[..., None], 3, axis=2) if colour.ndim == 2 else colour


def smooth_image(size, seed: int = 0) -> Image.Image:
    """No symmetry to hide a rotation, smooth enough for JPEG to keep it within a grey level or two."""
    coarse = np.random.default_rng(seed).integers(0, 256, (5, 6, 3), dtype=np.uint8)
    return Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC)


def write_oriented_jpeg(path, upright: Image.Image, orientation: int):
    """A JPEG stored turned so that its EXIF orientation tag turns it back to `upright`."""
    exif = Image.Exif()
    exif[ExifTags.Base.Orientation] = orientation
    upright.transpose(STORED_AS[orientation]).save(path, quality=95, exif=exif)
    return path


class RecordingCaptioner(Captioner):
    """Captioner.caption_files, as `ituning caption` runs it, with the model replaced by a record
    of the images it is given."""

    def __init__(self, input_side: int = 64):
        self.vision = SimpleNamespace(visual=SimpleNamespace(image_size=input_side))
        self.seen: list[Image.Image] = []

    def caption_images(self, images, decoding=None, batch_size: int = 16) -> list[str]:
        self.seen += images
        return ["a caption"] * len(images)


def feature_cache_pixels(path) -> np.ndarray:
    pixels, _, _, error = ImageFiles([(0, "image", path)], BytePixels(lambda image: image), torch.zeros(3, 1, 1))[0]
    assert error == ""
    return pixels.permute(1, 2, 0).numpy()  # (H, W, 3)


def caption_path_pixels(path) -> np.ndarray:
    captioner = RecordingCaptioner()
    assert captioner.caption_files([path]) == [(path, "a caption", None)]
    return np.asarray(captioner.seen[0])


def served_model_pixels(path) -> np.ndarray:
    from pipeline.captioner_model import decode_image

    return np.asarray(decode_image(base64.b64encode(path.read_bytes()).decode(), accept_file_paths=False))


def karpathy_path_pixels(path) -> np.ndarray:
    return load_pixels([path], lambda image: torch.from_numpy(np.array(image)))[0].numpy()


READERS = {"open_rgb": lambda path: np.asarray(open_rgb(path)), "feature cache": feature_cache_pixels,
           "caption": caption_path_pixels, "served model": served_model_pixels, "karpathy": karpathy_path_pixels}


# ---- 16-bit PNGs --------------------------------------------------------------------------------

@pytest.mark.parametrize("channels", [1, 2, 3, 4], ids=["gray", "gray+alpha", "rgb48", "rgba64"])
def test_16_bit_pngs_keep_their_high_byte(tmp_path, channels):
    pixels = sixteen_bit(channels)
    path = write_png(tmp_path / "deep.png", pixels)
    assert path.read_bytes()[24] == 16  # IHDR bit depth
    np.testing.assert_array_equal(np.asarray(open_rgb(path)), high_bytes_as_rgb(pixels))


@pytest.mark.parametrize("reader", READERS)
def test_16_bit_grayscale_png_written_by_pillow_is_scaled_not_clipped(tmp_path, reader):
    pixels = sixteen_bit(1)
    path = tmp_path / "gray16.png"
    Image.fromarray(pixels).save(path)
    assert path.read_bytes()[24] == 16 and Image.open(path).mode == "I;16"
    decoded = READERS[reader](path)
    assert (decoded == 255).mean() < 0.01  # a clipping conversion makes 99.6% of them white
    np.testing.assert_array_equal(decoded, high_bytes_as_rgb(pixels))


def test_gallery_thumbnail_of_a_16_bit_grayscale_png_matches_the_decoded_pixels(tmp_path):
    """A smooth 16-bit ramp (a plain conversion clips it to white) within the thumbnail's side, so the
    JPEG keeps the decoded pixels within a few grey levels."""
    ramp = np.linspace(0, 65535, 48 * 40).reshape(40, 48).astype(np.uint16)
    path = tmp_path / "ramp16.png"
    Image.fromarray(ramp).save(path)
    assert Image.open(path).mode == "I;16"
    with Image.open(io.BytesIO(thumbnail_jpeg(path, 64))) as thumbnail:
        shown = np.asarray(thumbnail.convert("RGB")).astype(int)
    assert (shown >= 250).mean() < 0.05  # the clipping conversion made 99.9% of them white
    assert np.abs(shown - np.asarray(open_rgb(path)).astype(int)).max() <= 8


@pytest.mark.parametrize("dtype, mode", [("<u2", "I;16"), (">u2", "I;16B"), ("<i4", "I")])
def test_16_bit_values_in_tiffs_keep_their_high_byte(tmp_path, dtype, mode):
    """Mode I (32-bit integers) is read as 16-bit data, as Pillow gives 16-bit grayscale in it."""
    pixels = sixteen_bit(1)
    Image.fromarray(pixels.astype(dtype)).save(tmp_path / "deep.tif")
    assert Image.open(tmp_path / "deep.tif").mode == mode
    np.testing.assert_array_equal(np.asarray(open_rgb(tmp_path / "deep.tif")), high_bytes_as_rgb(pixels))


def test_catalog_check_notes_the_16_bit_scaling(tmp_path):
    path = tmp_path / "gray16.png"
    Image.fromarray(sixteen_bit(1)).save(path)
    assert inspect_image(path) == ("ok", "16-bit I;16 image scaled to 8-bit RGB", 48, 40)


# ---- EXIF orientation ---------------------------------------------------------------------------

@pytest.mark.parametrize("reader", READERS)
@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path, orientation, reader):
    upright = smooth_image(UPRIGHT_SIZE)
    decoded = READERS[reader](write_oriented_jpeg(tmp_path / "turned.jpg", upright, orientation))
    assert decoded.shape == (UPRIGHT_SIZE[1], UPRIGHT_SIZE[0], 3)
    assert np.abs(decoded.astype(float) - np.asarray(upright, dtype=float)).mean() < 3


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_catalog_check_records_the_upright_size(tmp_path, orientation):
    path = write_oriented_jpeg(tmp_path / "turned.jpg", smooth_image(UPRIGHT_SIZE), orientation)
    assert inspect_image(path) == ("ok", None, *UPRIGHT_SIZE)


# ---- images over PIL's pixel limit --------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize("limit, pixels", [(1_000, "1,920"), (500, "1,920")], ids=["warning", "error"])
def test_image_over_a_lowered_pixel_limit_is_unreadable(tmp_path, monkeypatch, limit, pixels):
    """PIL only warns between its limit and twice the limit, and refuses above: both are unreadable."""
    path = tmp_path / "small.png"
    smooth_image((48, 40)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", limit)
    reason = f"too large to decode: {pixels} pixels, over the limit of {limit:,} (PIL.Image.MAX_IMAGE_PIXELS)"
    with pytest.raises(UnreadableImage, match=rf"^{path}: {reason}$".replace("(", r"\(").replace(")", r"\)")):
        open_rgb(path)
    assert inspect_image(path) == ("unreadable", reason, None, None)


def test_image_whose_header_claims_900_megapixels_is_unreadable(tmp_path):
    path = write_huge_png(tmp_path / "huge.png")
    assert path.stat().st_size < 1_000
    with pytest.raises(UnreadableImage) as error:
        open_rgb(path)
    assert str(error.value) == f"{path}: {HUGE_REASON}"


def test_parallel_catalog_check_reports_an_over_limit_image(tmp_path):
    smooth_image((40, 40)).save(tmp_path / "ok.jpg")
    write_huge_png(tmp_path / "huge.png")
    paths = [tmp_path / "ok.jpg", tmp_path / "huge.png"] * 2
    serial = inspect_images(paths, workers=1)
    assert serial[:2] == [("ok", None, 40, 40), ("unreadable", HUGE_REASON, None, None)]
    assert inspect_images(paths, workers=2, parallel_from=1) == serial


def write_nocaps_val(root, files: dict[str, callable]):
    """A NoCaps workspace whose val split holds these files (name -> writer of that path)."""
    folder = root / "data" / "nocaps"
    (folder / "val").mkdir(parents=True)
    images = [{"id": number, "file_name": name, "width": 1, "height": 1} for number, name in enumerate(files)]
    for name, write in files.items():
        write(folder / "val" / name)
    (folder / "nocaps_val_image_info.json").write_text(json.dumps({"images": images}))
    (folder / "nocaps_test_image_info.json").write_text(json.dumps({"images": []}))
    (folder / "nocaps_val_4500_captions.json").write_text(json.dumps({"images": images, "annotations": [
        {"image_id": number, "id": number, "caption": "a picture"} for number in range(len(files))]}))


def test_catalog_build_records_each_fault_and_finishes(tmp_path):
    write_nocaps_val(tmp_path, {
        "good.jpg": lambda path: smooth_image((40, 30)).save(path),
        "huge.png": write_huge_png,
        "turned.jpg": lambda path: write_oriented_jpeg(path, smooth_image(UPRIGHT_SIZE), 6),
        "gray16.png": lambda path: Image.fromarray(sixteen_bit(1)).save(path),
    })
    with Catalog(tmp_path / "catalog.duckdb") as catalog:
        summary = build_dataset(tmp_path, "nocaps", catalog, workers=1)
        _, rows = catalog.query("SELECT image_id, status, reason, width, height FROM images ORDER BY image_id")
    assert (summary.images, summary.usable) == (4, 3)
    assert rows == [("0", "ok", None, 40, 30), ("1", "unreadable", HUGE_REASON, 1, 1),
                    ("2", "ok", None, *UPRIGHT_SIZE), ("3", "ok", "16-bit I;16 image scaled to 8-bit RGB", 48, 40)]


def test_feature_cache_records_an_over_limit_image_as_unreadable(tmp_path):
    from ituning.backbones import BackboneSpec, load_vision_encoder
    from ituning.standins import save_vision_standin
    from pipeline.features import FeatureSettings, encode_features
    from storage.feature_cache import FeatureReader

    spec = BackboneSpec(vision_model=save_vision_standin(tmp_path / "vision", seed=0), vision_pretrained=None)
    for name in ("a", "c"):
        smooth_image((48, 40)).save(tmp_path / f"{name}.jpg")
    images = [("a", tmp_path / "a.jpg"), ("b", write_huge_png(tmp_path / "b.png")), ("c", tmp_path / "c.jpg")]
    settings = FeatureSettings(shard_size=2, encode=EncodeSettings(batch_size=2, num_workers=0))
    report = encode_features(images, spec, tmp_path / "cache", settings, encoder=load_vision_encoder(spec))
    assert report.unreadable == {"b": f"{tmp_path / 'b.png'}: {HUGE_REASON}"}
    assert list(FeatureReader(report.entry)) == ["a", "c"]


def test_captioning_skips_an_over_limit_image_and_captions_the_rest(tmp_path):
    smooth_image((48, 40)).save(tmp_path / "a.jpg")
    smooth_image((40, 48)).save(tmp_path / "c.jpg")
    paths = [tmp_path / "a.jpg", write_huge_png(tmp_path / "b.png"), tmp_path / "c.jpg"]
    captioner = RecordingCaptioner()
    assert captioner.caption_files(paths, batch_size=2) == [
        (paths[0], "a caption", None), (paths[1], None, f"{paths[1]}: {HUGE_REASON}"), (paths[2], "a caption", None)]
    assert [image.size for image in captioner.seen] == [(48, 40), (40, 48)]


def test_served_model_refuses_an_over_limit_image_as_a_bad_input(tmp_path):
    from mlflow.exceptions import MlflowException

    from pipeline.captioner_model import decode_image

    encoded = base64.b64encode(write_huge_png(tmp_path / "huge.png").read_bytes()).decode()
    with pytest.raises(MlflowException, match="900,000,000 pixels"):
        decode_image(encoded, accept_file_paths=False)


# ---- very large images: decoded at reduced size where they are resized anyway -------------------

@pytest.fixture
def decoded_sizes(monkeypatch) -> list[tuple[int, int]]:
    """The sizes JPEGs are decoded at (after draft mode chose a scale), once each."""
    sizes, load = [], JpegImagePlugin.JpegImageFile.load

    def recording_load(image):
        if image.size not in sizes:
            sizes.append(image.size)
        return load(image)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "load", recording_load)
    return sizes


def test_large_jpeg_is_decoded_at_reduced_size_for_the_caption_path(tmp_path, decoded_sizes):
    """Input side 64: a 2000 x 1200 JPEG is decoded at 1/8 scale, its shorter side kept >= 2 x 64."""
    big = smooth_image((2000, 1200))
    big.save(tmp_path / "big.jpg", quality=95)
    captioner = RecordingCaptioner(input_side=64)
    captioner.caption_files([tmp_path / "big.jpg"])
    assert decoded_sizes == [(250, 150)] and captioner.seen[0].size == (250, 150)
    reference = np.asarray(big.resize((250, 150), Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(captioner.seen[0], dtype=float) - reference).mean() < 3


def test_large_jpeg_is_decoded_at_reduced_size_for_the_feature_cache(tmp_path, decoded_sizes):
    smooth_image((1200, 2000)).save(tmp_path / "big.jpg")
    sizes = []
    transform = BytePixels(lambda image: sizes.append(image.size) or image.resize((64, 64)))
    pixels, _, _, error = ImageFiles([(0, "big", tmp_path / "big.jpg")], transform, torch.zeros(3, 64, 64), 64)[0]
    assert error == "" and pixels.shape == (3, 64, 64)
    assert decoded_sizes == [(150, 250)] and sizes == [(150, 250)]


def test_large_png_is_box_reduced_before_the_resize(tmp_path):
    """PNG has no reduced decode: the decoded image is box-reduced, its shorter side kept >= 2 x 64."""
    big = smooth_image((2000, 1200))
    big.save(tmp_path / "big.png")
    reduced = open_rgb(tmp_path / "big.png", min_side=64)
    assert 128 <= min(reduced.size) < 256
    reference = np.asarray(big.resize(reduced.size, Image.Resampling.BOX), dtype=float)
    assert np.abs(np.asarray(reduced, dtype=float) - reference).mean() < 2


@pytest.mark.parametrize("size, min_side", [((256, 300), 64), ((640, 480), 224), ((2000, 64), 64)])
@pytest.mark.parametrize("suffix", [".jpg", ".png"])
def test_images_up_to_four_times_the_input_side_decode_exactly_as_stored(tmp_path, size, min_side, suffix):
    """Only an image whose shorter side exceeds 4 x the input side is reduced; the rest, and so
    existing feature caches, keep the pixels of a full decode."""
    path = tmp_path / f"image{suffix}"
    smooth_image(size).save(path)
    with Image.open(path) as image:
        full = image.convert("RGB").tobytes()
    assert open_rgb(path, min_side).tobytes() == open_rgb(path).tobytes() == full
