"""Memory that does not grow with k: the exact gradient of a group loss, built from candidates in micro-batches.

Every align-stage loss depends on the model only through the per-sequence log-prob sums ``s`` (the scores
are sums / counts). So, by the chain rule, with ``L = f(s)``::

    dL/dtheta = sum_c (dL/ds_c) * ds_c/dtheta

1. score every sequence without a graph (``torch.no_grad``), in the same micro-batches: activations of one
   layer of one micro-batch at a time;
2. ``dL/ds`` by autograd on the small (sequences,) leaf tensor ``s`` (exactly the closed form of the loss,
   constraints and stop-gradients included, since the same loss code runs);
3. for each micro-batch of ``micro_batch`` sequences, score again with a graph and back-propagate
   ``sum_c (dL/ds_c) * s_c``. Peak memory is one micro-batch's graph, whatever k is.

The cost is one extra forward (step 1) per step, in micro-batches (with prefix sharing, each micro-batch
runs its groups' prompts again). Dropout must be off (it is in Llama by default), or the
re-run in step 3 sees different masks from step 1. ``objective`` is any function of ``(sums, counts)``
returning the loss (and anything else to pass back); ``backward`` is the caller's backward (the Trainer's
``accelerator.backward``, so mixed-precision loss scaling applies); ``no_sync`` a context factory that
defers DDP's all-reduce to the last micro-batch.
"""

from __future__ import annotations

import contextlib

import torch

from aft.scoring import completion_logprobs


def _rows(inputs, index):
    keys = ("input_ids", "attention_mask", "completion_mask", "group_index")
    return {k: inputs[k][index] for k in keys}


def micro_batched_backward(model, inputs, objective, micro_batch: int, scale: float = 1.0,
                           backward=None, no_sync=None, chunk_size: int | None = None, prefix_sharing: bool = False,
                           autocast=None):
    """Back-propagate ``scale * objective(sums, counts)[0]`` through ``model`` in micro-batches of sequences.

    ``inputs`` is a ``GroupCollator`` batch. Returns what ``objective`` returned on the graph-free scores
    (its loss detached). The gradients are accumulated into the parameters' ``.grad``, as ``backward()``
    on the one-pass loss would. ``autocast`` (a context-manager factory, e.g. ``accelerator.autocast``) is
    entered around each forward, not around the backward passes.
    """
    backward = backward or (lambda t: t.backward())
    no_sync = no_sync or contextlib.nullcontext
    autocast = autocast or contextlib.nullcontext
    n = inputs["input_ids"].shape[0]
    parts = [_rows(inputs, torch.arange(start, min(start + micro_batch, n), device=inputs["input_ids"].device))
             for start in range(0, n, micro_batch)]

    def score(part):
        return completion_logprobs(model, part["input_ids"], part["attention_mask"], part["completion_mask"],
                                   chunk_size, group_index=part["group_index"] if prefix_sharing else None)

    with torch.no_grad(), autocast():
        scored = [score(part) for part in parts]
    sums, counts = torch.cat([s for s, _ in scored]), torch.cat([c for _, c in scored])
    leaf = sums.detach().requires_grad_()
    out = objective(leaf, counts)
    loss = out[0] if isinstance(out, tuple) else out
    (weights,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if weights is None:  # the loss does not depend on the model (no trainable term in this batch)
        weights = torch.zeros_like(leaf)
    for i, part in enumerate(parts):
        w = weights[i * micro_batch:(i + 1) * micro_batch]
        last = i == len(parts) - 1
        if not last and not bool(w.any()):
            continue  # e.g. a negative under "detach" with no NLL: it gets no gradient at all
        with no_sync() if not last else contextlib.nullcontext():
            with autocast():
                mb_sums, _ = score(part)
            backward(scale * (w * mb_sums).sum())
    if isinstance(out, tuple):
        return (loss.detach(),) + tuple(out[1:])
    return loss.detach()
