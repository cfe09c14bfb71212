"""Caption decoding: greedy and beam search, batched over images.

The fast path computes every module's visual keys and values once per image (beams share them,
see `ITuningModule.forward`) and reuses GPT-2's key/value cache across steps. `RecomputingStep`
is the plain reference that recomputes the whole prefix and the visual keys/values per beam at
every step, as ClipCap's beam search does; tests check both give the same tokens.

Beam search follows the usual rules: a hypothesis that ends in EOS among the top `num_beams`
candidates is finished, an image is done once it has `num_beams` finished hypotheses, and
hypotheses are ranked by sum of log-probabilities / (generated tokens ** length_penalty).

`DecodingConfig.compile` picks the step when the caller passes none (`decoding_step`): "auto" uses
`StaticCacheStep` compiled into CUDA graphs on CUDA (see ituning/static_decoding.py) and
`CachedStep` on CPU; "never" always `CachedStep`; "always" the compiled step on any device. The
compiled step proves itself on its first batch in a process (ituning/fast_paths.py): that batch is
also decoded with `CachedStep`, and unless the tokens are equal and the scores within
SCORE_TOLERANCE, "auto" decodes with `CachedStep` from then on ("always" raises).

Every caption starts from `caption_prompt`, in training as in decoding. `caption_texts` turns a
batch of visual tokens into captions; `caption_cached_tokens` captions cached visual tokens by image id.
"""

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ituning.fast_paths import STATIC_DECODING
from ituning.model import ITuningCaptioner
from ituning.progress import Progress
from ituning.static_decoding import COMPILE_SETTINGS, StaticCacheStep, static_cache_supported


@dataclass(frozen=True)
class DecodingConfig:
    num_beams: int = 5  # the paper's beam size; 1 is greedy
    max_length: int = 20  # new tokens, EOS included
    min_length: int = 0  # EOS is forbidden before this many new tokens
    length_penalty: float = 1.0
    compile: str = "auto"  # compiled static-cache decoding: "auto" (on CUDA only), "never", "always"

    def __post_init__(self):
        if self.num_beams < 1 or self.max_length < 1 or not 0 <= self.min_length < self.max_length:
            raise ValueError(f"invalid decoding settings: {self}")
        if self.compile not in COMPILE_SETTINGS:
            raise ValueError(f"DecodingConfig.compile must be one of {', '.join(COMPILE_SETTINGS)}, "
                             f"got {self.compile!r}")


def caption_prompt(tokenizer) -> list[int]:
    """The tokens every caption starts from: GPT-2's BOS token (its EOS when the tokenizer has no BOS)."""
    bos = tokenizer.bos_token_id
    return [tokenizer.eos_token_id if bos is None else bos]


class CachedStep:
    """Next-token log-probabilities using precomputed visual memory and GPT-2's KV cache."""

    def __init__(self, model: ITuningCaptioner, visual: torch.Tensor):
        self.model = model
        self.memory = model.visual_memory(visual)
        self.past = None

    def __call__(self, sequences: torch.Tensor, beam_sources: torch.Tensor | None) -> torch.Tensor:
        if self.past is None:
            new_tokens = sequences
        else:
            if beam_sources is not None:
                self.past.reorder_cache(beam_sources)
            new_tokens = sequences[:, -1:]
        output = self.model(new_tokens, memory=self.memory, past_key_values=self.past, use_cache=True)
        self.past = output.past_key_values
        return output.logits[:, -1].float().log_softmax(dim=-1)


class BlindStep(CachedStep):
    """Decoding with the modules switched off: the plain frozen language model (the caption-blind
    baseline). The visual tokens are ignored."""

    def __init__(self, model: ITuningCaptioner, visual: torch.Tensor):
        super().__init__(model, visual[:, :1])
        self.memory = None


class RecomputingStep:
    """The reference: the whole prefix and every beam's visual keys/values, every step."""

    def __init__(self, model: ITuningCaptioner, visual: torch.Tensor):
        self.model = model
        self.visual = visual

    def __call__(self, sequences: torch.Tensor, beam_sources: torch.Tensor | None) -> torch.Tensor:
        beams = sequences.shape[0] // self.visual.shape[0]
        visual = self.visual.repeat_interleave(beams, dim=0)  # (B·K, N, d_v)
        output = self.model(sequences, visual=visual, use_cache=False)
        return output.logits[:, -1].float().log_softmax(dim=-1)


def decoding_step(config: DecodingConfig, device: torch.device) -> Callable:
    """The step `config.compile` asks for on `device`: compiled static-cache decoding pays off where
    kernel launches bound the speed (CUDA); on CPU the arithmetic dominates and compiling only costs."""
    if config.compile == "never":
        return CachedStep
    on_cuda = torch.device(device).type == "cuda" and static_cache_supported()
    if config.compile == "auto" and not STATIC_DECODING.available(on_cuda):
        return CachedStep
    return partial(StaticCacheStep, max_new_tokens=config.max_length, compile=config.compile)


def forbid_early_eos(log_probs: torch.Tensor, generated: int, eos_id: int, config: DecodingConfig):
    if generated < config.min_length:
        log_probs[:, eos_id] = float("-inf")
    return log_probs


SCORE_TOLERANCE = 1e-3  # |score difference| / max(1, |score|) allowed between the compiled and cached steps


def searched(search: Callable, model, visual, prompt_ids, eos_id, config: DecodingConfig, step) -> list:
    """search(..., step), with the step `config.compile` picks when `step` is None; a compiled step
    is checked against `CachedStep` on its first batch in the process and replaced if it fails."""
    chosen = step or decoding_step(config, visual.device)
    if chosen is CachedStep or step is not None:
        return search(model, visual, prompt_ids, eos_id, config, chosen)
    _, result = STATIC_DECODING.first_use(config.compile, lambda: search(model, visual, prompt_ids, eos_id, config,
                                                                          chosen),
                                          lambda: search(model, visual, prompt_ids, eos_id, config, CachedStep),
                                          search_difference)
    return result


def search_difference(compiled: list, cached: list) -> str:
    """"" when two searches' outputs (token lists, or `_Hypotheses`) have equal tokens and close scores."""
    for image, (mine, theirs) in enumerate(zip(compiled, cached)):
        mine_entries = getattr(mine, "entries", [(0.0, mine)])
        their_entries = getattr(theirs, "entries", [(0.0, theirs)])
        if [tokens for _, tokens in mine_entries] != [tokens for _, tokens in their_entries]:
            return f"image {image} decoded to other tokens"
        for (score, _), (expected, _) in zip(mine_entries, their_entries):
            if abs(score - expected) > SCORE_TOLERANCE * max(1.0, abs(expected)):
                return f"image {image}: beam score {score:.6g} against {expected:.6g}"
    return ""


@torch.inference_mode()
def greedy_search(model, visual, prompt_ids, eos_id, config=DecodingConfig(num_beams=1), step=None):
    """Token ids (without prompt and EOS) of the most likely next token at every step."""
    return searched(_greedy, model, visual, prompt_ids, eos_id, config, step)


def _greedy(model, visual, prompt_ids, eos_id, config, step) -> list[list[int]]:
    images = visual.shape[0]
    next_log_probs = step(model, visual)
    sequences = prompt_ids.expand(images, -1)  # (B, P)
    finished = torch.zeros(images, dtype=torch.bool)
    outputs: list[list[int]] = [[] for _ in range(images)]
    for generated in range(config.max_length):
        log_probs = forbid_early_eos(next_log_probs(sequences, None), generated, eos_id, config)
        tokens = log_probs.argmax(dim=-1).cpu()  # (B,)
        for image, token in enumerate(tokens.tolist()):
            if not finished[image]:
                finished[image] = token == eos_id
                if token != eos_id:
                    outputs[image].append(token)
        if finished.all():
            break
        sequences = torch.cat([sequences, tokens.to(sequences.device)[:, None]], dim=1)
    return outputs


@dataclass
class _Hypotheses:
    """The finished hypotheses of one image, best kept."""

    size: int
    length_penalty: float

    def __post_init__(self):
        self.entries: list[tuple[float, list[int]]] = []

    def add(self, score_sum: float, tokens: list[int], generated: int) -> None:
        self.entries.append((score_sum / generated**self.length_penalty, tokens))
        self.entries.sort(key=lambda entry: entry[0], reverse=True)
        del self.entries[self.size :]

    @property
    def full(self) -> bool:
        return len(self.entries) >= self.size

    def best(self) -> list[int]:
        return self.entries[0][1]


@dataclass(frozen=True)
class Beam:
    """A finished hypothesis: its token ids (without prompt and EOS) and its ranking score,
    sum of log-probabilities / (generated tokens ** length_penalty)."""

    tokens: list[int]
    score: float


@torch.inference_mode()
def beam_search(model, visual, prompt_ids, eos_id, config=DecodingConfig(), step=None):
    """Token ids (without prompt and EOS) of the best beam for each image."""
    return [h.best() for h in searched(_search_beams, model, visual, prompt_ids, eos_id, config, step)]


@torch.inference_mode()
def ranked_beams(model, visual, prompt_ids, eos_id, config=DecodingConfig(), step=None) -> list[list[Beam]]:
    """Every finished hypothesis of each image, best first (the first is `beam_search`'s answer)."""
    hypotheses = searched(_search_beams, model, visual, prompt_ids, eos_id, config, step)
    return [[Beam(tokens, score) for score, tokens in h.entries] for h in hypotheses]


def _search_beams(model, visual, prompt_ids, eos_id, config, step) -> list[_Hypotheses]:
    images, beams = visual.shape[0], config.num_beams
    next_log_probs = step(model, visual)
    sequences = prompt_ids.expand(images * beams, -1)  # (B·K, P), beams of an image adjacent
    beam_scores = torch.zeros(images, beams)
    beam_scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
    hypotheses = [_Hypotheses(beams, config.length_penalty) for _ in range(images)]
    sources = None
    prompt_length = prompt_ids.shape[1]
    for generated in range(1, config.max_length + 1):
        log_probs = forbid_early_eos(next_log_probs(sequences, sources), generated - 1, eos_id, config)
        vocab = log_probs.shape[-1]
        candidates = beam_scores.to(log_probs.device)[:, :, None] + log_probs.view(images, beams, vocab)
        top_scores, top_ids = candidates.view(images, -1).topk(2 * beams, dim=1)  # (B, 2K)
        top_scores, top_ids = top_scores.cpu(), top_ids.cpu()  # only the 2K candidates leave the device
        sources, tokens, beam_scores = _select_beams(
            sequences, top_scores, top_ids, vocab, hypotheses, eos_id, generated, prompt_length
        )
        sources = sources.to(sequences.device)
        sequences = torch.cat([sequences[sources], tokens.to(sequences.device)[:, None]], dim=1)
        if all(h.full for h in hypotheses):
            break
    else:
        _finish_live_beams(sequences, beam_scores, hypotheses, prompt_length, config.max_length)
    return hypotheses


def _select_beams(sequences, top_scores, top_ids, vocab, hypotheses, eos_id, generated, prompt_length):
    """Move EOS candidates to the finished hypotheses and keep the best K others alive. Runs on the
    host, on plain lists: a step's bookkeeping for hundreds of images costs no device waits."""
    images, beams = len(hypotheses), hypotheses[0].size
    sources = [image * beams for image in range(images) for _ in range(beams)]  # done images idle on beam 0
    tokens = [eos_id] * (images * beams)
    scores = [[float("-inf")] * beams for _ in range(images)]
    finished_rows = None  # the sequences on the host, fetched once if some beam finishes
    for image, (image_scores, image_ids) in enumerate(zip(top_scores.tolist(), top_ids.tolist())):
        hyps, kept = hypotheses[image], 0
        if hyps.full:
            continue
        for rank, (score, flat_id) in enumerate(zip(image_scores, image_ids)):
            source, token = image * beams + flat_id // vocab, flat_id % vocab
            if token == eos_id:
                if rank < beams:
                    finished_rows = sequences.cpu() if finished_rows is None else finished_rows
                    hyps.add(score, finished_rows[source, prompt_length:].tolist(), generated)
                continue
            slot = image * beams + kept
            sources[slot], tokens[slot], scores[image][kept] = source, token, score
            kept += 1
            if kept == beams:
                break
    return torch.tensor(sources), torch.tensor(tokens), torch.tensor(scores)


def _finish_live_beams(sequences, beam_scores, hypotheses, prompt_length, generated):
    """At max_length, live beams compete with the finished hypotheses as they are."""
    for image, hyps in enumerate(hypotheses):
        if hyps.full:
            continue
        for beam, score in enumerate(beam_scores[image].tolist()):
            if score > float("-inf"):
                row = image * hyps.size + beam
                hyps.add(score, sequences[row, prompt_length:].tolist(), generated)


def generate(model, visual, prompt_ids, eos_id, config=DecodingConfig(), step=None):
    """Greedy when num_beams is 1, beam search otherwise; `step` None: the one `config.compile` picks."""
    search = greedy_search if config.num_beams == 1 else beam_search
    return search(model, visual, prompt_ids, eos_id, config, step)


def caption_texts(model, tokenizer, visual: torch.Tensor, decoding=DecodingConfig(), step=None) -> list[str]:
    """Captions for visual tokens (B, N, d_v), decoded on the model's device in its dtype."""
    parameter = next(model.parameters())
    visual = visual.to(parameter.device, dtype=parameter.dtype)
    prompt = torch.tensor([caption_prompt(tokenizer)], device=parameter.device)  # (1, P)
    token_ids = generate(model, visual, prompt, tokenizer.eos_token_id, decoding, step)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in token_ids]


def caption_cached_tokens(caption_batch: Callable[[torch.Tensor], list[str]], tokens_by_id: Mapping,
                   image_ids: Iterable[str], batch_size: int, description: str = "captioning") -> dict[str, str]:
    """Captions by image id from cached visual tokens (image_id -> (N, d_v) array or tensor, e.g. a
    FeatureReader), stacked batch_size images at a time and captioned by `caption_batch`; progress
    under `description`."""
    image_ids, captions = list(image_ids), {}
    with Progress(len(image_ids), description, "images") as progress:
        for start in range(0, len(image_ids), batch_size):
            chunk = image_ids[start : start + batch_size]
            visual = torch.from_numpy(np.stack([np.asarray(tokens_by_id[key]) for key in chunk]))  # (B, N, d_v)
            captions.update(zip(chunk, caption_batch(visual)))
            progress.update(len(chunk))
    return captions
