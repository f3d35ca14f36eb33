"""Completion log-probabilities of a causal LM: the quantity every AFT loss is a function of.

    s(c) = (1/|c|) * sum_j log p(c_j | q, c_<j)      = logprob_sum / token_count

Only completion tokens count; prompt and padding never do. The vocabulary projection and its log-softmax
are computed only at completion positions and in chunks of rows, so the (batch x length x vocab) float32
log-softmax never exists at once: with a 150k vocabulary it would dwarf the model's activations. When a
graph is being built, no chunk's logits are kept: a fused function recomputes them in the backward pass and
forms their gradient in place (``_FusedTokenLogprobs``; heads it cannot read directly, such as LoRA-wrapped
or sharded ones, are checkpointed instead).

Prefix sharing (``group_index`` given): the k candidates of a question share its prompt, so the prompt is
run once per group with the KV cache on, the cache is gathered once per candidate (``batch_select_indices``,
differentiable), and only the completion tokens run again, attending to it. That is P + k*C tokens through
the decoder instead of k*(P + C). Gradients flow through the shared cache into the prompt's computation, so
scores and gradients equal the unshared ones. Transformers drops the cache under gradient checkpointing, so
there the plain path is used. It calls the decoder stack itself, past the model's forward: accelerate's
autocast, which wraps that forward, must be entered by the caller (``AlignTrainer`` does), and multi-process
wrappers are refused (``AlignTrainer`` turns sharing off by default where one holds the model).
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
    """Last hidden states of the decoder stack (after its final norm, before the vocabulary projection).

    The call goes through the outermost wrapper's forward: DDP all-reduces gradients, and FSDP / DeepSpeed
    gather their shards, only for a forward they see. ``logits_to_keep=1`` keeps the model from computing
    the full (batch x length x vocab) logits; the scorer projects only completion positions itself.
    """
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
                output_hidden_states=True, logits_to_keep=1)
    return out.hidden_states[-1]


CHUNK_ELEMENTS = 2**24  # default chunk: 64 MB of float32 logits (about 110 rows at a 150k vocabulary)


class _FusedTokenLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ W.T)[target]`` over all rows, ``chunk_size`` rows at a time, with a hand-written
    backward that never holds more than one chunk of vocabulary-sized values.

    Forward keeps each row's log-sum-exp; backward recomputes a chunk's logits and turns them into the
    gradient in place, ``dlogits = grad * (onehot(target) - softmax)``, then the two matrix products.
    Why by hand: autograd through checkpointing recomputes the logits too, but then makes several more
    vocab-sized passes (log-sum-exp again, its backward, the gather's zero-filled backward) and returns a
    whole vocab x hidden weight gradient per chunk for autograd to add up: at a 150k vocabulary that is
    154 MB allocated and summed per 110-row chunk. Here the chunks add into one buffer (``addmm_``). When
    all rows fit in one chunk, the softmax itself is kept for the backward instead of recomputed (one matrix
    product fewer; it is no more memory than the chunk already takes). The autocast dtype of the forward is
    applied explicitly to both passes, so bf16 runs compute the products in bf16, accumulating in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size: int):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        with torch.autocast(device, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            n = h.shape[0]
            out = torch.empty(n, dtype=torch.float32, device=hidden.device)
            lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
            kept = None
            for s in range(0, n, chunk_size):
                logits = (h[s:s + chunk_size] @ w.T).float()
                lse[s:s + chunk_size] = torch.logsumexp(logits, dim=-1)
                out[s:s + chunk_size] = logits.gather(-1, targets[s:s + chunk_size].unsqueeze(-1)).squeeze(-1)
                if n <= chunk_size:
                    kept = logits.sub_(lse.unsqueeze(-1)).exp_()    # the softmax, for the backward
        ctx.dtype, ctx.chunk_size = dtype, chunk_size
        ctx.save_for_backward(hidden, weight, targets, lse, kept)
        return out - lse

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, targets, lse, kept = ctx.saved_tensors
        dtype, chunk = ctx.dtype, ctx.chunk_size
        need_hidden, need_weight = ctx.needs_input_grad[:2]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if need_weight else None
        with torch.autocast(hidden.device.type, enabled=False):
            h, w = hidden.to(dtype), weight.to(dtype)
            for s in range(0, h.shape[0], chunk):
                g, t = grad[s:s + chunk].unsqueeze(-1), targets[s:s + chunk].unsqueeze(-1)
                if kept is not None:
                    dlogits = kept * -g                                           # -grad * softmax
                else:
                    dlogits = (h[s:s + chunk] @ w.T).float()
                    dlogits.sub_(lse[s:s + chunk].unsqueeze(-1)).exp_().mul_(-g)
                dlogits.scatter_add_(1, t, g)                                     # +grad at the target
                dlogits = dlogits.to(dtype)
                if need_hidden:
                    grad_hidden[s:s + chunk] = dlogits @ w
                if need_weight:
                    if dtype == torch.float32:
                        grad_weight.addmm_(dlogits.T, h[s:s + chunk])
                    else:
                        grad_weight += dlogits.T @ h[s:s + chunk]
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return grad_hidden, grad_weight, None, None


def _fusable(head) -> bool:
    """A plain, unsharded, bias-free ``nn.Linear`` head (most causal LMs). LoRA-wrapped heads, DeepSpeed ZeRO-3
    or FSDP shards (whose weight is only whole inside the module's own forward) go through the module."""
    weight = getattr(head, "weight", None)
    return (type(head) is torch.nn.Linear and head.bias is None and isinstance(weight, torch.nn.Parameter)
            and type(weight.data) is torch.Tensor and weight.dim() == 2 and weight.numel() > 0
            and not hasattr(weight, "ds_id"))


def _head_logprobs(model, rows, targets, chunk_size, fused: bool = True):
    """log p(target) of each (hidden row, target) pair, ``chunk_size`` rows of the vocabulary at a time."""
    head = unwrap(model).get_output_embeddings()
    if chunk_size is None:
        chunk_size = max(1, CHUNK_ELEMENTS // head.weight.shape[0])
    grad = torch.is_grad_enabled() and (rows.requires_grad or head.weight.requires_grad)
    fused = fused and grad and _fusable(head)
    if fused:
        return _FusedTokenLogprobs.apply(rows, head.weight, targets, chunk_size)
    pieces = []
    for start in range(0, rows.shape[0], chunk_size):
        h, t = rows[start:start + chunk_size], targets[start:start + chunk_size]
        if grad:
            pieces.append(checkpoint(_token_logprobs, h, t, head, use_reentrant=False))
        else:
            pieces.append(_token_logprobs(h, t, head))
    return torch.cat(pieces) if pieces else rows.new_zeros(0, dtype=torch.float32)


def completion_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        completion_mask: torch.Tensor, chunk_size: int | None = None, position_ids=None,
                        group_index: torch.Tensor | None = None):
    """Sum of log-probabilities of each sequence's completion tokens, and how many there are.

    ``completion_mask`` (same shape as ``input_ids``) is True at the completion tokens: token t is
    predicted from position t-1, so position 0 is never scored. Returns ``(logprob_sums, token_counts)``,
    two 1-D tensors of length batch. ``chunk_size`` rows of the vocabulary projection are computed at a
    time (default: as many as fit in ``CHUNK_ELEMENTS`` logits, so the chunk's memory does not grow with the
    vocabulary). With ``group_index`` (one group id per sequence; sequences of a group must share their prompt,
    prompt before completion) each group's prompt is processed once (``shared_prefix_logprobs``).
    """
    if group_index is not None and position_ids is None and _can_share(model):
        return shared_prefix_logprobs(model, input_ids, attention_mask, completion_mask, group_index, chunk_size)
    targets_mask = completion_mask[:, 1:].bool() & attention_mask[:, 1:].bool()
    if _fsdp_sharded(model):
        return _logprobs_from_forward(model, input_ids, attention_mask, position_ids, targets_mask)
    hidden = hidden_states(model, input_ids, attention_mask, position_ids)[:, :-1]
    rows = hidden[targets_mask]                               # (N, H): only completion positions
    targets = input_ids[:, 1:][targets_mask]
    seq_index = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(targets_mask)
    seq_index = seq_index[targets_mask]
    token_logps = _head_logprobs(model, rows, targets, chunk_size)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    sums = sums.index_add(0, seq_index, token_logps)
    return sums, targets_mask.sum(dim=1)


def _fsdp_sharded(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(unwrap(model), FSDPModule)


def _logprobs_from_forward(model, input_ids, attention_mask, position_ids, targets_mask):
    """``completion_logprobs`` through the model's own forward, all logits kept: FSDP2 (as accelerate shards a
    model: the final norm, embeddings and head form one unit) gathers, frees and reduce-scatters that unit's
    weights on hooks around the forward, and a head applied after the forward reads freed weights in the backward
    (a segmentation fault on CPU). Costs the (batch x length x vocab) logits the chunked path avoids."""
    if position_ids is None:
        position_ids = position_ids_for(attention_mask)
    logits = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                   use_cache=False).logits[:, :-1]
    rows, targets = logits[targets_mask].float(), input_ids[:, 1:][targets_mask]
    token_logps = rows.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(rows, dim=-1)
    seq_index = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(targets_mask)
    sums = torch.zeros(input_ids.shape[0], dtype=torch.float32, device=input_ids.device)
    return sums.index_add(0, seq_index[targets_mask], token_logps), targets_mask.sum(dim=1)


def is_wrapped(model) -> bool:
    """Whether a DDP / DataParallel / DeepSpeed / FSDP-style wrapper holds the model (as ``.module``)."""
    return isinstance(getattr(model, "module", None), torch.nn.Module)


def _can_share(model) -> bool:
    """Prefix sharing runs the decoder stack directly, past any wrapper's forward: under DDP / FSDP /
    DeepSpeed that would skip gradient syncing and shard gathering, so it is refused there."""
    if is_wrapped(model):
        raise ValueError("prefix_sharing works on one process only (no DDP / FSDP / DeepSpeed wrapper); "
                         "turn it off for multi-process training")
    base = unwrap(model)
    checkpointed = getattr(base, "is_activation_checkpointing", None)  # transformers >= 5.x name
    if checkpointed is None:
        checkpointed = getattr(base, "is_gradient_checkpointing", False)
    return not (checkpointed and base.training and torch.is_grad_enabled())


def _split(ids, attention, completion):
    """One sequence's real tokens as (prompt, completion) id lists; the prompt must come first."""
    real = attention.bool()
    comp = completion.bool() & real
    prompt_part, comp_part = ids[real & ~comp].tolist(), ids[comp].tolist()
    n_prompt = int((real & ~comp).sum())
    if comp.any() and bool((real.cumsum(0)[comp] <= n_prompt).any()):
        raise ValueError("prefix sharing needs each sequence's prompt before its completion")
    return prompt_part, comp_part


def _gather_cache(cache, slot):
    """One cache entry per candidate. ``index_select`` where the layers are plain ``DynamicLayer``s: its
    backward is an ``index_add`` (the plain indexing of ``batch_select_indices`` back-propagates through an
    accumulating ``index_put``, 3-4% of a whole scoring step on CPU); other cache layouts use the method."""
    from transformers.cache_utils import DynamicLayer

    if all(type(layer) is DynamicLayer for layer in cache.layers):
        for layer in cache.layers:
            layer.keys, layer.values = layer.keys.index_select(0, slot), layer.values.index_select(0, slot)
    else:
        cache.batch_select_indices(slot)


def shared_prefix_logprobs(model, input_ids, attention_mask, completion_mask, group_index, chunk_size=None):
    """``completion_logprobs`` with each group's prompt run once (same inputs, same result).

    1. the G distinct prompts, left-padded, go through the decoder with a fresh ``DynamicCache``;
    2. the cache is gathered to one entry per sequence (a differentiable index, no copy of the weights);
    3. the completions, right-padded, run on top with positions continuing after their prompt. The first
       completion token is predicted from the prompt's last hidden state, the others from the completion's.
    """
    from transformers import DynamicCache

    base = unwrap(model)
    device = input_ids.device
    groups = group_index.tolist()
    prompts, completions = {}, []
    ids_cpu, attn_cpu, comp_cpu = input_ids.cpu(), attention_mask.cpu(), completion_mask.cpu()  # one sync
    for row, g in enumerate(groups):
        prompt, completion = _split(ids_cpu[row], attn_cpu[row], comp_cpu[row])
        if not prompt:
            raise ValueError("prefix sharing needs a non-empty prompt (e.g. BOS) to predict the first token")
        if prompts.setdefault(g, prompt) != prompt:
            raise ValueError(f"prefix sharing: sequences of group {g} have different prompts")
        completions.append(completion)
    order = list(prompts)                                      # group id -> row of the prompt batch
    slot = torch.tensor([order.index(g) for g in groups], device=device)
    p_len = torch.tensor([len(prompts[g]) for g in order], device=device)
    p_width, pad = int(p_len.max()), 0
    prompt_ids = torch.tensor([[pad] * (p_width - len(prompts[g])) + prompts[g] for g in order], device=device)
    prompt_mask = (torch.arange(p_width, device=device) >= p_width - p_len.unsqueeze(1)).long()
    cache = DynamicCache(config=base.config)
    prompt_hidden = base.base_model(input_ids=prompt_ids, attention_mask=prompt_mask,
                                    position_ids=position_ids_for(prompt_mask), cache=cache,
                                    use_cache=True).last_hidden_state
    c_len = torch.tensor([len(c) for c in completions], device=device)
    c_width = max(1, int(c_len.max()))
    comp_ids = torch.tensor([c + [pad] * (c_width - len(c)) for c in completions], device=device)
    comp_mask = torch.arange(c_width, device=device) < c_len.unsqueeze(1)
    _gather_cache(cache, slot)
    hidden = base.base_model(input_ids=comp_ids, attention_mask=torch.cat([prompt_mask[slot], comp_mask.long()], 1),
                             position_ids=p_len[slot].unsqueeze(1) + torch.arange(c_width, device=device),
                             cache=cache, use_cache=True).last_hidden_state
    # hidden state that predicts completion token j: the prompt's last for j = 0, the completion's j-1 after
    predictors = torch.cat([prompt_hidden[slot, -1:], hidden[:, :-1]], dim=1)
    token_logps = _head_logprobs(model, predictors[comp_mask], comp_ids[comp_mask], chunk_size)
    seq_index = torch.arange(len(groups), device=device).unsqueeze(1).expand_as(comp_mask)[comp_mask]
    sums = torch.zeros(len(groups), dtype=torch.float32, device=device).index_add(0, seq_index, token_logps)
    return sums, c_len


def sequence_scores(logprob_sums: torch.Tensor, token_counts: torch.Tensor) -> torch.Tensor:
    """The length-normalised score s(c) = sum / count (0 for an empty completion)."""
    return logprob_sums / token_counts.clamp(min=1).to(logprob_sums.dtype)
