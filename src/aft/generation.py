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
  the model's own arithmetic: the same logits in float32); in bfloat16 with a C compiler its attention,
  element-wise work and the prompts' pass run on ``aft.kernels``;
- a row that has emitted EOS (or the stop text of a base model, "\\nQuestion:") is finished; finished rows
  are dropped from the batch, cache included, once they are an eighth of it, so their compute stops (the
  live rows at the back move into their places: only those are copied);
- with ``batch_tokens``, a call decodes only the rows whose cache fits in that budget; its other prompts wait
  and are prefilled into the places of dropped rows, each row writing at its own cache column, so the batch
  stays full until the call's last prompts (``aft sample`` and ``aft eval`` give a call ``CALL_BATCHES``
  batches' worth of prompts);
- sampling is the Gumbel-max form on the logits, argmax(logits / T + G) with G standard Gumbel noise: one
  pass, no softmax. The noise of a row at a position comes from its own generator, seeded by (seed, prompt,
  candidate), so a completion does not depend on what else is in the batch: batches can be cut, dropped or
  dealt to other processes without changing any sample. ``top_p < 1`` masks the logits outside the nucleus
  first (a sort, only then). bfloat16 logits on a CPU take their candidates from one C pass
  (``aft.kernels.top_candidates``).

``generation_dtype`` picks the dtype generation runs in: ``auto`` takes bfloat16 on CPUs with AMX or
AVX512-BF16 (from their flags) and on GPUs where a timed product is clearly faster; elsewhere float32.
``plan_batches`` sizes batches by tokens.
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
from aft.kernels import top_candidates, top_candidates_available

STOPS = ("\nQuestion:",)
GEN_DTYPES = ("auto", "float32", "bfloat16")


@dataclass
class GenerationFields:
    """How the stages that generate (``aft sample``, ``aft eval``) batch and in which dtype they run."""

    gen_dtype: str = field(default="auto", metadata={
        "help": "dtype to generate in: auto (bfloat16 on a CPU with AMX or AVX512-BF16, or a GPU where it is "
                "1.5x faster; else float32), float32 or bfloat16. Samples depend on it: a resumed `aft sample` "
                "keeps the dtype its first run resolved; set it for the same file on other machines."})
    batch_tokens: int = field(default=65536, metadata={
        "help": "Most tokens of KV cache decoded at once: rows (questions x k) x (longest prompt + "
                "max_new_tokens); waiting questions take finished rows' places. Lower it for large models. "
                "0: no limit (then --batch_size sets the batches)."})


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


def _cpu_multiplies_bf16() -> bool | None:
    """Whether this CPU has bfloat16 matrix instructions (AMX or AVX512-BF16), from its flags; None where
    they cannot be read (another OS or architecture)."""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next(line for line in info if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return None
    return "amx_bf16" in flags or "avx512_bf16" in flags


def generation_dtype(name: str, device="cpu") -> torch.dtype:
    """The dtype to generate in: ``float32``, ``bfloat16``, or ``auto``: on an x86 CPU bfloat16 where it has
    AMX or AVX512-BF16 (measured 6x and 2.2x float32's products), else float32; on a GPU or where the CPU's
    flags cannot be read, bfloat16 where a timed product is 1.5x faster. (A timing alone flips on a loaded
    machine: two `aft sample` runs sharing 2 cores had one of them generate in float32, other samples.)"""
    if name not in GEN_DTYPES:
        raise ValueError(f"gen_dtype must be one of {', '.join(GEN_DTYPES)}; got {name!r}")
    if name == "auto":
        flags = _cpu_multiplies_bf16() if str(device).startswith("cpu") else None
        fast = _bf16_speedup(str(device)) >= 1.5 if flags is None else flags
        return torch.bfloat16 if fast else torch.float32
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


# A generate call of ``aft sample`` / ``aft eval`` holds up to this many batches' worth of prompts (by
# --batch_tokens): the rows decoded at once stay a batch, and the call's waiting prompts take finished rows'
# places, so the batch shrinks only at the call's end. A call is also the unit a resumed run redoes whole (in
# bf16 a completion depends, by rounding, on the rows beside it).
CALL_BATCHES = 8


def plan_calls(tokenizer, prompts: list[str], batch_size: int = 0, k: int = 1, max_new_tokens: int = 256,
               batch_tokens: int = 0) -> list[list[int]]:
    """Question indices of each ``generate`` call: ``plan_batches`` of ``CALL_BATCHES`` times ``batch_tokens``
    (``generate`` is then given ``batch_tokens`` itself)."""
    return plan_batches(tokenizer, prompts, batch_size, k, max_new_tokens, batch_tokens * CALL_BATCHES)


class _PreallocatedLayer(DynamicLayer):
    """One layer's keys and values in buffers sized for the whole generation, written in place.

    The buffers hold a pool of rows, of which the first ``rows`` are the batch. A row's prompt ends at the
    column its prefill wrote it to, and each row writes its next token at its own column (``at``: the batch's
    row indices and their columns, set by ``generate`` before a decode step, once for all layers): a row that
    joins the batch late decodes beside rows that are far ahead of it. Without ``at`` every row writes at
    ``length``, as transformers' cache does (a forward pass of the model on a fresh cache, the tests'
    reference). Reads cover the columns up to ``length``; the columns a row has not written are masked out
    and hold zeros or an earlier row's finite values."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity, self.pool, self.length, self.rows, self.at = capacity, 0, 0, 0, None

    def _allocate(self, like: torch.Tensor, rows: int) -> None:
        _, h, _, d = like.shape  # zeros, not uninitialised memory: a masked column is read (times 0)
        self.key_buffer = like.new_zeros(max(rows, self.pool), h, self.capacity, d)
        self.value_buffer = like.new_zeros(max(rows, self.pool), h, self.capacity, d)
        self.device, self.is_initialized = like.device, True

    def lazy_initialization(self, key_states, value_states):
        self._allocate(key_states, key_states.shape[0])
        self.rows = key_states.shape[0]

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.at is None:
            end = self.length + key_states.shape[-2]
            self.key_buffer[:self.rows, :, self.length:end] = key_states
            self.value_buffer[:self.rows, :, self.length:end] = value_states
        else:  # one token per row, each at its own column
            end, (rows, columns) = self.length + 1, self.at
            self.key_buffer[rows, :, columns] = key_states[:, :, 0]
            self.value_buffer[rows, :, columns] = value_states[:, :, 0]
        self.length = end
        self._views()
        return self.keys, self.values

    def _views(self):
        self.keys = self.key_buffer[:self.rows, :, :self.length]
        self.values = self.value_buffer[:self.rows, :, :self.length]

    def get_seq_length(self) -> int:
        return self.length

    def write_rows(self, rows, keys, values, end: int) -> None:
        """Put prefilled keys and values (left-padded to their own width) into pool rows ``rows``, at the
        columns ending at ``end``."""
        if not self.is_initialized:
            self._allocate(keys, len(rows))
        self.key_buffer[rows, :, end - keys.shape[-2]:end] = keys
        self.value_buffer[rows, :, end - values.shape[-2]:end] = values

    def compact(self, holes, movers, rows: int) -> None:
        """Keep the first ``rows`` rows, after copying rows ``movers`` into rows ``holes`` (the columns written so
        far only): dropping finished rows copies just the live rows that move, not the whole cache."""
        for buffer in (self.key_buffer, self.value_buffer):
            written = buffer[:, :, :self.length]
            written[holes] = written[movers]
        self.rows = rows
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


def _left_padded(ids: list[list[int]], pad: int, device):
    """(input ids, attention mask, positions) of token lists left-padded to the longest."""
    width = max(len(x) for x in ids)
    input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
    return input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0)


def _prefill(model, ids, cache, first_row: int, k: int, grouped: bool, pad: int, step=None):
    """The last position's logits of every prompt of ``ids``, repeated for its k rows, and the column its
    prompts end at. On the pre-allocated cache the keys and values of prompt i go to pool rows
    first_row + i*k ... + k - 1 (``grouped``: prompts of very different lengths run in groups of similar
    length, each padded only to its own longest), computed by the decode ``step``'s ``prefill`` where it has
    the C kernels, else by the model; any other cache is a fresh one, filled by the model and repeated k
    times."""
    device, width = next(model.parameters()).device, max(len(x) for x in ids)
    if not isinstance(cache.layers[0], _PreallocatedLayer):
        input_ids, mask, positions = _left_padded(ids, pad, device)
        logits = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        if k > 1:
            cache.batch_repeat_interleave(k)
        return logits.repeat_interleave(k, 0), width
    logits = None
    for group in prefill_groups([len(x) for x in ids]) if grouped else [list(range(len(ids)))]:
        input_ids, mask, positions = _left_padded([ids[i] for i in group], pad, device)
        if step is not None and step.kernel:
            out, written = step.prefill(input_ids, mask, positions)
        else:
            part = DynamicCache(config=model.config)
            out = model(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=part,
                        use_cache=True, logits_to_keep=1).logits[:, -1]
            written = [(layer.keys, layer.values) for layer in part.layers]
        logits = out.new_empty(len(ids), out.shape[-1]) if logits is None else logits
        logits[group] = out
        rows = (first_row + k * torch.tensor(group, device=device)[:, None] + torch.arange(k, device=device)).ravel()
        for layer, (keys, values) in zip(cache.layers, written):
            layer.write_rows(rows, keys.repeat_interleave(k, 0), values.repeat_interleave(k, 0), width)
    return logits.repeat_interleave(k, 0), width


def _siblings(seq: torch.Tensor, k: int, prompt_lengths: torch.Tensor):
    """(source, shared) of each batch row: its prompt's columns are also in the first of its prompt's rows in
    the batch (a prompt's keys and values are written into each of its k rows, at the same columns), so the
    decode attention can read them once for the k samples."""
    prompt = seq // k
    first = torch.full((int(prompt.max()) + 1,), len(seq), device=seq.device).scatter_reduce_(
        0, prompt, torch.arange(len(seq), device=seq.device), "amin")
    return first[prompt], prompt_lengths[prompt]


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
    bfloat16 logits on a CPU with a C compiler take the candidates and the rest's exact log-sum-exp from one
    C pass (``aft.kernels.top_candidates``; of logits tied with the k-th, the lowest token ids are the
    candidates), with the same draws. Each row draws its uniforms from its own generator in a fixed order
    (k + 1 per step, one more when the rest wins), so a row's token does not depend on the other rows of the
    batch."""
    rows, vocab = logits.shape
    k = min(candidates, vocab)
    in_c = k < vocab and logits.dtype == torch.bfloat16 and logits.device.type == "cpu" and top_candidates_available()
    if in_c:
        top, index, rest_lse = top_candidates(logits.contiguous(), k, temperature)
    else:
        top, index = logits.topk(k, dim=-1)
        index, order = index.sort(dim=-1)  # noise follows token ids, not topk's order among ties
        top = top.gather(-1, order)
    # drawn on the CPU whatever the device (the same samples on a GPU as here), then moved to the logits
    u = torch.stack([torch.rand(k + 1, generator=g, dtype=torch.float64) for g in generators]).to(logits.device)
    best, arg = (top.double() / temperature + gumbel(u[:, :k])).max(-1)
    token = index.gather(-1, arg[:, None])[:, 0]
    if k == vocab:
        return token
    g_rest = gumbel(u[:, k])
    # rows' logits / T with their candidates at -inf: the rest of the vocabulary
    rest_of = lambda r: logits.index_select(0, r).float().div_(temperature).scatter_(-1, index[r], float("-inf"))  # noqa: E731
    if in_c:
        winners = (rest_lse + g_rest > best).nonzero()[:, 0]
        rest = rest_of(winners)
    else:
        bound = top.min(-1).values.double() / temperature + math.log(vocab - k)  # of the rest's log-sum-exp
        check = (bound + g_rest >= best).nonzero()[:, 0]
        rest = rest_of(check)
        wins = rest.logsumexp(-1).double() + g_rest[check] > best[check]
        winners, rest = check[wins], rest[wins]
    if len(winners):
        cdf = rest.softmax(-1).cumsum(-1)
        pick = torch.cat([torch.rand(1, generator=generators[r]) for r in winners.tolist()]).to(cdf.device)
        token[winners] = torch.searchsorted(cdf, (pick * cdf[:, -1])[:, None], right=True)[:, 0].clamp(max=vocab - 1)
    return token


def nucleus_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """``logits`` with every token outside the smallest set whose probability reaches ``top_p`` at -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.float().softmax(-1)
    outside = probs.cumsum(-1) - probs >= top_p  # the mass before a token already reaches top_p
    return logits.scatter(-1, order, sorted_logits.masked_fill(outside, float("-inf")))


def _pick(logits, temperature, top_p, generators):
    """Next token of each row: argmax (greedy), or Gumbel-max at ``temperature`` within the nucleus."""
    if temperature <= 0:  # the first maximum, as argmax; max(-1) is 4x faster than argmax on bf16 (torch 2.13)
        return logits.max(-1).indices
    if top_p < 1:
        logits = nucleus_mask(logits, top_p)
    return gumbel_max(logits, temperature, generators)


def _stopped(tokenizer, tokens, seqs, made, looking, stops, every=8, context=16) -> list[int]:
    """Batch rows whose text so far contains a stop string. A row (of ``looking``) is looked at each time its
    count of generated tokens ``made`` reaches a multiple of ``every``: its last every + context tokens."""
    look = (looking & (made % every == 0)).nonzero()[:, 0] if stops else []
    if not len(look):
        return []
    start = (made[look] - every - context).clamp(min=0)
    spans = (start[:, None] + torch.arange(every + context, device=made.device)).clamp(max=tokens.shape[1] - 1)
    windows = tokens[seqs[look]].gather(1, spans).tolist()
    texts = tokenizer.batch_decode([w[:m - s] for w, m, s in zip(windows, made[look].tolist(), start.tolist())])
    return [r for r, text in zip(look.tolist(), texts) if any(s in text for s in stops)]


@torch.no_grad()
def generate(model, tokenizer, prompts, k: int = 1, temperature: float = 0.0, top_p: float = 1.0,
             max_new_tokens: int = 256, seed: int = 0, stops=STOPS, batch_tokens: int = 0, progress=None,
             preallocate: bool = True, drop_finished: bool = True, group_prefill: bool = True,
             fused_step: bool = True) -> list[list[str]]:
    """k completions for each prompt (left padding, KV cache, stop at EOS or a stop string), cut at the stop.

    ``batch_tokens`` > 0 caps the rows decoded at once to those whose KV cache fits in that many tokens
    (rows x (longest prompt + ``max_new_tokens``)); the other prompts wait, shortest first, and take the
    places of finished rows, so the batch stays full until the last prompts. ``progress(1)`` is called as
    each prompt's k completions are done. ``preallocate``, ``drop_finished``, ``group_prefill`` and
    ``fused_step`` only change speed, never the output in float32 (the benchmark turns them off; grouping,
    the fused step and waiting prompts need the pre-allocated cache, waiting prompts also dropping)."""
    device = next(model.parameters()).device
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    n, capacity = len(prompts) * k, max(len(x) for x in ids) + max_new_tokens
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    cache = _new_cache(model, capacity, preallocate)
    preallocated = isinstance(cache.layers[0], _PreallocatedLayer)
    pool = n  # rows decoded at once
    if batch_tokens and preallocated and drop_finished:
        pool = min(n, max(1, batch_tokens // capacity // k) * k)
    for layer in cache.layers if preallocated else ():
        layer.pool = pool
    fused = decode_step(model) if fused_step and preallocated else None
    waiting = sorted(range(len(prompts)), key=lambda i: (len(ids[i]), i))
    prompt_lengths = torch.tensor([len(x) for x in ids], device=device)
    left = [k] * len(prompts)                                # rows of a prompt still generating
    tokens = torch.full((n, max_new_tokens), pad, dtype=torch.long, device=device)
    length = torch.full((n,), max_new_tokens, dtype=torch.long, device=device)  # generated tokens kept
    attend = torch.zeros(pool, capacity, dtype=torch.bool, device=device)   # the cache columns a row reads
    # per batch row: its sequence (prompt * k + candidate), tokens made, next column and position, finished
    seq, made, column, position = (torch.zeros(0, dtype=torch.long, device=device) for _ in range(4))
    finished, generators = torch.zeros(0, dtype=torch.bool, device=device), []

    def admit(count):
        """The next ``count`` waiting prompts join the batch at its end, prefilled: their rows' logits."""
        nonlocal seq, made, column, position, finished
        chosen, first = waiting[:count], len(seq)
        del waiting[:count]
        logits, end = _prefill(model, [ids[i] for i in chosen], cache, first, k, group_prefill and preallocated, pad,
                               fused)
        attend[first:first + len(chosen) * k] = False
        for j, i in enumerate(chosen):
            attend[first + j * k:first + (j + 1) * k, end - len(ids[i]):end] = True
        new = torch.tensor([i * k + c for i in chosen for c in range(k)], device=device)
        seq, made = torch.cat([seq, new]), torch.cat([made, torch.zeros_like(new)])
        column = torch.cat([column, torch.full_like(new, end)])
        position = torch.cat([position, prompt_lengths[chosen].repeat_interleave(k)])
        finished = torch.cat([finished, torch.zeros_like(new, dtype=torch.bool)])
        if temperature > 0:
            generators.extend(_row_generator(seed, prompts[i], c) for i in chosen for c in range(k))
        for layer in cache.layers if preallocated else ():
            layer.rows, layer.length = len(seq), max(layer.length, end)
            layer._views()
        return logits

    logits = admit(min(len(waiting), pool // k))
    while True:
        nxt = _pick(logits, temperature, top_p, generators)
        live = ~finished
        tokens[seq[live], made[live]] = nxt[live]
        made = made + live
        ended = live & ((nxt == eos) | (made == max_new_tokens))
        for r in _stopped(tokenizer, tokens, seq, made, live, stops):
            ended[r] = True
        if ended.any():
            length[seq[ended]] = made[ended]
            finished = finished | ended
            for s in seq[ended].tolist():
                left[s // k] -= 1
                if progress is not None and not left[s // k]:
                    progress(1)
        if bool(finished.all()) and not waiting:
            break
        if drop_finished and int(finished.sum()) * 8 >= len(seq):
            if preallocated:  # only the live rows at the back move
                keep, holes, movers = compaction(finished)
                for layer in cache.layers:
                    layer.compact(holes, movers, len(keep))
            else:
                keep = (~finished).nonzero()[:, 0]
                cache.batch_select_indices(keep)
            attend[:len(keep)] = attend[keep]
            seq, made, column, position, nxt, finished = (x[keep] for x in (seq, made, column, position, nxt, finished))
            generators = [generators[i] for i in keep.tolist()] if generators else []
        if len(seq):
            rows = torch.arange(len(seq), device=device)
            attend[rows, column] = True
            end = int(column.max()) + 1
            for layer in cache.layers if preallocated else ():
                layer.at, layer.length = (rows, column), end - 1
            if fused is not None:
                logits = fused(nxt, position, cache.layers, attend[:len(seq), :end],
                               siblings=_siblings(seq, k, prompt_lengths) if k > 1 and fused.kernel else None)
            else:
                logits = model(input_ids=nxt[:, None], attention_mask=attend[:len(seq), :end].long(),
                               position_ids=position[:, None], cache=cache, use_cache=True).logits[:, -1]
            # a finished row not yet dropped goes on writing its last column (a prompt's rows stay in capacity)
            column, position = (column + 1).clamp(max=capacity - 1), position + 1
        free = pool - len(seq)
        if waiting and free >= k and (free * 8 >= pool or free // k >= len(waiting)):
            logits = torch.cat([logits, admit(min(len(waiting), free // k))]) if len(seq) else admit(
                min(len(waiting), free // k))
    for layer in cache.layers if preallocated else ():
        layer.at = None
    texts = tokenizer.batch_decode([t[:m] for t, m in zip(tokens.tolist(), length.tolist())],
                                   skip_special_tokens=True)
    texts = [truncate_at_stop(t, stops) for t in texts]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]
