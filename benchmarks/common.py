"""Shared set-up of the benchmarks: the issue's small Llama, random-digit groups, and time / memory probes.

Lengths: the tiny tokenizer splits digits one per token, so a prompt of 99 random digits is 100 tokens with
BOS and a completion of 119 digits is 120 with EOS. The model's vocabulary (8k by default) is larger than the
tokenizer's; only the first ids are ever used, which changes nothing about the cost.

Memory is the peak resident set size (RSS, via psutil, sampled every 2 ms by a thread) above the RSS just
before the measured work, in a fresh process per configuration so no allocator cache is carried over.
"""

from __future__ import annotations

import json
import multiprocessing
import random
import statistics
import threading
import time

import psutil
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aft.tiny import build_tokenizer

K, PROMPT_DIGITS, COMPLETION_DIGITS = 8, 99, 119
HIDDEN, LAYERS, HEADS = 256, 4, 4


def tokenizer():
    return build_tokenizer([" ".join("0123456789")] * 10 + ["Question: Answer:"], vocab_size=300)


def model(tok, vocab: int = 8192, seed: int = 0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=HIDDEN * 8 // 3,
                         num_hidden_layers=LAYERS, num_attention_heads=HEADS, num_key_value_heads=HEADS,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def step_flops(vocab: int = 8192, shared: bool = True, k: int = K, prompt: int = 100, completion: int = 120):
    """Model FLOPs of scoring one group forward + backward (3x the forward), attention's score and value
    products included. The vocabulary projection runs on the k x completion rows only; it is 3x as well when
    they fit in one chunk (the softmax is kept for the backward) and 4x when chunked (recomputed)."""
    from aft.scoring import CHUNK_ELEMENTS

    h, f = HIDDEN, HIDDEN * 8 // 3
    per_token = 2 * LAYERS * (4 * h * h + 3 * h * f)
    rows = k * completion
    if shared:   # the prompt once (causal: half the square), each completion attends its prompt and itself
        tokens, attended = prompt + rows, prompt**2 / 2 + k * (completion * prompt + completion**2 / 2)
    else:
        tokens, attended = k * (prompt + completion), k * (prompt + completion) ** 2 / 2
    attention = 2 * 2 * LAYERS * h * attended
    head_passes = 3 if rows * vocab <= CHUNK_ELEMENTS else 4
    return 3 * (per_token * tokens + attention) + head_passes * 2 * h * vocab * rows


def digits(rng, n):
    return "".join(rng.choice("0123456789") for _ in range(n))


def groups(n: int, seed: int = 0, k: int = K):
    """n labelled groups of k completions (default 8), half right (label 1) and half wrong (label 0)."""
    rng = random.Random(seed)
    return [{"id": f"q{i}", "prompt": digits(rng, PROMPT_DIGITS),
             "completions": [digits(rng, COMPLETION_DIGITS) for _ in range(k)],
             "labels": [1.0] * (k // 2) + [0.0] * (k - k // 2)} for i in range(n)]


class PeakRSS:
    """Context manager: ``.peak_mb`` is the highest RSS seen inside, minus the RSS on entry."""

    def __enter__(self):
        self.proc = psutil.Process()
        self.start = self.peak = self.proc.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def _poll(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)
        self.peak_mb = (self.peak - self.start) / 2**20


def timed(fn, repeats: int):
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up, and the peak RSS increase (MB)."""
    fn()
    times = []
    with PeakRSS() as mem:
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(times), mem.peak_mb


def in_fresh_process(fn, *args):
    """Run ``fn(*args)`` in a spawned process (clean memory high-water mark) and return its result."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def machine():
    import platform

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    return {"cpu": cpu, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version()}


def print_table(title, header, rows):
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    for r in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(r, widths)))


def final_json(name, data):
    print(json.dumps({"benchmark": name, "machine": machine(), **data}))
