"""Item 3 of issue 6: scoring one group (k = 8 completions of ~120 tokens after a ~100-token prompt), forward
and backward, with and without prefix sharing and vocabulary chunking, at 8k, 49k and 150k vocabularies.

    .venv/bin/python benchmarks/bench_scoring.py [--repeats 3]

Rows:
- naive: ``model(ids).logits`` then a float32 ``log_softmax`` over every position (what most code does);
- one chunk: ``aft.scoring`` with ``chunk_size`` above the row count (completion rows only, not chunked);
- chunked: ``aft.scoring`` (default chunk: 2^24 logits, e.g. 110 rows at 150k; recomputed in the backward);
- chunked + shared: the same with prefix sharing (each prompt once: 100 + 8*120 decoder tokens, not 8*220).
Prefix sharing's ideal saving is the decoder tokens saved, 1 - 1060/1760 = 39.8%; the vocabulary projection
runs on the 960 completion rows either way, so it cannot shrink.

Times: the four modes run round-robin in one process per vocabulary (the machine is shared, so modes timed
back to back see the same load), median of ``--repeats`` after a warm-up. Peak memory: one step of each
mode in a fresh process.
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import common  # noqa: E402

IDEAL_SAVING = 1 - (100 + common.K * 120) / (common.K * 220)


def flop_ideal_saving(vocab: int) -> float:
    """The time saving if time were proportional to model FLOPs (the projection's rows are the same in both)."""
    return 1 - common.step_flops(vocab, shared=True) / common.step_flops(vocab, shared=False)


def make_step(vocab: int, mode: str, model=None):
    from aft.data import GroupCollator, tokenize_group
    from aft.scoring import completion_logprobs

    tok = common.tokenizer()
    model = model or common.model(tok, vocab)
    feats = [tokenize_group(tok, g, 512, Counter(), "none") for g in common.groups(1)]
    b = GroupCollator(tok.pad_token_id)(feats)

    def step():
        model.zero_grad(set_to_none=True)
        if mode == "naive":
            logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
            logp = torch.log_softmax(logits, -1)
            mask = b["completion_mask"][:, 1:] & b["attention_mask"][:, 1:].bool()
            tok_logp = logp[:, :-1].gather(-1, b["input_ids"][:, 1:, None]).squeeze(-1)
            sums = (tok_logp * mask).sum(1)
        else:
            sums, _ = completion_logprobs(model, b["input_ids"], b["attention_mask"], b["completion_mask"],
                                          chunk_size=10**9 if mode == "one chunk" else None,
                                          group_index=b["group_index"] if mode == "chunked + shared" else None)
        sums.sum().backward()

    return step, model


def peak_memory(vocab: int, mode: str):
    step, _ = make_step(vocab, mode)
    with common.PeakRSS() as mem:
        step()
    return mem.peak_mb


def times(vocab: int, modes, repeats: int):
    import statistics
    import time

    steps, model = {}, None
    for mode in modes:
        steps[mode], model = make_step(vocab, mode, model)
        steps[mode]()  # warm-up
    seen = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            start = time.perf_counter()
            steps[mode]()
            seen[mode].append(time.perf_counter() - start)
    return {mode: statistics.median(v) for mode, v in seen.items()}


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vocabs", type=int, nargs="+", default=[8192, 49152, 150000])
    a = p.parse_args()
    modes = ["naive", "one chunk", "chunked", "chunked + shared"]
    results, rows = {}, []
    for vocab in a.vocabs:
        seconds = common.in_fresh_process(times, vocab, modes, a.repeats)
        for mode in modes:
            peak = common.in_fresh_process(peak_memory, vocab, mode)
            results.setdefault(str(vocab), {})[mode] = {"s": seconds[mode], "peak_rss_mb": peak}
            print(f"  vocab {vocab} {mode}: {seconds[mode]:.3f} s, +{peak:.0f} MB", flush=True)
        r = results[str(vocab)]
        for mode in modes:
            rows.append([vocab, mode, f"{r[mode]['s']:.3f}", f"{r[mode]['peak_rss_mb']:.0f}",
                         f"{r[mode]['s'] / r['naive']['s']:.2f}", f"{r[mode]['peak_rss_mb'] / r['naive']['peak_rss_mb']:.2f}"])
    common.print_table("Scoring one group, forward + backward (fp32)",
                       ["vocab", "mode", "s", "peak RSS MB", "time / naive", "memory / naive"], rows)
    summary = {}
    for vocab, r in results.items():
        saving = 1 - r["chunked + shared"]["s"] / r["chunked"]["s"]
        summary[vocab] = {"prefix_saving": saving, "prefix_saving_of_ideal": saving / IDEAL_SAVING,
                          "flop_ideal_saving": flop_ideal_saving(int(vocab)),
                          "chunked_memory_over_naive": r["chunked"]["peak_rss_mb"] / r["naive"]["peak_rss_mb"],
                          "chunked_memory_over_one_chunk": r["chunked"]["peak_rss_mb"] / r["one chunk"]["peak_rss_mb"]}
        print(f"vocab {vocab}: prefix sharing saves {saving:.1%} of time (ideal {IDEAL_SAVING:.1%}: "
              f"{saving / IDEAL_SAVING:.0%} of it; FLOP-weighted ideal {flop_ideal_saving(int(vocab)):.1%}); chunked peak memory = "
              f"{summary[vocab]['chunked_memory_over_naive']:.2f} x naive")
    common.final_json("scoring", {"repeats": a.repeats, "ideal_prefix_saving": IDEAL_SAVING, "results": results,
                                  "summary": summary})


if __name__ == "__main__":
    main()
