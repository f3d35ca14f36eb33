"""Memory that does not grow with k: the exact gradient of a group loss, built from candidates in micro-batches.

Every align-stage loss depends on the model only through the per-sequence log-prob sums ``s`` (the scores
are sums / counts). So, by the chain rule, with ``L = f(s)``::

    dL/dtheta = sum_c (dL/ds_c) * ds_c/dtheta

1. score every sequence without a graph (``torch.no_grad``): activations of one layer at a time;
2. ``dL/ds`` by autograd on the small (sequences,) leaf tensor ``s`` (exactly the closed form of the loss,
   constraints and stop-gradients included, since the same loss code runs);
3. for each micro-batch of ``micro_batch`` sequences, score again with a graph and back-propagate
   ``sum_c (dL/ds_c) * s_c``. Peak memory is one micro-batch's graph, whatever k is.

The cost is one extra forward (step 1) per step. Dropout must be off (it is in Llama by default), or the
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
    groups = inputs["group_index"] if prefix_sharing else None
    with torch.no_grad(), autocast():
        sums, counts = completion_logprobs(model, inputs["input_ids"], inputs["attention_mask"],
                                           inputs["completion_mask"], chunk_size, group_index=groups)
    leaf = sums.detach().requires_grad_()
    out = objective(leaf, counts)
    loss = out[0] if isinstance(out, tuple) else out
    (weights,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    if weights is None:  # the loss does not depend on the model (no trainable term in this batch)
        weights = torch.zeros_like(leaf)
    n = sums.shape[0]
    starts = list(range(0, n, micro_batch))
    for i, start in enumerate(starts):
        index = torch.arange(start, min(start + micro_batch, n), device=sums.device)
        if i < len(starts) - 1 and not bool(weights[index].any()):
            continue  # e.g. a negative under "detach" with no NLL: it gets no gradient at all
        part = _rows(inputs, index)
        with no_sync() if i < len(starts) - 1 else contextlib.nullcontext():
            with autocast():
                mb_sums, _ = completion_logprobs(model, part["input_ids"], part["attention_mask"],
                                                 part["completion_mask"], chunk_size,
                                                 group_index=part["group_index"] if prefix_sharing else None)
            backward(scale * (weights[index] * mb_sums).sum())
    if isinstance(out, tuple):
        return (loss.detach(),) + tuple(out[1:])
    return loss.detach()
