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
