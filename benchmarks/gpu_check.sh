#!/usr/bin/env bash
# GPU check: bf16 AFT steps on a randomly initialised ~1B Llama; prints tokens/s and peak GPU memory.
#
#   bash benchmarks/gpu_check.sh                 # defaults: 4 groups x 8 candidates x 512 tokens a step
#   N_GROUPS=8 N_CANDIDATES=8 SEQ=1024 STEPS=20 bash benchmarks/gpu_check.sh
#
# One process, one GPU. Each step is what `aft align` does per batch: score every candidate (the chunked
# completion log-probs of aft.scoring), the AFT boundary-constrained loss plus NLL (aft.losses), backward,
# AdamW; float32 weights under bf16 autocast (what --bf16 does), with activation checkpointing. Nothing is
# downloaded: the model is random, the token ids too (speed and memory do not depend on their values).
# Exits 0 with a message where there is no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-.venv/bin/python}"
[ -x "$PYTHON" ] || PYTHON=python3
exec "$PYTHON" - <<'PY'
import os, time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aft import losses
from aft.scoring import completion_logprobs, sequence_scores

if not torch.cuda.is_available():
    print("gpu_check: no CUDA GPU here; nothing to measure")
    raise SystemExit(0)

G, K = int(os.environ.get("N_GROUPS", 4)), int(os.environ.get("N_CANDIDATES", 8))
SEQ, STEPS, WARMUP = int(os.environ.get("SEQ", 512)), int(os.environ.get("STEPS", 10)), 3
PROMPT = SEQ // 4                                    # a quarter prompt, the rest completion (GSM8K-like)
device = torch.device("cuda")
torch.manual_seed(0)
# ~1.1B parameters: Llama-3.2-1B's shape with a 32k vocabulary.
config = LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                     num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                     tie_word_embeddings=True, attn_implementation="sdpa")
model = LlamaForCausalLM(config).to(device)
model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
model.config.use_cache = False
model.train()
params = sum(p.numel() for p in model.parameters())
optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

n = G * K
input_ids = torch.randint(3, config.vocab_size, (n, SEQ), device=device)
attention_mask = torch.ones_like(input_ids)
completion_mask = torch.zeros_like(input_ids, dtype=torch.bool)
completion_mask[:, PROMPT:] = True
labels = (torch.arange(K, device=device) < K // 2).float().expand(G, K)   # half positives, half negatives
mask = torch.ones(G, K, dtype=torch.bool, device=device)


def step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        sums, counts = completion_logprobs(model, input_ids, attention_mask, completion_mask)
    scores = sequence_scores(sums, counts).view(G, K)
    loss = losses.nll_loss(sums, counts, labels.reshape(-1)) + losses.alignment_loss(
        scores, labels, mask, constraint="boundary", beta=0.5)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss


for _ in range(WARMUP):
    step()
torch.cuda.synchronize()
torch.cuda.reset_peak_memory_stats()
start = time.perf_counter()
for _ in range(STEPS):
    loss = step()
torch.cuda.synchronize()
seconds = time.perf_counter() - start
tokens = n * SEQ * STEPS
print(f"device          {torch.cuda.get_device_name()}")
print(f"model           random Llama, {params / 1e9:.2f}B parameters, float32 weights, bf16 autocast, "
      f"activation checkpointing")
print(f"batch           {G} groups x {K} candidates x {SEQ} tokens ({PROMPT} prompt) = {n * SEQ} tokens/step")
print(f"steps           {STEPS} timed after {WARMUP} warm-up, last loss {loss.item():.3f}")
print(f"throughput      {tokens / seconds:,.0f} tokens/s ({seconds / STEPS:.3f} s/step)")
print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB allocated, "
      f"{torch.cuda.max_memory_reserved() / 2**30:.1f} GiB reserved")
PY
