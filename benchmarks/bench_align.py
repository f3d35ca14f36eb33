"""Items 1, 2 and 5 of issue 6: an AFT align step against TRL's DPOTrainer and against a plain SFT step,
and the machine's matrix-multiply rate with the align step's share of it.

    .venv/bin/python benchmarks/bench_align.py [--groups 4]

Every row trains the same small Llama (4 layers, hidden 256, 8k vocabulary, fp32, AdamW) through a real
``Trainer.train()`` on the same groups (k = 8: 4 right, 4 wrong; ~100 prompt + ~120 completion tokens), one
group per optimizer step; the time is the median step after a warm-up step, per group. TRL's DPO gets the
same preference information as every (right, wrong) pair of a group (16 pairs, one step) with its frozen
reference model, and, separately, one pair per group. The SFT row is a plain NLL step on the group's 8
(prompt, completion) sequences, so "tokens" are the same 8 x 220 for SFT and AFT. The last two rows repeat
AFT and one-pair DPO under bf16 autocast (``bf16=True``), which pays on CPUs with AMX / AVX512-BF16.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import common  # noqa: E402


class StepTimes(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_begin(self, args, state, control, **kw):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        self.times.append(time.perf_counter() - self.start)


def _train(trainer, steps):
    timer = StepTimes()
    trainer.add_callback(timer)
    with common.PeakRSS() as mem:
        trainer.train()
    return statistics.median(timer.times[1:]), mem.peak_mb


def run(kind: str, n_groups: int, option=None):
    """One configuration in this (fresh) process: (seconds per step, groups per step, peak RSS MB)."""
    from aft.data import GroupCollator, SFTCollator, tokenize_group
    from collections import Counter

    tok = common.tokenizer()
    data = common.groups(n_groups)
    out = tempfile.mkdtemp()
    model = common.model(tok)
    torch.manual_seed(0)
    if kind in ("aft", "sft"):
        from aft.train import AlignConfig, AlignTrainer, SFTConfig, SFTTrainer

        feats = [tokenize_group(tok, g, 512, Counter(), "positives") for g in data]
        if kind == "aft":
            args = AlignConfig(output_dir=out, loss="aft", constraint="boundary", nll_on="positives",
                               per_device_train_batch_size=1, max_steps=n_groups, report_to=[], logging_steps=1000,
                               prefix_sharing=option != "unshared", bf16=option == "bf16", use_cpu=True,
                               candidate_micro_batch=2 if option == "micro" else None)
            trainer = AlignTrainer(model=model, args=args, train_dataset=feats,
                                   data_collator=GroupCollator(tok.pad_token_id, "positives"))
            return (*_train(trainer, n_groups), 1)
        seqs = [{"prompt_ids": f["prompt_ids"], "completion_ids": c} for f in feats for c in f["completion_ids"]]
        args = SFTConfig(output_dir=out, per_device_train_batch_size=common.K, max_steps=n_groups, report_to=[],
                         logging_steps=1000)
        trainer = SFTTrainer(model=model, args=args, train_dataset=seqs, data_collator=SFTCollator(tok.pad_token_id))
        return (*_train(trainer, n_groups), 1)

    import trl
    from datasets import Dataset

    pairs = []
    for g in data:
        right = [c for c, lab in zip(g["completions"], g["labels"]) if lab == 1]
        wrong = [c for c, lab in zip(g["completions"], g["labels"]) if lab == 0]
        every = [(r, w) for r in right for w in wrong]
        for r, w in (every if kind == "dpo_all" else every[:1]):
            pairs.append({"prompt": g["prompt"], "chosen": r, "rejected": w})
    per_step = len(pairs) // n_groups
    args = trl.DPOConfig(output_dir=out, per_device_train_batch_size=per_step, max_steps=n_groups, report_to=[],
                         bf16=option == "bf16", use_cpu=True, logging_steps=1000, save_strategy="no", max_length=1024)
    trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                             train_dataset=Dataset.from_list(pairs), processing_class=tok)
    return (*_train(trainer, n_groups), 1)


def matmul_rate(dtype, n: int = 2048, repeats: int = 10):
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    seconds, _ = common.timed(lambda: a @ b, repeats)
    return 2 * n**3 / seconds / 1e9


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--groups", type=int, default=4, help="groups (= optimizer steps) per configuration")
    a = p.parse_args()
    n = a.groups
    configs = [("AFT (prefix sharing)", "aft", None), ("AFT (no prefix sharing)", "aft", "unshared"),
               ("AFT (candidate_micro_batch=2)", "aft", "micro"), ("TRL DPO, all 16 pairs", "dpo_all", None),
               ("TRL DPO, 1 pair", "dpo_one", None), ("plain SFT (same 8 seqs)", "sft", None),
               ("AFT (prefix sharing), bf16 autocast", "aft", "bf16"), ("TRL DPO, 1 pair, bf16", "dpo_one", "bf16")]
    results = {}
    for name, kind, option in configs:
        step, peak, _ = common.in_fresh_process(run, kind, max(n, 3) if kind == "dpo_all" else n, option)
        results[name] = {"s_per_group": step, "peak_rss_mb": peak}
        print(f"  {name}: {step:.3f} s/group, peak RSS +{peak:.0f} MB", flush=True)
    tokens = common.K * 220
    base = results["AFT (prefix sharing)"]
    rows = [[name, f"{r['s_per_group']:.3f}", f"{r['peak_rss_mb']:.0f}", f"{tokens / r['s_per_group']:.0f}",
             f"{r['s_per_group'] / base['s_per_group']:.2f}"] for name, r in results.items()]
    common.print_table("Align step per group (k=8, 100+120 tokens; fp32 unless marked bf16)",
                       ["configuration", "s/group", "peak RSS MB", "tokens/s", "x AFT time"], rows)
    fp32, bf16 = matmul_rate(torch.float32), matmul_rate(torch.bfloat16)
    flops = common.step_flops()
    share = flops / base["s_per_group"] / 1e9 / fp32
    common.print_table("Matrix multiply (2048^3)", ["dtype", "GFLOP/s"], [["fp32", f"{fp32:.1f}"], ["bf16", f"{bf16:.1f}"]])
    print(f"AFT step: {flops / 1e9:.1f} GFLOP model FLOPs -> {flops / base['s_per_group'] / 1e9:.1f} GFLOP/s, "
          f"{share:.0%} of the fp32 matmul rate")
    summary = {
        "speedup_vs_dpo_all_pairs": results["TRL DPO, all 16 pairs"]["s_per_group"] / base["s_per_group"],
        "speedup_vs_dpo_one_pair": results["TRL DPO, 1 pair"]["s_per_group"] / base["s_per_group"],
        "speedup_vs_dpo_one_pair_bf16": (results["TRL DPO, 1 pair, bf16"]["s_per_group"]
                                         / results["AFT (prefix sharing), bf16 autocast"]["s_per_group"]),
        "memory_ratio_vs_dpo_all_pairs": base["peak_rss_mb"] / results["TRL DPO, all 16 pairs"]["peak_rss_mb"],
        "aft_over_sft_tokens_per_s": results["plain SFT (same 8 seqs)"]["s_per_group"] / base["s_per_group"],
        "matmul_gflops": {"fp32": fp32, "bf16": bf16}, "align_step_gflop": flops / 1e9, "align_share_of_fp32": share,
    }
    for k, v in summary.items():
        print(f"{k}: {v}")
    common.final_json("align", {"groups": n, "results": results, **summary})


if __name__ == "__main__":
    main()
