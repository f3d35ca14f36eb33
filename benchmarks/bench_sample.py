"""Item 4 of issue 6: ``aft sample``'s batched generation against a plain per-question ``generate`` loop.

    .venv/bin/python benchmarks/bench_sample.py [--questions 8 --batch-size 8]

Both sample k = 8 completions of up to ``--new-tokens`` tokens for the same questions (~100-token random-digit
prompts of different lengths) from the same small Llama (4 layers, hidden 256, 8k vocabulary, fp32), with the
KV cache and temperature 1. "aft sample" is ``aft.sample.generate_batch`` over the question batches of
``plan_batches`` (sorted by prompt length, several questions per ``generate`` call, each sequence stopping at
EOS); the baseline calls ``generate`` once per question (its k samples as ``num_return_sequences``). A random
model rarely emits EOS, so both generate to the limit: this measures batching, not early stopping.
Tokens/s counts generated tokens; the two runs alternate ``--repeats`` times and the medians are reported.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import common  # noqa: E402


def main():
    from aft.sample import generate_batch, plan_batches

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (aft sample)")
    p.add_argument("--new-tokens", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2)
    a = p.parse_args()
    tok = common.tokenizer()
    model = common.model(tok).eval()
    rng = random.Random(0)
    prompts = [common.digits(rng, rng.randint(80, 120)) for _ in range(a.questions)]
    eos = tok.eos_token_id
    new_tokens = lambda seqs: sum(len(s) for group in seqs for s in group)  # noqa: E731

    def batched():
        out = []
        for batch in plan_batches(tok, prompts, a.batch_size):
            out += generate_batch(model, tok, [prompts[i] for i in batch], common.K, 1.0, 1.0, a.new_tokens, seed=0)
        return out

    def per_question():
        out = []
        for prompt in prompts:
            ids = tok(prompt, return_tensors="pt")
            with torch.no_grad():
                gen = model.generate(**ids, do_sample=True, temperature=1.0, top_k=0, max_new_tokens=a.new_tokens,
                                     num_return_sequences=common.K, pad_token_id=tok.pad_token_id, eos_token_id=eos)
            out.append([g[ids["input_ids"].shape[1]:].tolist() for g in gen])
        return out

    # generated tokens, counted once from token ids (text lengths differ from token counts)
    counted = per_question()
    tokens = sum(len([t for t in s if t != tok.pad_token_id]) for g in counted for s in g)
    seen = {"aft sample (batched)": [], "per-question generate loop": []}
    for _ in range(a.repeats):
        for name, fn in (("aft sample (batched)", batched), ("per-question generate loop", per_question)):
            start = time.perf_counter()
            fn()
            seen[name].append(time.perf_counter() - start)
    results = {name: {"s": statistics.median(v), "tokens_per_s": tokens / statistics.median(v)}
               for name, v in seen.items()}
    rows = [[name, f"{r['s']:.2f}", f"{r['tokens_per_s']:.0f}"] for name, r in results.items()]
    common.print_table(f"Sampling {a.questions} questions x k={common.K}, up to {a.new_tokens} new tokens "
                       f"({tokens} generated)", ["method", "s", "tokens/s"], rows)
    speedup = results["aft sample (batched)"]["tokens_per_s"] / results["per-question generate loop"]["tokens_per_s"]
    print(f"aft sample / per-question loop: {speedup:.2f}x tokens/s")
    common.final_json("sample", {"questions": a.questions, "batch_size": a.batch_size, "generated_tokens": tokens,
                                 "results": results, "speedup": speedup})


if __name__ == "__main__":
    main()
