"""Where the model looks while writing each word: cross-attention heatmaps over the image.

The attention S of Eq. 4 in the last I-Tuning module, for the query at the position that predicts
each caption token, over the image's patch tokens (the class token is left out), laid out on the
patch grid and drawn over the image as the encoder saw it (resized and centre-cropped).
"""

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ituning.decoding import DecodingConfig, generate
from ituning.images import open_rgb


@dataclass(frozen=True)
class TokenAttention:
    tokens: list[str]  # each caption token as text
    maps: np.ndarray  # (T, grid_h, grid_w): attention over the patches, a row per token


def patch_grid(weights: torch.Tensor) -> np.ndarray:
    """(T, 1 + P) attention over class token + patches -> (T, g, g) over the patch grid."""
    patches = weights[:, 1:]  # (T, P): the class token has no place on the image
    grid = math.isqrt(patches.shape[1])
    if grid * grid != patches.shape[1]:
        raise ValueError(f"{patches.shape[1]} patch tokens do not form a square grid")
    return patches.reshape(-1, grid, grid).float().cpu().numpy()  # (T, g, g)


@torch.inference_mode()
def caption_attention(captioner, image: Image.Image, caption: str | None = None,
                      decoding: DecodingConfig = DecodingConfig()) -> TokenAttention:
    """Attention of the last module for each token of `caption`, or of the caption the
    captioner generates for the image when none is given."""
    visual = captioner.encode_images([image]).to(next(captioner.model.parameters()).dtype)  # (1, 1 + P, d_v)
    if caption is None:
        token_ids = generate(captioner.model, visual, captioner.prompt_ids(), captioner.eos_id, decoding)[0]
    else:
        token_ids = captioner.tokenizer(caption, add_special_tokens=False)["input_ids"]
    return token_attention(captioner, visual, token_ids)


@torch.inference_mode()
def token_attention(captioner, visual: torch.Tensor, token_ids: list[int]) -> TokenAttention:
    """Attention of the last module for each of `token_ids` (a caption without prompt and EOS) on
    one image's visual tokens (1, 1 + P, d_v)."""
    if not token_ids:
        return TokenAttention([], np.zeros((0, 0, 0), dtype=np.float32))
    visual = visual.to(captioner.device, dtype=next(captioner.model.parameters()).dtype)
    prompt = captioner.prompt_ids()  # (1, 1)
    input_ids = torch.cat([prompt, torch.tensor([token_ids], device=captioner.device)], dim=1)  # (1, 1 + T)
    last_module = list(captioner.model.wrapped_layers.values())[-1]
    last_module.recorded_attention = []
    try:
        captioner.model(input_ids[:, :-1], visual=visual)  # position i predicts token i
        weights = last_module.recorded_attention[0][0]  # (T, 1 + P)
    finally:
        last_module.recorded_attention = None
    tokens = [captioner.tokenizer.decode([token_id]).strip() for token_id in token_ids]
    return TokenAttention(tokens, patch_grid(weights))


HEATMAP_DPI = 120  # a 4-column grid is about 1150 px wide: each panel readable at its own size


def encoder_view(image: Image.Image, size: int = 224) -> Image.Image:
    """The square, centre-cropped image that the patch grid covers."""
    return ImageOps.fit(image.convert("RGB"), (size, size), method=Image.Resampling.BICUBIC)


def heatmap_overlay(view: Image.Image, heat: np.ndarray, opacity: float = 0.5) -> Image.Image:
    """One token's attention map (grid_h, grid_w), stretched bilinearly over the encoder's view of
    the image and blended onto it in the 'jet' colours of `save_heatmaps`."""
    from matplotlib import colormaps

    span = float(heat.max() - heat.min())
    scaled = (heat - heat.min()) / span if span > 0 else np.zeros_like(heat)
    small = Image.fromarray(np.uint8(np.clip(scaled, 0, 1) * 255))
    stretched = np.asarray(small.resize(view.size, Image.Resampling.BILINEAR)) / 255.0  # (H, W)
    colours = Image.fromarray(np.uint8(colormaps["jet"](stretched)[..., :3] * 255))
    return Image.blend(view.convert("RGB"), colours, opacity)


def save_heatmaps(image: Image.Image, attention: TokenAttention, path: str | Path, columns: int = 4) -> Path:
    """One PNG: the image, then one panel per token with its attention map over the image."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    view = np.asarray(encoder_view(image))
    panels = len(attention.tokens) + 1
    rows = math.ceil(panels / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(2.4 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.flat:
        axis.axis("off")
    axes.flat[0].imshow(view)
    axes.flat[0].set_title("image", fontsize=12)
    extent = (0, view.shape[1], view.shape[0], 0)
    for axis, token, heat in zip(axes.flat[1:], attention.tokens, attention.maps):
        axis.imshow(view)
        axis.imshow(heat, cmap="jet", alpha=0.5, extent=extent, interpolation="bilinear")
        axis.set_title(token or "␣", fontsize=13)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.tight_layout()
    figure.savefig(path, dpi=HEATMAP_DPI)
    plt.close(figure)
    return path


def render_heatmaps(captioner, image_paths: dict[str, Path], captions: dict[str, str], out_dir: str | Path,
                    limit: int | None = 8) -> dict[str, Path]:
    """One heatmap PNG per captioned image (the first `limit` by image_id): out_dir/<image_id>.png."""
    out_dir = Path(out_dir)
    written = {}
    for image_id in sorted(key for key in captions if key in image_paths)[:limit]:
        image = open_rgb(image_paths[image_id])
        attention = caption_attention(captioner, image, captions[image_id])
        safe_name = "".join(c if c.isalnum() or c in "-_." else "_" for c in image_id)
        written[image_id] = save_heatmaps(image, attention, out_dir / f"{safe_name}.png")
    return written
