"""The frozen backbones: an open_clip vision encoder and a GPT-2-family language model.

Both load from a hub name or a local path. A name (`gpt2`, `ViT-B-16` with the `openai` tag, an
`hf-hub:org/name` open_clip repo) is downloaded from the Hugging Face hub (HF_ENDPOINT) into its cache
(HF_HOME) on first use and read from that cache afterwards, also offline (HF_HUB_OFFLINE=1). When the
weights are neither cached nor reachable, loading fails at once with one message naming the model and
how to pass a local copy, instead of retrying for half a minute.
"""

import json
import os
import socket
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ituning.compat import quiet_transformers

HUB_PROBE_TIMEOUT_S = 3.0
LOCAL_DIR = "local-dir:"
HF_HUB = "hf-hub:"
OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")

# (n_embd, n_layer, n_head) of the published GPT-2 checkpoints, for counting without a download.
GPT2_ARCHITECTURES = {
    "gpt2": (768, 12, 12),
    "gpt2-medium": (1024, 24, 16),
    "gpt2-large": (1280, 36, 20),
    "gpt2-xl": (1600, 48, 25),
    "distilgpt2": (768, 6, 12),
}


class BackboneUnavailable(RuntimeError):
    """A backbone is neither in the local cache nor downloadable, or its local path is wrong."""


@dataclass(frozen=True)
class BackboneSpec:
    vision_model: str = "ViT-B-16"  # an open_clip name, or local-dir:/path (open_clip format)
    vision_pretrained: str | None = "openai"  # an open_clip tag or a weights file
    language_model: str = "gpt2"  # a transformers name or a local directory

    def to_dict(self) -> dict:
        return asdict(self)

    def relative_to(self, root: str | Path) -> "BackboneSpec":
        """The spec with every local path inside `root` (the workspace) written relative to it, as a
        config names the workspace's backbones (`local-dir:backbones/vision`): what is stored."""
        return self._with_paths(lambda path: _inside(path, root))

    def located(self, base: str | Path) -> "BackboneSpec":
        """The spec with every relative local path that exists under `base` made absolute there:
        what is loaded. Hub names, and paths `base` does not hold, stay as they are."""
        return self._with_paths(lambda path: _under(path, base))

    def _with_paths(self, rewrite) -> "BackboneSpec":
        vision = self.vision_model
        if vision.startswith(LOCAL_DIR):
            vision = LOCAL_DIR + (rewrite(vision[len(LOCAL_DIR):]) or vision[len(LOCAL_DIR):])
        pretrained = self.vision_pretrained and (rewrite(self.vision_pretrained) or self.vision_pretrained)
        return BackboneSpec(vision, pretrained, rewrite(self.language_model) or self.language_model)


def _inside(path: str, root: str | Path) -> str | None:
    """`path` relative to `root` when it is an absolute path inside it."""
    if not os.path.isabs(path):
        return None
    relative = os.path.relpath(os.path.realpath(path), os.path.realpath(root))
    return None if relative == os.curdir or relative.startswith(os.pardir) else relative


def _under(path: str, base: str | Path) -> str | None:
    """The absolute path of a relative `path` that exists under `base`."""
    candidate = Path(base) / path
    return str(candidate.resolve()) if not os.path.isabs(path) and candidate.exists() else None


class VisionEncoder(nn.Module):
    """A frozen open_clip ViT yielding all final-layer tokens: class token + patches, after ln_post,
    before the projection. (B, 3, H, W) -> (B, 1 + patches, width)."""

    def __init__(self, clip_model: nn.Module, preprocess, spec: BackboneSpec):
        super().__init__()
        self.visual = clip_model.visual
        self.preprocess = preprocess  # PIL image -> (3, H, W) tensor
        self.spec = spec
        self.width = self.visual.transformer.width
        self.requires_grad_(False)
        self.eval()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(
            pixels,
            indices=1,
            output_fmt="NLC",
            normalize_intermediates=True,
            intermediates_only=True,
            output_extra_tokens=True,
        )
        patches = out["image_intermediates"][-1]  # (B, P, width)
        class_token = out["image_intermediates_prefix"][-1]  # (B, 1, width)
        return torch.cat([class_token, patches], dim=1)  # (B, 1 + P, width)


def hub_reachable() -> bool:
    """One short connection attempt to the Hugging Face endpoint that huggingface_hub uses (HF_ENDPOINT,
    read when it is imported). False in offline mode (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE)."""
    import huggingface_hub.constants as hub_constants

    if hub_constants.is_offline_mode() or any(
        os.environ.get(name, "").lower() in {"1", "true", "yes", "on"} for name in OFFLINE_VARIABLES
    ):
        return False
    endpoint = urlparse(hub_constants.ENDPOINT)
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=HUB_PROBE_TIMEOUT_S).close()
        return True
    except OSError:
        return False


@contextmanager
def _hub_offline_unless_reachable():
    """Within the block, Hugging Face downloads use the local cache only if the hub is unreachable."""
    import huggingface_hub.constants as hub_constants

    offline, saved = not hub_reachable(), hub_constants.HF_HUB_OFFLINE
    hub_constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield offline
    finally:
        hub_constants.HF_HUB_OFFLINE = saved


def _unavailable(what: str, name: str, error: Exception, how: str) -> BackboneUnavailable:
    return BackboneUnavailable(
        f"Cannot load the {what} '{name}': it is not in the local cache and could not be downloaded "
        f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). {how}"
    )


def load_vision_encoder(spec: BackboneSpec = BackboneSpec(), device: str = "cpu") -> VisionEncoder:
    model, preprocess = create_open_clip(
        spec.vision_model, spec.vision_pretrained, device, "vision encoder",
        "Pass a local copy: --vision local-dir:/path/to/open_clip_folder, or "
        "--vision-pretrained /path/to/weights.safetensors.")
    return VisionEncoder(model, preprocess, spec).to(device)


def create_open_clip(name: str, pretrained: str | None, device: str, role: str, remedy: str):
    """(model, evaluation preprocess) of an open_clip model: a name with a pretrained tag or weights
    file, `local-dir:FOLDER` or `hf-hub:ORG/NAME`. Raises BackboneUnavailable naming `role` and the
    `remedy` when it cannot be had."""
    import open_clip

    if name.startswith(LOCAL_DIR) and not (Path(name[len(LOCAL_DIR) :]) / "open_clip_config.json").is_file():
        raise BackboneUnavailable(f"{name}: no open_clip_config.json in that folder")
    if name.startswith((LOCAL_DIR, HF_HUB)):
        pretrained = None  # the folder or hub repo holds its own weights
    elif pretrained and _looks_like_path(pretrained) and not Path(pretrained).is_file():
        raise BackboneUnavailable(f"{role} weights file not found: {pretrained}")
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(30)  # URL downloads in open_clip have no timeout of their own
    try:
        with _hub_offline_unless_reachable():
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=pretrained, device=device, **_weight_options(open_clip, name, pretrained)
            )
    except (OSError, RuntimeError, ValueError) as error:
        if "not found" in str(error) and "config" in str(error).lower():
            raise BackboneUnavailable(f"unknown open_clip model '{name}': {error}") from error
        raise _unavailable(role, f"{name} ({pretrained})" if pretrained else name, error, remedy) from error
    finally:
        socket.setdefaulttimeout(previous_timeout)
    return model, preprocess


def _weight_options(open_clip, name: str, pretrained: str | None) -> dict:
    """Named weights must load: for a hub repo open_clip only logs a failed weights download and goes
    on with random ones. Weights trained with QuickGELU (OpenAI's) run with it: open_clip only warns."""
    tag = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    return {"require_pretrained": bool(pretrained) or name.startswith(HF_HUB),
            "force_quick_gelu": bool(tag.get("quick_gelu", False))}


def load_language_model(name_or_path: str, device: str = "cpu"):
    """A GPT-2-family LM head model and its tokenizer, frozen, in eval mode."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    quiet_transformers()
    local = Path(name_or_path).is_dir()
    if _looks_like_path(name_or_path) and not local:
        raise BackboneUnavailable(f"language model folder not found: {name_or_path}")
    offline = local or not hub_reachable()
    try:
        model = GPT2LMHeadModel.from_pretrained(name_or_path, local_files_only=offline)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, local_files_only=offline)
    except OSError as error:
        raise _unavailable(
            "language model", name_or_path, error,
            "Pass a local folder holding config.json, the weights and the tokenizer files: "
            "--lm /path/to/gpt2 (or set HF_HOME to a cache that has it).",
        ) from error
    model.requires_grad_(False)
    return model.to(device).eval(), tokenizer


def language_model_dimensions(name_or_path: str) -> tuple[int, int, int]:
    """(n_embd, n_layer, n_head) without downloading weights: built-in for the GPT-2 family,
    read from config.json for a local folder."""
    config_file = Path(name_or_path) / "config.json"
    if config_file.is_file():
        config = json.loads(config_file.read_text())
        return config["n_embd"], config["n_layer"], config["n_head"]
    key = name_or_path.removeprefix("openai-community/")
    if key in GPT2_ARCHITECTURES:
        return GPT2_ARCHITECTURES[key]
    raise BackboneUnavailable(
        f"unknown language model '{name_or_path}': use one of {sorted(GPT2_ARCHITECTURES)} "
        "or a local folder with config.json"
    )


def vision_width(model_name: str) -> int:
    """The vision tower's token width, from the open_clip configuration alone."""
    if model_name.startswith(LOCAL_DIR):
        config = json.loads((Path(model_name[len(LOCAL_DIR) :]) / "open_clip_config.json").read_text())
        config = config.get("model_cfg", config)
    else:
        import open_clip

        try:
            with _hub_offline_unless_reachable():  # an hf-hub: name downloads its open_clip_config.json
                config = open_clip.get_model_config(model_name)
        except (OSError, RuntimeError) as error:
            raise _unavailable("vision encoder configuration", model_name, error,
                               "Pass a local copy: --vision local-dir:/path/to/open_clip_folder.") from error
        if config is None:
            raise BackboneUnavailable(f"unknown open_clip model '{model_name}'")
    return config["vision_cfg"]["width"]


def _looks_like_path(value: str) -> bool:
    """Hub names look like `org/name`; paths are absolute, relative with a dot, or weight files."""
    return value.startswith(("/", ".", "~")) or value.endswith((".safetensors", ".pt", ".bin"))
