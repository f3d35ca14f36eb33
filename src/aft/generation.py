"""Batched generation on the model's own forward pass: what ``aft sample`` and ``aft eval`` both call.

One call of ``generate`` decodes k completions for each of its prompts, all in one batch:

- each prompt is run through the model once and its KV cache copied to its k rows (``generate`` of
  transformers runs every prompt k times);
- the KV cache is allocated once for the longest sequence and written in place: no concatenation of the
  growing cache at every step (models with sliding-window layers keep transformers' own cache);
- prompts of very different lengths are prefilled in groups of similar length (``prefill_groups``), each
  padded only to its own longest, and written into that one cache: left padding to the batch's longest
  prompt had doubled the prefill of a one-batch ``aft eval`` (49% of its padded tokens were prompt);
- on a CPU, a Llama-architecture model decodes through ``aft.decode`` (stacked and packed products around
  the model's own arithmetic: the same logits in float32);
- a row that has emitted EOS (or the stop text of a base model, "\\nQuestion:") is finished; finished rows
  are dropped from the batch, cache included, once they are an eighth of it, so their compute stops (the
  live rows at the back move into their places: only those are copied);
- sampling is the Gumbel-max form on the logits, argmax(logits / T + G) with G standard Gumbel noise: one
  pass, no softmax. The noise of a row at a position comes from its own generator, seeded by (seed, prompt,
  candidate), so a completion does not depend on what else is in the batch: batches can be cut, dropped or
  dealt to other processes without changing any sample. ``top_p < 1`` masks the logits outside the nucleus
  first (a sort, only then).

``generation_dtype`` picks the dtype generation runs in: ``auto`` times a decode-sized matrix product in
float32 and bfloat16 once per process and takes bfloat16 only where it is clearly faster (CPUs with AMX or
AVX512-BF16, GPUs); elsewhere float32. ``plan_batches`` sizes batches by tokens.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import math
import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from aft.data import encode_prompt
from aft.decode import decode_step

STOPS = ("\nQuestion:",)
GEN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class GenerationFields:
    """How the stages that generate (``aft sample``, ``aft eval``) batch and in which dtype they run."""

    gen_dtype: str = field(default="auto", metadata={
        "help": "dtype to generate in: auto (bfloat16 where this machine multiplies it 1.5x faster, else "
                "float32), float32 or bfloat16. Samples depend on it: set it for the same file on other machines."})
    batch_tokens: int = field(default=65536, metadata={
        "help": "Most tokens of KV cache per batch: questions x k x (prompt + max_new_tokens); lower it for "
                "large models. 0: no limit (then --batch_size sets the batches)."})


def truncate_at_stop(text: str, stops=STOPS) -> str:
    """Cut a completion where a base model starts inventing the next question."""
    for stop in stops:
        cut = text.find(stop)
        if cut >= 0:
            text = text[:cut]
    return text


@functools.cache
def _bf16_speedup(device: str) -> float:
    """Time of a decode-sized float32 matrix product over its bfloat16 time, on ``device`` (best of 5)."""
    def best(dtype):
        x = torch.randn(256, 1024, dtype=dtype, device=device)
        w = torch.randn(1024, 1024, dtype=dtype, device=device)
        times = []
        for _ in range(6):
            start = time.perf_counter()
            for _ in range(4):
                y = torch.nn.functional.linear(x, w)
            y.sum().item()  # waits for a GPU
            times.append(time.perf_counter() - start)
        return min(times[1:])
    return best(torch.float32) / best(torch.bfloat16)


def generation_dtype(name: str, device="cpu") -> torch.dtype:
    """The dtype to generate in: ``float32``, ``bfloat16``, or ``auto`` (bfloat16 where it is 1.5x faster)."""
    if name not in GEN_DTYPES:
        raise ValueError(f"gen_dtype must be one of {', '.join(GEN_DTYPES)}; got {name!r}")
    if name == "auto":
        return torch.bfloat16 if _bf16_speedup(str(device)) >= 1.5 else torch.float32
    return getattr(torch, name)


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.bfloat16`` -> ``bfloat16``: the name a gen_dtype setting uses, for what ``auto`` resolved to."""
    return str(dtype).removeprefix("torch.")


def for_generation(model, dtype: torch.dtype, keep: bool = False):
    """``model`` in ``dtype`` for generation: itself, converted in place, or (``keep``) a converted copy."""
    if next(model.parameters()).dtype == dtype:
        return model
    return (copy.deepcopy(model) if keep else model).to(dtype)


def plan_batches(tokenizer, prompts: list[str], batch_size: int = 0, k: int = 1, max_new_tokens: int = 256,
                 batch_tokens: int = 0) -> list[list[int]]:
    """Question indices in batches of similar prompt length (less padding, the same plan every run).

    A batch holds at most ``batch_size`` questions (0: no limit) and, when ``batch_tokens`` > 0, at most
    that many tokens of KV cache: questions x k x (longest prompt + ``max_new_tokens``)."""
    lengths = [len(encode_prompt(tokenizer, p)) for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: (lengths[i], i))
    batches, current = [], []
    for i in order:  # sorted: the newest question is the batch's longest
        full = batch_size and len(current) == batch_size
        over = batch_tokens and (len(current) + 1) * k * (lengths[i] + max_new_tokens) > batch_tokens
        if current and (full or over):
            batches.append(current)
            current = []
        current.append(i)
    return batches + [current] if current else batches


class _PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the whole generation, written in place."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.length = capacity, 0

    def lazy_initialization(self, key_states, value_states):
        b, h, _, _ = key_states.shape
        self.key_buffer = key_states.new_empty(b, h, self.capacity, key_states.shape[-1])
        self.value_buffer = value_states.new_empty(b, h, self.capacity, value_states.shape[-1])
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        self.key_buffer[:, :, self.length:end] = key_states
        self.value_buffer[:, :, self.length:end] = value_states
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self):
        self.keys = self.key_buffer[:, :, :self.length]
        self.values = self.value_buffer[:, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def write_rows(self, rows, keys, values, rows_total: int, end: int) -> None:
        """Put one prefill group's keys and values (rows ``rows``, left-padded to their own width) at the
        columns ending at ``end``; the columns before stay zero, masked out (never uninitialised memory)."""
        if not self.is_initialized:
            _, h, _, d = keys.shape
            self.key_buffer = keys.new_empty(rows_total, h, self.capacity, d)
            self.value_buffer = values.new_empty(rows_total, h, self.capacity, d)
            self.key_buffer[:, :, :end] = 0
            self.value_buffer[:, :, :end] = 0
            self.device, self.is_initialized = keys.device, True
        self.key_buffer[rows, :, end - keys.shape[-2]:end] = keys
        self.value_buffer[rows, :, end - values.shape[-2]:end] = values
        self.length = end
        self._views()

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.key_buffer = self.key_buffer.repeat_interleave(repeats, dim=0)
        self.value_buffer = self.value_buffer.repeat_interleave(repeats, dim=0)
        self._views()

    def batch_select_indices(self, indices) -> None:
        self.key_buffer, self.value_buffer = self.key_buffer[indices], self.value_buffer[indices]
        self._views()

    def compact(self, holes, movers, rows: int) -> None:
        """Keep the first ``rows`` rows, after copying rows ``movers`` into rows ``holes`` (the columns written so
        far only): dropping finished rows copies just the live rows that move, not the whole cache."""
        for buffer in (self.key_buffer, self.value_buffer):
            written = buffer[:, :, :self.length]
            written[holes] = written[movers]
        self.key_buffer, self.value_buffer = self.key_buffer[:rows], self.value_buffer[:rows]
        self._views()


def compaction(finished: torch.Tensor):
    """How to drop the finished rows of a batch: (order, holes, movers). The live rows past the first
    ``live`` rows move into the places of the finished rows among them (``holes``), so row i of the batch
    after dropping is row ``order[i]`` of the batch before."""
    live = int((~finished).sum())
    holes = finished[:live].nonzero()[:, 0]
    movers = (~finished[live:]).nonzero()[:, 0] + live
    order = torch.arange(live, device=finished.device)
    order[holes] = movers
    return order, holes, movers


def _new_cache(model, capacity: int, preallocate: bool = True):
    cache = DynamicCache(config=model.config)
    if preallocate and cache.layers and all(type(layer) is DynamicLayer for layer in cache.layers):
        cache.layers = [_PreallocatedLayer(capacity) for _ in cache.layers]
    return cache


def prefill_groups(lengths: list[int], slack: float = 1.5) -> list[list[int]]:
    """Prompt indices, shortest first, in groups whose longest is at most ``slack`` times their shortest."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    groups = [[order[0]]]
    for i in order[1:]:
        if lengths[i] > slack * lengths[groups[-1][0]]:
            groups.append([])
        groups[-1].append(i)
    return groups


def _prefill(model, input_ids, mask, positions, cache, lengths, grouped: bool):
    """The last position's logits of every prompt, its keys and values written into ``cache`` (``grouped``:
    in groups of similar length, which needs the pre-allocated cache)."""
    width = input_ids.shape[1]
    groups = prefill_groups(lengths) if grouped else [list(range(len(lengths)))]
    if len(groups) == 1:
        return model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                     use_cache=True, logits_to_keep=1).logits[:, -1]
    logits = None
    for group in groups:
        rows, start = torch.tensor(group, device=input_ids.device), width - max(lengths[i] for i in group)
        part = DynamicCache(config=model.config)
        out = model(input_ids=input_ids[rows, start:], attention_mask=mask[rows, start:],
                    position_ids=positions[rows, start:], cache=part, use_cache=True, logits_to_keep=1).logits[:, -1]
        logits = out.new_empty(len(lengths), out.shape[-1]) if logits is None else logits
        logits[rows] = out
        for layer, written in zip(cache.layers, part.layers):
            layer.write_rows(rows, written.keys, written.values, len(lengths), width)
    return logits


def _row_generator(seed: int, prompt: str, candidate: int) -> torch.Generator:
    digest = hashlib.blake2b(f"{seed}\0{candidate}\0{prompt}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def gumbel(u: torch.Tensor) -> torch.Tensor:
    """Standard Gumbel noise from uniforms: -log(-log(u))."""
    return u.clamp(min=torch.finfo(u.dtype).tiny).log().neg().log().neg()


def gumbel_max(logits: torch.Tensor, temperature: float, generators, candidates: int = 64) -> torch.Tensor:
    """One token per row, distributed as softmax(logits / T): argmax(logits / T + G), G Gumbel noise.

    Exact, and cheap because noise is drawn only for a row's ``candidates`` best tokens (one top-k pass; no
    softmax over the vocabulary). The other tokens can win only if their own maximum, Gumbel-distributed
    around the log-sum-exp of the rest, passes the candidates' best; that log-sum-exp is at most
    (the k-th logit / T + log(size of the rest)), so one more Gumbel draw against this bound settles it for
    most rows. The rows it does not settle compute the rest's log-sum-exp, and where the rest wins, its
    token is drawn from the rest's own softmax (the winner of a Gumbel-max and its value are independent).
    Each row draws its uniforms from its own generator in a fixed order (k + 1 per step, one more when the
    rest wins), so a row's token does not depend on the other rows of the batch."""
    rows, vocab = logits.shape
    k = min(candidates, vocab)
    top, index = logits.topk(k, dim=-1)
    index, order = index.sort(dim=-1)  # noise follows token ids, not topk's order among ties
    top = top.gather(-1, order)
    # drawn on the CPU whatever the device (the same samples on a GPU as here), then moved to the logits
    u = torch.stack([torch.rand(k + 1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    best, arg = (top.double() / temperature + gumbel(u[:, :k])).max(-1)
    token = index.gather(-1, arg[:, None])[:, 0]
    if k == vocab:
        return token
    bound = top.min(-1).values.double() / temperature + math.log(vocab - k)  # of the rest's log-sum-exp
    g_rest = gumbel(u[:, k])
    check = (bound + g_rest >= best).nonzero()[:, 0]
    if len(check):
        rest = (logits[check].float() / temperature).scatter(-1, index[check], float("-inf"))
        wins = rest.logsumexp(-1).double() + g_rest[check] > best[check]
        if wins.any():
            cdf = rest[wins].softmax(-1).cumsum(-1)
            pick = torch.cat([torch.rand(1, generator=generators[r])
                              for r in check[wins].tolist()]).to(cdf.device)
            token[check[wins]] = torch.searchsorted(cdf, (pick * cdf[:, -1])[:, None], right=True)[:, 0].clamp(
                max=vocab - 1)
    return token


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with every token outside the smallest set whose probability reaches ``top_p`` at -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def _pick(logits, temperature, top_p, generators):
    """Next token of each row: argmax (greedy), or Gumbel-max at ``temperature`` within the nucleus."""
    if temperature <= 0:
        return logits.argmax(-1)
    if top_p < 1:
        logits = nucleus_mask(logits, top_p)
    return gumbel_max(logits, temperature, generators)


def _stopped(tokenizer, tokens, rows, step, stops, every=8):
    """Rows (of ``rows``) whose text so far contains a stop string; looked at every ``every`` steps."""
    if not stops or (step + 1) % every:
        return []
    window = tokens[rows, max(0, step + 1 - every - 16):step + 1].tolist()
    return [r for r, text in zip(rows.tolist(), tokenizer.batch_decode(window)) if any(s in text for s in stops)]


@torch.no_grad()
def generate(model, tokenizer, prompts, k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, stops=STOPS, preallocate: bool = True,
             drop_finished: bool = True, group_prefill: bool = True, fused_step: bool = True) -> list[list[str]]:
    """k completions for each prompt (left padding, KV cache, stop at EOS or a stop string), cut at the stop.

    ``preallocate``, ``drop_finished``, ``group_prefill`` and ``fused_step`` only change speed, never the output
    in float32 (the benchmark turns them off; grouping and the fused step need the pre-allocated cache)."""
    device = next(model.parameters()).device
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    width, n = max(len(x) for x in ids), len(prompts) * k
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    mask = torch.zeros(len(ids), width + max_new_tokens, dtype=torch.long, device=device)
    for r, x in enumerate(ids):
        mask[r, width - len(x):width] = 1
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    positions = (mask[:, :width].cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(model, width + max_new_tokens, preallocate)
    preallocated = all(isinstance(layer, _PreallocatedLayer) for layer in cache.layers)
    logits = _prefill(model, input_ids, mask[:, :width], positions, cache, [len(x) for x in ids],
                      group_prefill and preallocated)
    fused = decode_step(model) if fused_step and preallocated else None
    if k > 1:  # one prefill per prompt, its cache copied to the k rows
        cache.batch_repeat_interleave(k)
        logits, mask = logits.repeat_interleave(k, 0), mask.repeat_interleave(k, 0)
    position = mask.sum(-1)                                  # of the next token, per row
    rows = torch.arange(n, device=device)                   # original row of each batch row
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    length = torch.full((n,), max_new_tokens, dtype=torch.long)  # generated tokens kept per row
    finished = torch.zeros(n, dtype=torch.bool, device=device)
    generators = [_row_generator(seed, prompts[r // k], r % k) for r in range(n)] if temperature > 0 else []
    for step in range(max_new_tokens):
        nxt = _pick(logits, temperature, top_p, generators)
        tokens[rows, step] = nxt
        ended = (nxt == eos) & ~finished
        for r in _stopped(tokenizer, tokens, rows[~finished], step, stops):
            ended[(rows == r).nonzero()[0, 0]] = True
        if ended.any():
            length[rows[ended].cpu()] = step + 1
            finished |= ended
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        if drop_finished and int(finished.sum()) * 8 >= len(rows):
            if preallocated:  # only the live rows at the back move
                keep, holes, movers = compaction(finished)
                for layer in cache.layers:
                    layer.compact(holes, movers, len(keep))
            else:
                keep = (~finished).nonzero()[:, 0]
                cache.batch_select_indices(keep)
            rows, mask, position, nxt, finished = rows[keep], mask[keep], position[keep], nxt[keep], finished[keep]
            generators = [generators[i] for i in keep.tolist()] if generators else []
        mask[:, width + step] = 1
        if fused is not None:
            logits = fused(nxt, position, cache.layers, mask[:, :width + step + 1].bool())
        else:
            logits = model(input_ids=nxt[:, None], attention_mask=mask[:, :width + step + 1],
                           position_ids=position[:, None], cache=cache, use_cache=True).logits[:, -1]
        position = position + 1
    texts = tokenizer.batch_decode([t[:m] for t, m in zip(tokens.tolist(), length.tolist())],
                                   skip_special_tokens=True)
    texts = [truncate_at_stop(t, stops) for t in texts]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
