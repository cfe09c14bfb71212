"""I-Tuning: a frozen GPT-2 tuned by an image through small parallel cross-attention modules.

Paper: "I-Tuning: Tuning Frozen Language Models with Image for Lightweight Image Captioning"
(Luo et al., ICASSP 2023). In every kept GPT-2 layer, beside the feed-forward (MLP):

    Q  = W_q X + b_q              (1)   X: the MLP's input, ln_2(h)          (B, T, d)
    K  = W_k V + b_k              (2)   V: the image's CLIP-ViT tokens       (B, N, d_v)
    V' = W_v V + b_v              (3)
    S  = softmax(Q Kᵀ / √r)       (4)   r: bottleneck width, d/2 by default
    Δh = λ · W_o (S V') + b_o     (5)   added to the MLP's output

The paper writes softmax(Q Kᵀ); the 1/√r scaling is a config value (`scale_attention`, on by
default: unscaled scores grow with r and saturate the softmax of a freshly initialised module).
W_o starts at zero (`zero_init_output`), so training starts from the unchanged language model,
as adapters and LoRA do; λ then multiplies how fast Δh grows. λ = 4 follows the parallel-adapter
scaling of He et al. (2022); the paper only says λ > 1.

"I-Tuning Dropping" leaves the first `drop_first` layers without modules. Only the modules train.

K and V depend on the image alone, so each module computes them once per image and every row that
shows the image attends to them: the beams of an image in decoding, its captions in training (an
image's rows are laid side by side as one long query sequence, see `ImageGroups`).
"""

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ITuningConfig:
    bottleneck: int | None = None  # r; None means d_model // 2, the paper's choice
    scale: float = 4.0  # λ in Eq. 5
    scale_attention: bool = True  # divide Q Kᵀ by √r in Eq. 4
    zero_init_output: bool = True  # W_o = 0: Δh = b_o = 0 before the first step
    drop_first: int = 0  # I-Tuning Dropping: no modules in the first k layers


@dataclass(frozen=True)
class ImageGroups:
    """Which image each row of a batch shows, when rows are not the images' equal adjacent blocks
    (captions of a micro-batch: several per image, uneven counts, any order).

    The rows of one image are placed on a grid (B_img, per_image, T), padded with zero queries where
    an image has fewer rows; an image's rows then attend to its keys and values as one sequence,
    exactly as adjacent beams do, and the padding's outputs are dropped."""

    image_index: torch.Tensor  # (B,) the image of each row
    slot: torch.Tensor  # (B,) the row's place among its image's rows
    per_image: int  # the most rows of any one image

    @classmethod
    def of(cls, image_index: torch.Tensor, images: int) -> "ImageGroups":
        if image_index.dim() != 1 or image_index.numel() == 0:
            raise ValueError(f"image_index must be a non-empty 1-D tensor, got shape {tuple(image_index.shape)}")
        low, high = int(image_index.min()), int(image_index.max())
        if low < 0 or high >= images:
            raise ValueError(f"image_index must lie in [0, {images}) for {images} images' visual tokens, "
                             f"got [{low}, {high}]")
        counts = torch.bincount(image_index, minlength=images)  # (B_img,)
        first_row = counts.cumsum(0) - counts  # where each image's rows start once sorted by image
        order = torch.argsort(image_index, stable=True)
        rank = torch.arange(len(image_index), device=image_index.device)
        slot = torch.empty_like(image_index)
        slot[order] = rank - first_row[image_index[order]]
        return cls(image_index, slot, int(counts.max()))

    def to(self, device) -> "ImageGroups":
        """On `device`; built on the host from a batch's image index, the groups cost the device no
        wait (`per_image` is a number the host already knows) and a compiled step no graph break."""
        return ImageGroups(self.image_index.to(device, non_blocking=True), self.slot.to(device, non_blocking=True),
                           self.per_image)


@dataclass
class VisualMemory:
    """One module's keys and values for a batch of images (Eq. 2-3), computed once per image."""

    key: torch.Tensor  # (B_img, N, r)
    value: torch.Tensor  # (B_img, N, r)
    groups: ImageGroups | None = None  # None: the rows are B_img equal adjacent blocks (beams)

    def queries_by_image(self, query: torch.Tensor) -> torch.Tensor:
        """Queries (B, T, r) as one sequence per image: (B_img, 1, g·T, r)."""
        images, width = self.key.shape[0], query.shape[-1]
        if self.groups is None:
            return query.reshape(images, 1, -1, width)  # (B_img, 1, g·T, r)
        grid = query.new_zeros(images, self.groups.per_image, query.shape[1], width)  # (B_img, g, T, r)
        grid = grid.index_put((self.groups.image_index, self.groups.slot), query)
        return grid.reshape(images, 1, -1, width)  # (B_img, 1, g·T, r)

    def rows(self, attended: torch.Tensor, batch: int, length: int) -> torch.Tensor:
        """The inverse of `queries_by_image`: (B_img, 1, g·T, r) back to the batch's rows (B, T, r)."""
        if self.groups is None:
            return attended.reshape(batch, length, -1)  # (B, T, r)
        grid = attended.reshape(attended.shape[0], self.groups.per_image, length, -1)  # (B_img, g, T, r)
        return grid[self.groups.image_index, self.groups.slot]  # (B, T, r)


class ITuningModule(nn.Module):
    """The bottleneck cross-attention of Eq. 1-5."""

    def __init__(self, d_model: int, d_visual: int, bottleneck: int, config: ITuningConfig):
        super().__init__()
        self.query = nn.Linear(d_model, bottleneck)
        self.key = nn.Linear(d_visual, bottleneck)
        self.value = nn.Linear(d_visual, bottleneck)
        self.output = nn.Linear(bottleneck, d_model, bias=False)
        self.output_bias = nn.Parameter(torch.zeros(d_model))
        self.scale = config.scale
        self.attention_scaling = 1 / math.sqrt(bottleneck) if config.scale_attention else 1.0
        if config.zero_init_output:
            nn.init.zeros_(self.output.weight)

    def visual_memory(self, visual: torch.Tensor, groups: ImageGroups | None = None) -> VisualMemory:
        return VisualMemory(self.key(visual), self.value(visual), groups)

    def forward(self, x: torch.Tensor, memory: VisualMemory) -> torch.Tensor:
        """Δh for hidden states x (B, T, d). Several rows may show one image (its beams, adjacent and
        equally many; or its captions, as `memory.groups` says): they share its keys and values."""
        batch, length, _ = x.shape
        query = memory.queries_by_image(self.query(x))  # (B_img, 1, g·T, r)
        attended = F.scaled_dot_product_attention(
            query, memory.key.unsqueeze(1), memory.value.unsqueeze(1), scale=self.attention_scaling
        )  # (B_img, 1, g·T, r)
        attended = memory.rows(attended, batch, length)  # (B, T, r)
        return self.scale * self.output(attended) + self.output_bias

    def attention_weights(self, x: torch.Tensor, memory: VisualMemory) -> torch.Tensor:
        """S of Eq. 4 for x (B_img, T, d): (B_img, T, N). Used for the attention heatmaps."""
        scores = self.query(x) @ memory.key.transpose(1, 2) * self.attention_scaling
        return scores.softmax(dim=-1)


class MLPWithITuning(nn.Module):
    """A GPT-2 block's feed-forward with the I-Tuning branch beside it: mlp(x) + Δh(x, V).

    GPT-2 calls its MLP with exactly ln_2(h) and adds the result to the residual, so wrapping
    `block.mlp` is the paper's parallel placement. Without visual memory (the caption-blind
    baseline) the wrapper is the plain MLP.
    """

    def __init__(self, mlp: nn.Module, module: ITuningModule):
        super().__init__()
        self.mlp = mlp
        self.ituning = module
        self.memory: VisualMemory | None = None
        self.recorded_attention: list[torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.mlp(x)
        if self.memory is None:
            return out
        if self.recorded_attention is not None:
            self.recorded_attention.append(self.ituning.attention_weights(x, self.memory))
        return out + self.ituning(x, self.memory)


class ITuningCaptioner(nn.Module):
    """A frozen GPT-2 language model with I-Tuning modules in its kept layers."""

    def __init__(self, language_model: nn.Module, visual_width: int, config: ITuningConfig):
        super().__init__()
        blocks = language_model.transformer.h
        if not 0 <= config.drop_first < len(blocks):
            raise ValueError(
                f"drop_first={config.drop_first} must leave at least one of the {len(blocks)} layers"
            )
        d_model = language_model.config.n_embd
        bottleneck = config.bottleneck or d_model // 2
        for index in range(config.drop_first, len(blocks)):
            module = ITuningModule(d_model, visual_width, bottleneck, config)
            blocks[index].mlp = MLPWithITuning(blocks[index].mlp, module)
        self.language_model = language_model
        self.config = config
        self.visual_width = visual_width
        self.bottleneck = bottleneck
        freeze_all_but_ituning(self)

    @property
    def wrapped_layers(self) -> dict[int, MLPWithITuning]:
        return {
            index: block.mlp
            for index, block in enumerate(self.language_model.transformer.h)
            if isinstance(block.mlp, MLPWithITuning)
        }

    def visual_memory(self, visual: torch.Tensor, image_index: torch.Tensor | None = None,
                      groups: ImageGroups | None = None) -> list[VisualMemory]:
        """Keys and values of every module for visual tokens (B_img, N, d_v), once per image.
        `image_index` (B,) names the image of each row the model will run on (or `groups`, built
        from it beforehand); without either the rows are the images' equal adjacent blocks (one row
        per image, or its beams)."""
        if groups is None and image_index is not None:
            groups = ImageGroups.of(image_index, visual.shape[0])
        return [layer.ituning.visual_memory(visual, groups) for layer in self.wrapped_layers.values()]

    @contextmanager
    def conditioned_on(self, memory: list[VisualMemory] | None):
        layers = list(self.wrapped_layers.values())
        for layer, layer_memory in zip(layers, memory or [None] * len(layers)):
            layer.memory = layer_memory
        try:
            yield
        finally:
            for layer in layers:
                layer.memory = None

    def forward(self, input_ids, visual=None, memory=None, image_index=None, image_groups=None,
                **language_model_kwargs):
        """Run the language model conditioned on `visual` tokens, or on precomputed `memory`.

        `visual` holds one row per row of input_ids, or, with `image_index` (B,) or the
        `image_groups` built from it, one per distinct image (B_img, N, d_v), row b of input_ids
        showing image image_index[b]."""
        if memory is None and visual is not None:
            memory = self.visual_memory(visual, image_index, image_groups)
        with self.conditioned_on(memory):
            return self.language_model(input_ids=input_ids, **language_model_kwargs)

    def ituning_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable weights only, keyed `layers.<index>.<parameter>`."""
        return {
            f"layers.{index}.{name}": tensor
            for index, layer in self.wrapped_layers.items()
            for name, tensor in layer.ituning.state_dict().items()
        }

    def load_ituning_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.ituning_state_dict()
        missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
        if missing or unexpected:
            raise ValueError(
                f"I-Tuning weights do not fit this model: missing {sorted(missing)[:4]}, "
                f"unexpected {sorted(unexpected)[:4]}"
            )
        for key, tensor in state.items():
            if expected[key].shape != tensor.shape:
                raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(expected[key].shape)}")
        with torch.no_grad():
            for key, tensor in state.items():
                expected[key].copy_(tensor)


def freeze_all_but_ituning(model: nn.Module) -> None:
    """The explicit trainable set: every parameter frozen except the I-Tuning modules'."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for submodule in model.modules():
        if isinstance(submodule, ITuningModule):
            for parameter in submodule.parameters():
                parameter.requires_grad_(True)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [parameter for parameter in model.parameters() if parameter.requires_grad]


def count_trainable(model: nn.Module) -> int:
    return sum(parameter.numel() for parameter in trainable_parameters(model))
