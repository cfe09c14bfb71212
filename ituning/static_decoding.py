"""A decoding step over a static key/value cache whose one-token forward can be compiled.

`CachedStep` grows GPT-2's cache by concatenation and reorders beams into new tensors, so every
step allocates, and a beam-5 step of GPT-2 small is a few hundred small kernel launches: on a GPU
the launches, not the arithmetic, set the speed. `StaticCacheStep` gives the one-token forward
tensors whose shapes and addresses never change for a batch shape:

- the key/value cache of every row (images x beams) for prompt + max_new_tokens positions,
  transformers' `StaticCache` (its position counter is a tensor, advanced in place, from which
  the new token's position ids are given explicitly);
- every module's visual keys/values, computed once per image and copied into fixed buffers;
- the new tokens, copied into a fixed buffer.

Beams are reordered in place: index_select, then copy_ back into the same storage (only the
positions written so far move). With nothing reallocated, the forward is wrapped by
`torch.compile(mode="reduce-overhead")`: on CUDA it is captured once and replayed as a CUDA graph,
one launch per step; on CPU inductor compiles it without graphs.

Batch sizes: the buffers of a batch shape (a "decoder") are kept per model and reused by later
batches. A batch with fewer images is padded to the smallest kept decoder that holds it (the
padding rows are computed and dropped), so the last, partial batch of an evaluation replays the
full batch's graph instead of compiling and capturing another. A batch larger than every kept
decoder builds (and compiles) a new one.
"""

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn

from ituning.fast_paths import STATIC_DECODING
from ituning.model import ITuningCaptioner, VisualMemory

COMPILE_SETTINGS = ("auto", "never", "always")


def _log_probs(language_model: nn.Module, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Next-token log-probabilities (rows, vocab) for `tokens` (rows, T) written at the cache's position."""
    position = cache.layers[0].cumulative_length  # the first free position, a 0-d tensor on the device
    position_ids = (torch.arange(tokens.shape[1], device=tokens.device) + position)[None]  # (1, T)
    output = language_model(input_ids=tokens, past_key_values=cache, position_ids=position_ids, use_cache=True)
    return output.logits[:, -1].float().log_softmax(dim=-1)


def static_cache_supported() -> bool:
    """Whether transformers' StaticCache keeps its write position as a tensor it advances in place,
    as transformers 5.23 does (earlier releases took the position as an argument not passed here)."""
    from transformers.cache_utils import StaticLayer

    try:
        return isinstance(getattr(StaticLayer(max_cache_len=1), "cumulative_length", None), torch.Tensor)
    except TypeError:
        return False


def compile_one_token_forward(forward):
    """The one-token forward, compiled: CUDA graphs on CUDA (reduce-overhead); shapes stay static."""
    return torch.compile(forward, mode="reduce-overhead", dynamic=False)


@dataclass(frozen=True)
class _Layout:
    """What must match for a batch to reuse a decoder (any number of images up to its own)."""

    beams: int
    positions: int  # prompt + max_new_tokens
    memory_shapes: tuple  # each module's (N, r) of visual keys/values
    dtype: torch.dtype
    device: torch.device
    compile: str  # one of COMPILE_SETTINGS


@dataclass
class _ModelDecoders:
    """The decoders kept for one model, and whether compiling already failed for it."""

    decoders: list = field(default_factory=list)
    compile_failed: bool = False


# Keyed by the model without holding it: a decoder keeps no reference to its model.
_kept: "weakref.WeakKeyDictionary[nn.Module, _ModelDecoders]" = weakref.WeakKeyDictionary()


class _StaticDecoder:
    """The fixed tensors of one batch shape and the (compiled) forward that reads them."""

    def __init__(self, model: ITuningCaptioner, memory: list[VisualMemory], layout: _Layout, shelf: _ModelDecoders):
        from transformers import StaticCache

        if not static_cache_supported():
            raise RuntimeError("static-cache decoding needs a transformers whose StaticCache tracks its position as "
                               "a tensor (5.23 does); set DecodingConfig.compile='never' to decode with CachedStep")
        self.layout, self.shelf = layout, shelf
        self.images = memory[0].key.shape[0]
        rows = self.images * layout.beams
        config = model.language_model.config
        self.cache = StaticCache(config=config, max_cache_len=layout.positions)
        head_width = config.n_embd // config.n_head
        self.cache.early_initialization(rows, config.n_head, head_width, layout.dtype, layout.device)
        self.memory = [VisualMemory(torch.zeros_like(m.key), torch.zeros_like(m.value)) for m in memory]
        self.tokens = torch.zeros(rows, 1, dtype=torch.long, device=layout.device)  # (rows, 1)
        for tensor in self._fixed_inputs():
            torch._dynamo.mark_static_address(tensor)  # read in place by the graph, never copied in
        self.compiled = None
        if layout.compile == "always" or (layout.compile == "auto" and not shelf.compile_failed):
            try:
                self.compiled = compile_one_token_forward(_log_probs)
            except Exception as error:  # e.g. a Python that torch.compile does not support
                self._stop_compiling(error)
        self.user: weakref.ref | None = None

    def _fixed_inputs(self):
        yield self.tokens
        for layer_memory in self.memory:
            yield from (layer_memory.key, layer_memory.value)

    @property
    def in_use(self) -> bool:
        return self.user is not None and self.user() is not None

    def load(self, memory: list[VisualMemory]) -> None:
        """A new batch: its images' keys/values in the first slots, the cache emptied."""
        images = memory[0].key.shape[0]
        for fixed, batch in zip(self.memory, memory):
            fixed.key[:images].copy_(batch.key)
            fixed.value[:images].copy_(batch.value)
        self.cache.reset()

    def prefill(self, model: ITuningCaptioner, sequences: torch.Tensor) -> torch.Tensor:
        """The prompt (rows, P), eagerly; padding rows repeat the first row."""
        rows = sequences.shape[0]
        tokens = sequences[:1].expand(self.tokens.shape[0], -1).clone()  # (rows_fixed, P)
        tokens[:rows] = sequences
        with model.conditioned_on(self.memory):
            return _log_probs(model.language_model, tokens, self.cache)[:rows]

    def reorder(self, beam_sources: torch.Tensor, filled: int) -> None:
        """Row b takes the cache of row beam_sources[b], written back into the same storage."""
        for layer in self.cache.layers:
            for stored in (layer.keys, layer.values):  # (rows_fixed, heads, positions, head_dim)
                written = stored[: len(beam_sources), :, :filled]
                written.copy_(written.index_select(0, beam_sources))

    def advance(self, model: ITuningCaptioner, new_tokens: torch.Tensor, filled: int) -> torch.Tensor:
        """Log-probabilities after one new token per row (rows, 1), written at position `filled`."""
        rows = new_tokens.shape[0]
        self.tokens[:rows].copy_(new_tokens)
        with model.conditioned_on(self.memory):
            if self.compiled is None:
                return _log_probs(model.language_model, self.tokens, self.cache)[:rows]
            try:
                torch.compiler.cudagraph_mark_step_begin()
                # A graph's output is overwritten by its next replay: the caller gets its own copy.
                return self.compiled(model.language_model, self.tokens, self.cache)[:rows].clone()
            except Exception as error:
                self._stop_compiling(error)
                for layer in self.cache.layers:
                    layer.cumulative_length.fill_(filled)  # the failed call may have advanced it
                return _log_probs(model.language_model, self.tokens, self.cache)[:rows]

    def _stop_compiling(self, error: Exception) -> None:
        """'always' fails loudly; 'auto' records the fallback (one warning line, ituning/fast_paths.py)
        and decodes this model eagerly over the static cache from here on."""
        message = (f"compiling the decoding step failed on {self.layout.device} "
                   f"(DecodingConfig.compile={self.layout.compile!r}): {type(error).__name__}: "
                   f"{str(error).strip()[:500]}")
        if self.layout.compile == "always":
            raise RuntimeError(f"{message}. Set DecodingConfig.compile='never' (or 'auto') to decode without "
                               "compiling; on CPU compiling needs a working C++ compiler.") from error
        STATIC_DECODING.failed_later("auto", RuntimeError(f"{message}; decoding with the uncompiled static "
                                                         "cache instead"))
        self.shelf.compile_failed = True
        for decoder in [self, *self.shelf.decoders]:
            if decoder.layout.compile == "auto":
                decoder.compiled = None


def _decoder_for(model: ITuningCaptioner, memory: list[VisualMemory], layout: _Layout) -> _StaticDecoder:
    """The smallest free kept decoder that holds the batch, or a new one of the batch's size."""
    shelf = _kept.setdefault(model, _ModelDecoders())
    images = memory[0].key.shape[0]
    fitting = [d for d in shelf.decoders if d.layout == layout and d.images >= images and not d.in_use]
    if fitting:
        return min(fitting, key=lambda decoder: decoder.images)
    decoder = _StaticDecoder(model, memory, layout, shelf)
    shelf.decoders.append(decoder)
    return decoder


def kept_decoder_sizes(model: nn.Module) -> list[int]:
    """The images per batch of every decoder kept for `model` (a smaller batch is padded to one)."""
    shelf = _kept.get(model)
    return [] if shelf is None else [decoder.images for decoder in shelf.decoders]


def computed_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The dtype the layers' keys and values come out in: autocast's, when it is on (an evaluation
    under bf16 autocast of float32 weights), else the weights'."""
    device_type = parameter.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return parameter.dtype


class StaticCacheStep:
    """Next-token log-probabilities over a preallocated key/value cache (the `CachedStep` protocol:
    `step(model, visual)`, then `step(sequences, beam_sources) -> (rows, vocab)`).

    `max_new_tokens` sizes the cache (the decoding's max_length). `compile` says whether the
    one-token forward is compiled: "never" eager; "always" compiled, a failure to compile raises;
    "auto" compiled, a failure warns once and decodes eagerly (the device is chosen by
    `ituning.decoding.decoding_step`, which uses this step for "auto" on CUDA only)."""

    def __init__(self, model: ITuningCaptioner, visual: torch.Tensor, max_new_tokens: int, compile: str = "never"):
        if compile not in COMPILE_SETTINGS:
            raise ValueError(f"compile must be one of {COMPILE_SETTINGS}, got {compile!r}")
        self.model, self.compile, self.max_new_tokens = model, compile, max_new_tokens
        self.memory = model.visual_memory(visual)
        self.decoder: _StaticDecoder | None = None
        self.filled = 0  # positions of the cache written so far

    def __call__(self, sequences: torch.Tensor, beam_sources: torch.Tensor | None) -> torch.Tensor:
        if self.decoder is None:
            return self._start(sequences)
        if self.filled >= self.decoder.layout.positions:
            raise RuntimeError(f"the static cache holds {self.decoder.layout.positions} positions, all written: "
                               f"decode at most max_new_tokens={self.max_new_tokens} tokens with this step")
        if beam_sources is not None:
            self.decoder.reorder(beam_sources, self.filled)
        log_probs = self.decoder.advance(self.model, sequences[:, -1:], self.filled)
        self.filled += 1
        return log_probs

    def _start(self, sequences: torch.Tensor) -> torch.Tensor:
        rows, prompt_length = sequences.shape
        parameter = next(self.model.parameters())
        layout = _Layout(
            beams=rows // self.memory[0].key.shape[0],
            positions=prompt_length + self.max_new_tokens,
            memory_shapes=tuple(tuple(m.key.shape[1:]) for m in self.memory),
            dtype=computed_dtype(parameter),
            device=parameter.device,
            compile=self.compile,
        )
        self.decoder = _decoder_for(self.model, self.memory, layout)
        self.decoder.user = weakref.ref(self)
        self.decoder.load(self.memory)
        self.memory = None  # copied into the decoder's buffers
        self.filled = prompt_length
        return self.decoder.prefill(self.model, sequences)
