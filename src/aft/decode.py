"""One decode step of a Llama-architecture model on its own weights: what ``aft.generation`` runs on a CPU.

A decode step reads one new token per row. At the sizes ``aft sample`` and ``aft eval`` run on a CPU (a
135M-parameter model, 16 to 256 rows, 2 cores) the model's own forward spends much of the step outside its
matrix products; this step does the same arithmetic with less around it:

- in bfloat16 (float16) the q, k and v projections are one matrix product, and the gate and up projections
  another (fewer, larger products), and every weight is packed once, for the whole generation, into the
  blocked layout oneDNN's AMX / AVX512 kernels read (``torch.nn.Linear`` lays it out again at every call;
  PyTorch's own compiler packs weights the same way). In float32 each product is the model's own
  ``linear``;
- the normalisations, the rotary embedding (the model's own ``rotary_emb``) and the attention
  (``scaled_dot_product_attention`` with the query heads of a key/value head packed together, as
  transformers does for one query token) are the model's arithmetic in the model's order, so in float32
  the logits equal the model's forward (``tests/test_decode.py``);
- in bfloat16, where a C compiler is at hand, the attention reads only each row's own cache columns and the
  norms, residual adds, rotary embedding and SiLU run as one pass per row each (``aft.kernels``), with
  PyTorch's arithmetic and roundings.

It reads and writes the pre-allocated cache of ``aft.generation`` and is used only where ``supports`` says
so: a ``LlamaForCausalLM`` on a CPU, without attention dropout or biases, SiLU, one tensor-parallel slice.
Everything else (other architectures, LoRA-wrapped models, GPUs) decodes through the model's forward.
In bfloat16 the stacked, packed weights are a second copy of the model's layers, made once per model and
state of its weights, and only where it takes less than a quarter of the memory available.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from aft.kernels import (Spans, add_rms_norm, decode_attention, decode_attention_available,
                         pointwise_available, rotary, silu_mul)

_steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def projection(*weights: torch.Tensor):
    """``x -> x @ w.T`` for each weight (a tuple when there are several).

    In bfloat16 / float16 on oneDNN the weights are stacked into one product and packed once (a copy); in
    float32, or where packing is not available or not the product ``torch.nn.Linear`` computes, each weight
    is its own ``linear``, as in the model (a stacked float32 product can round differently on small shapes)."""
    sizes = [w.shape[0] for w in weights]
    if weights[0].dtype in (torch.bfloat16, torch.float16) and torch.backends.mkldnn.is_available():
        stacked = torch.cat(weights)
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(stacked, 64)  # a row-count hint: any count works
            product = lambda x: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")  # noqa: E731
            probe = torch.randn(3, stacked.shape[1], dtype=stacked.dtype)
            if torch.equal(product(probe), F.linear(probe, stacked)):
                return (lambda x: product(x).split(sizes, -1)) if len(weights) > 1 else product
        except (RuntimeError, AttributeError):  # a build without these oneDNN ops
            pass
    if len(weights) > 1:
        return lambda x: tuple(F.linear(x, w) for w in weights)
    return lambda x: F.linear(x, weights[0])


class LlamaDecodeStep:
    """Logits of one new token per row, its keys and values written into the cache."""

    @staticmethod
    def supports(model) -> bool:
        from transformers import LlamaForCausalLM

        c = model.config
        return (type(model) is LlamaForCausalLM and (not model.training or not c.attention_dropout)
                and next(model.parameters()).device.type == "cpu"
                and c.hidden_act == "silu" and getattr(c, "pretraining_tp", 1) == 1
                and not getattr(c, "attention_bias", False) and not getattr(c, "mlp_bias", False))

    def __init__(self, model):
        inner, c = model.model, model.config
        attention = inner.layers[0].self_attn
        self.heads, self.kv_heads, self.head_dim = c.num_attention_heads, c.num_key_value_heads, attention.head_dim
        self.scaling, self.rotary, self.embed = attention.scaling, inner.rotary_emb, inner.embed_tokens
        self.final_norm = inner.norm
        # bfloat16: attention over each row's own columns and the element-wise work in C (aft.kernels); else
        # (float32, or no C compiler) PyTorch's SDPA and operators, the model's own arithmetic
        self.kernel = (next(model.parameters()).dtype == torch.bfloat16 and pointwise_available()
                       and decode_attention_available(self.heads // self.kv_heads, self.head_dim))
        self.head = projection(model.get_output_embeddings().weight)
        self.layers = []
        for layer in inner.layers:
            a, m = layer.self_attn, layer.mlp
            self.layers.append((
                layer.input_layernorm,
                projection(a.q_proj.weight, a.k_proj.weight, a.v_proj.weight),
                projection(a.o_proj.weight),
                layer.post_attention_layernorm,
                projection(m.gate_proj.weight, m.up_proj.weight),
                projection(m.down_proj.weight)))

    @torch.no_grad()
    def __call__(self, tokens, positions, cache_layers, attend: torch.Tensor, siblings=None) -> torch.Tensor:
        """``tokens`` and ``positions`` (rows,); ``cache_layers`` pre-allocated (``aft.generation``), the new
        keys and values written at their next column; ``attend`` (rows, columns + 1) bool, the cache columns
        each row reads, the new one included; ``siblings`` (optional): ``(source, shared)``, row r's first shared[r]
        columns are a copy of row source[r]'s (``aft.kernels.Spans``). Returns (rows, vocab) logits."""
        rows, d = tokens.shape[0], self.head_dim
        h = self.embed(tokens)
        cos, sin = self.rotary(h, positions[:, None])  # (rows, 1, d): broadcast over the heads
        spans = self._spans(attend, siblings) if self.kernel else None  # kernel: a bf16 model's step
        if spans is None:  # an additive mask, made once for the step's layers: SDPA converts a boolean one
            mask = torch.zeros(attend.shape, dtype=h.dtype, device=h.device).masked_fill_(~attend, float("-inf"))
            mask = mask[:, None, None, :]
        h, normed = self._add_norm(h, None, self.layers[0][0])
        for i, ((_, qkv, *_), layer) in enumerate(zip(self.layers, cache_layers)):
            q, k, v = qkv(normed)
            q, k = self._rotate(q, cos, sin, self.heads), self._rotate(k, cos, sin, self.kv_heads)
            keys, values = layer.update(k[:, :, None], v.view(rows, self.kv_heads, 1, d))  # written in place
            # the query heads that share a key/value head become its query rows: no copy of the cache
            q = q.view(rows, self.kv_heads, -1, d)
            if spans is not None:  # each row's own columns only
                o = decode_attention(q, keys, values, spans, self.scaling)
            else:
                o = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling)
            h, normed = self._rest_of_layer(i, h, o.reshape(rows, self.heads * d))
        return self.head(normed)

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor):
        """The prompts' pass, on the same kernels (``self.kernel`` only: bfloat16 with the C kernels; else
        ``generate`` runs the model's forward). ``input_ids``, ``mask``, ``positions`` (batch, width), left
        padded. Returns (the last position's logits (batch, vocab), [(keys, values) (batch, kv_heads, width,
        d) per layer]). Every position is one row of the products; the attention is SDPA, causal within a
        prompt and blind to its padding (a padding position attends to itself only: its keys and values are
        never read)."""
        batch, width = input_ids.shape
        rows, d = batch * width, self.head_dim
        h = self.embed(input_ids.reshape(rows))
        cos, sin = self.rotary(h, positions.reshape(rows, 1))
        sees = torch.ones(width, width, dtype=torch.bool, device=h.device).tril() & mask[:, None, :].bool()
        sees = (sees | torch.eye(width, dtype=torch.bool, device=h.device))[:, None]  # (batch, 1, width, width)
        heads_first = lambda x, n: x.reshape(batch, width, n, d).transpose(1, 2)  # noqa: E731
        written = []
        h, normed = self._add_norm(h, None, self.layers[0][0])
        for i, (_, qkv, *_) in enumerate(self.layers):
            q, k, v = qkv(normed)
            q, k = self._rotate(q, cos, sin, self.heads), self._rotate(k, cos, sin, self.kv_heads)
            k, v = heads_first(k, self.kv_heads), heads_first(v, self.kv_heads)
            o = F.scaled_dot_product_attention(heads_first(q, self.heads), k, v, attn_mask=sees, scale=self.scaling,
                                               enable_gqa=True)
            written.append((k, v))
            h, normed = self._rest_of_layer(i, h, o.transpose(1, 2).reshape(rows, self.heads * d))
        return self.head(normed.view(batch, width, -1)[:, -1]), written

    def _rest_of_layer(self, i, h, attended):
        """Layer i after its attention: the output product and the MLP, each added to the residual stream h,
        and h normalised for what reads it next (layer i + 1, or the head). Returns (h, normalised h)."""
        _, _, out, norm2, gate_up, down = self.layers[i]
        h, normed = self._add_norm(h, out(attended), norm2)
        gate, up = gate_up(normed)
        after = self.layers[i + 1][0] if i + 1 < len(self.layers) else self.final_norm
        return self._add_norm(h, down(silu_mul(gate, up) if self.kernel else F.silu(gate) * up), after)

    def _add_norm(self, h, delta, norm):
        """(h + delta, norm(h + delta)): the residual stream and its normalisation (``delta`` None: h's). With
        the C kernels the sum is written into h, in one pass with the norm."""
        if self.kernel:
            return h, add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
        h = h if delta is None else h + delta
        return h, norm(h)

    def _rotate(self, x, cos, sin, heads):
        """The rotary embedding of (rows, heads * d) x: (rows, heads, d)."""
        if self.kernel:
            return rotary(x, cos[:, 0], sin[:, 0], heads)
        x, half = x.view(x.shape[0], heads, self.head_dim), self.head_dim // 2
        return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin

    @staticmethod
    def _spans(attend: torch.Tensor, siblings=None):
        """The columns each row reads (``aft.kernels.Spans``), where they are one run per row (as ``generate``
        writes them: a row's prompt, then its tokens); None where a row's columns are not contiguous."""
        columns = torch.arange(attend.shape[1], device=attend.device)
        start = torch.where(attend, columns, attend.shape[1]).amin(-1)
        stop = torch.where(attend, columns + 1, 0).amax(-1)
        if not bool(((stop - start) == attend.sum(-1)).all() & (stop > start).all()):
            return None
        return Spans(start, stop, siblings)


def _room_for_packed_copy(model) -> bool:
    """In bfloat16 / float16 the step holds a packed copy of the layers: made only where it takes less than a
    quarter of the memory available (a CPU user's 7B model is not doubled into swap)."""
    import psutil  # accelerate's dependency

    if next(model.parameters()).dtype == torch.float32:  # no copy: the layers' own weights
        return True
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    return size < psutil.virtual_memory().available / 4


def decode_step(model) -> LlamaDecodeStep | None:
    """The model's ``LlamaDecodeStep``, made once per model and state of its weights; None where unsupported."""
    if not LlamaDecodeStep.supports(model):
        return None
    stamp = tuple((p.data_ptr(), p._version) for p in model.parameters())  # changed weights: made again
    found = _steps.get(model)
    if found is None or found[0] != stamp:
        if not _room_for_packed_copy(model):  # asked only when a copy would be made
            return None
        found = _steps[model] = (stamp, LlamaDecodeStep(model))
    return found[1]
