"""Prefix sharing (each group's prompt run once, its KV cache shared by the group's completions) gives the
same scores and the same gradients as scoring every (prompt, completion) sequence on its own."""

import pytest
import torch

from aft.data import GroupCollator
from aft.scoring import completion_logprobs


def groups(tokenizer):
    """Two groups with prompts of different lengths (so the prompt batch is left-padded) and completions of
    different lengths (so the completion batch is right-padded), plus a reference COT in the first."""
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return [
        {"prompt_ids": [tokenizer.bos_token_id] + tokenizer.encode("Tom has 3 apples and buys 4 more."),
         "completion_ids": [enc(" 3 + 4 = 7\n#### 7"), enc(" 8"), enc(" The answer is 42.")],
         "labels": [1.0, 0.0, 0.0], "positive": [True, False, False], "reference_ids": enc(" 3 + 4 = 7")},
        {"prompt_ids": [tokenizer.bos_token_id] + tokenizer.encode("A box"),
         "completion_ids": [enc(" holds 12 pens.\n#### 60"), enc(" 5")],
         "labels": [0.0, 1.0], "positive": [False, True]},
    ]


def test_scores_and_gradients_match_unshared(tiny_model, tokenizer):
    batch = GroupCollator(tokenizer.pad_token_id, "both")(groups(tokenizer))
    weights = torch.linspace(0.5, 2.0, batch["input_ids"].shape[0])  # any fixed function of the sums

    results = []
    for group_index in (None, batch["group_index"]):
        tiny_model.zero_grad()
        sums, counts = completion_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"],
                                           batch["completion_mask"], chunk_size=5, group_index=group_index)
        (weights * sums / counts).sum().backward()
        results.append((sums.detach(), counts, {n: w.grad.clone() for n, w in tiny_model.named_parameters()}))
    (plain_sums, plain_counts, plain_grads), (shared_sums, shared_counts, shared_grads) = results
    assert shared_counts.tolist() == plain_counts.tolist()
    torch.testing.assert_close(shared_sums, plain_sums, atol=1e-4, rtol=1e-5)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_different_prompts_in_one_group_raise(tiny_model, tokenizer):
    batch = GroupCollator(tokenizer.pad_token_id)(groups(tokenizer))
    with pytest.raises(ValueError, match="different prompts"):
        completion_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                            group_index=torch.zeros_like(batch["group_index"]))


def test_gradient_checkpointing_falls_back_to_plain(tiny_model, tokenizer):
    """Transformers drops the KV cache under gradient checkpointing, so sharing is skipped there."""
    batch = GroupCollator(tokenizer.pad_token_id)(groups(tokenizer))
    enable = getattr(tiny_model, "activation_checkpointing_enable", None) or tiny_model.gradient_checkpointing_enable
    enable()
    tiny_model.train()
    sums, _ = completion_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"],
                                  group_index=batch["group_index"])
    with torch.no_grad():
        plain, _ = completion_logprobs(tiny_model, batch["input_ids"], batch["attention_mask"],
                                       batch["completion_mask"])
    torch.testing.assert_close(sums.detach(), plain, atol=1e-4, rtol=1e-5)


ARCHITECTURES = {  # other decoder families, with sliding-window attention (window 8) shorter than the sequences
    "mistral": {"sliding_window": 8}, "gemma2": {"sliding_window": 8, "head_dim": 16},
    "qwen3": {"head_dim": 16}, "phi3": {}, "gpt_neox": {},
}


@pytest.mark.parametrize("architecture", sorted(ARCHITECTURES))
def test_other_architectures_score_and_train_the_same_shared(architecture):
    """Prefix sharing is on by default, so it must hold beyond Llama: cache layouts with sliding-window layers
    (gathered through ``batch_select_indices``) and other attention code give the same scores and gradients."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model(architecture, vocab_size=300, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=256, bos_token_id=1, eos_token_id=2, pad_token_id=0,
                                  **ARCHITECTURES[architecture])
    model = AutoModelForCausalLM.from_config(config).float().train()
    prompt = torch.randint(3, 300, (12,)).tolist()
    seqs = [prompt + torch.randint(3, 300, (n,)).tolist() for n in (10, 7, 14)]
    width = max(map(len, seqs))
    ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs])
    attention = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    completion = torch.zeros_like(ids)
    for row, s in enumerate(seqs):
        completion[row, len(prompt):len(s)] = 1
    results = []
    for group_index in (None, torch.zeros(3, dtype=torch.long)):
        model.zero_grad()
        sums, _ = completion_logprobs(model, ids, attention, completion, group_index=group_index)
        (sums * torch.tensor([1.0, -0.5, 2.0])).sum().backward()
        results.append((sums.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (shared, shared_grads) = results
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-5)
    assert shared_grads.keys() == plain_grads.keys()
    for name, grad in plain_grads.items():
        torch.testing.assert_close(shared_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)
