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


@dataclass
class VisualMemory:
    """One module's keys and values for a batch of images (Eq. 2-3), computed once per image."""

    key: torch.Tensor  # (B_img, N, r)
    value: torch.Tensor  # (B_img, N, r)


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

    def visual_memory(self, visual: torch.Tensor) -> VisualMemory:
        return VisualMemory(self.key(visual), self.value(visual))

    def forward(self, x: torch.Tensor, memory: VisualMemory) -> torch.Tensor:
        """Δh for hidden states x (B, T, d). B may be a multiple of the images' batch (beams of
        one image are adjacent): their queries then share that image's keys and values."""
        batch, length, _ = x.shape
        images = memory.key.shape[0]
        query = self.query(x).reshape(images, 1, -1, self.query.out_features)  # (B_img, 1, g·T, r)
        attended = F.scaled_dot_product_attention(
            query, memory.key.unsqueeze(1), memory.value.unsqueeze(1), scale=self.attention_scaling
        )  # (B_img, 1, g·T, r)
        attended = attended.reshape(batch, length, -1)  # (B, T, r)
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

    def visual_memory(self, visual: torch.Tensor) -> list[VisualMemory]:
        """Keys and values of every module for visual tokens (B_img, N, d_v)."""
        return [layer.ituning.visual_memory(visual) for layer in self.wrapped_layers.values()]

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

    def forward(self, input_ids, visual=None, memory=None, **language_model_kwargs):
        """Run the language model conditioned on `visual` tokens, or on precomputed `memory`."""
        if memory is None and visual is not None:
            memory = self.visual_memory(visual)
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
