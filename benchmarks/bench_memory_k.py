"""Issue 6, "memory that does not grow with k": peak memory of one AFT align step (forward + backward of one
group of k candidates) computed in one pass and with ``candidate_micro_batch``, as k grows.

    .venv/bin/python benchmarks/bench_memory_k.py [--ks 8 16 32] [--micro 2]

Same model and lengths as the other benchmarks (~100-token prompt, ~120-token completions, half of the k
right). One step in a fresh process per (k, mode) for its memory (the first step: nothing cached from an
earlier one), a second step in the same process for its time. One-pass activations grow with k; the
micro-batched step holds one micro-batch's graph at a time, so what grows with k is only the graph-free
scoring pass and the k scores.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import common  # noqa: E402


def run(k: int, micro: int | None):
    """(peak RSS MB of the first step, seconds of the second) for one group of k candidates."""
    from aft.data import GroupCollator, tokenize_group
    from aft.train import AlignConfig, AlignTrainer

    tok = common.tokenizer()
    model = common.model(tok)
    model.train()
    feats = [tokenize_group(tok, g, 512, Counter(), "positives") for g in common.groups(1, k=k)]
    batch = GroupCollator(tok.pad_token_id, "positives")(feats)
    args = AlignConfig(output_dir=tempfile.mkdtemp(), loss="aft", constraint="boundary", nll_on="positives",
                       candidate_micro_batch=micro, report_to=[])
    trainer = AlignTrainer(model=model, args=args)

    def step():
        model.zero_grad(set_to_none=True)
        trainer.compute_loss(model, batch).backward()  # a no-op leaf when micro-batched (it back-propagated)

    with common.PeakRSS() as mem:
        step()
    start = time.perf_counter()
    step()
    return mem.peak_mb, time.perf_counter() - start


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ks", type=int, nargs="+", default=[8, 16, 32])
    p.add_argument("--micro", type=int, default=2, help="candidate_micro_batch of the micro-batched rows")
    a = p.parse_args()
    results, rows = {}, []
    for k in a.ks:
        one_mb, one_s = common.in_fresh_process(run, k, None)
        micro_mb, micro_s = common.in_fresh_process(run, k, a.micro)
        results[k] = {"one_pass": {"peak_rss_mb": one_mb, "s": one_s},
                      "micro_batched": {"peak_rss_mb": micro_mb, "s": micro_s}}
        rows.append([k, f"{one_mb:.0f}", f"{micro_mb:.0f}", f"{micro_mb / one_mb:.2f}", f"{one_s:.2f}",
                     f"{micro_s:.2f}"])
    common.print_table(f"One AFT step on one group of k candidates (candidate_micro_batch={a.micro})",
                       ["k", "one pass MB", "micro MB", "micro / one", "one pass s", "micro s"], rows)
    first, last = results[a.ks[0]], results[a.ks[-1]]
    growth = {mode: last[mode]["peak_rss_mb"] / first[mode]["peak_rss_mb"] for mode in first}
    print(f"k {a.ks[0]} -> {a.ks[-1]}: one-pass peak x{growth['one_pass']:.2f}, "
          f"micro-batched peak x{growth['micro_batched']:.2f}")
    common.final_json("memory_k", {"micro": a.micro, "results": results, "growth": growth})


if __name__ == "__main__":
    main()
