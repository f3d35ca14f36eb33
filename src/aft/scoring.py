"""Completion log-probabilities of a causal LM: the quantity every AFT loss is a function of.

    s(c) = (1/|c|) * sum_j log p(c_j | q, c_<j)      = logprob_sum / token_count

Only completion tokens count; prompt and padding never do. The vocabulary projection and its log-softmax
are computed only at completion positions and in chunks of rows, so the (batch x length x vocab) float32
log-softmax never exists at once: with a 150k vocabulary it would dwarf the model's activations. When a
graph is being built, each chunk is checkpointed, so its logits are recomputed in the backward pass
instead of being kept.
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint


def unwrap(model):
    """The plain transformers model under peft / DDP / compile wrappers (LoRA layers stay in place)."""
    while True:
        if hasattr(model, "get_base_model"):          # peft.PeftModel
            model = model.get_base_model()
        elif hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP, DeepSpeed
            model = model.module
        elif hasattr(model, "_orig_mod"):              # torch.compile
            model = model._orig_mod
        else:
            return model


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that ignore left padding, so a padded sequence scores like an unpadded one."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def _token_logprobs(hidden: torch.Tensor, targets: torch.Tensor, head: torch.nn.Module) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def hidden_states(model, input_ids, attention_mask, position_ids=None):
    """Last hidden states of the decoder stack (before the vocabulary projection)."""
    base = unwrap(model)
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    out = base.base_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          use_cache=False)
    return out.last_hidden_state


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, chunk_size: int = 1024, position_ids=None):
    """Sum of log-probabilities of each sequence's completion tokens, and how many there are.

    ``completion_mask`` (same shape as ``input_ids``) is True at the completion tokens: token t is
    predicted from position t-1, so position 0 is never scored. Returns ``(logprob_sums, token_counts)``,
    two 1-D tensors of length batch. ``chunk_size`` rows of the vocabulary projection are computed at a
    time.
    """
    targets_mask = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1]
    rows = hidden[targets_mask]                               # (N, H): only completion positions
    targets = input_ids[:, 1:][targets_mask]
    seq_index = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(targets_mask)
    seq_index = seq_index[targets_mask]
    head = unwrap(model).get_output_embeddings()
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        h, t = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and h.requires_grad:
            pieces.append(checkpoint(_token_logprobs, h, t, head, use_reentrant=False))
        else:
            pieces.append(_token_logprobs(h, t, head))
    token_logps = torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, seq_index, token_logps)
    return sums, targets_mask.sum(dim=1)


def sequence_scores(logprob_sums: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """The length-normalised score s(c) = sum / count (0 for an empty completion)."""
    return logprob_sums / token_counts.clamp(min=1).to(logprob_sums.dtype)
