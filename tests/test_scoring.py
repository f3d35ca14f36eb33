"""completion_logprobs against a plain full-softmax computation, with left and right padding."""

import pytest
import torch

from aft.scoring import completion_logprobs, sequence_scores


def reference_logprobs(model, prompt_ids, completion_ids):
    """The obvious way: one unpadded sequence, full log-softmax over the vocabulary, sum completion tokens."""
    ids = torch.tensor([prompt_ids + completion_ids])
    logp = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    total = sum(logp[len(prompt_ids) + j - 1, tok].item() for j, tok in enumerate(completion_ids))
    return total, len(completion_ids)


def pad_batch(pairs, pad_id, side):
    """Batch (prompt, completion) token lists with padding on ``side``; completion_mask marks completions."""
    width = max(len(p) + len(c) for p, c in pairs)
    ids, attn, comp = [], [], []
    for p, c in pairs:
        seq, pad = p + c, width - len(p) - len(c)
        mask = [0] * len(p) + [1] * len(c)
        if side == "left":
            ids.append([pad_id] * pad + seq), attn.append([0] * pad + [1] * len(seq)), comp.append([0] * pad + mask)
        else:
            ids.append(seq + [pad_id] * pad), attn.append([1] * len(seq) + [0] * pad), comp.append(mask + [0] * pad)
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(comp, dtype=torch.bool)


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("chunk_size", [1, 3, 1024])
def test_matches_full_softmax(tiny_model, tokenizer, side, chunk_size):
    tiny_model.eval()
    pairs = [
        (tokenizer.encode("Tom has 3 apples."), tokenizer.encode(" 3 + 4 = 7")),
        (tokenizer.encode("A box"), tokenizer.encode(" holds 12 pens.\n#### 60")),
        (tokenizer.encode("Question: How many apples does he have? Answer:"), tokenizer.encode(" 7")),
    ]
    ids, attn, comp = pad_batch(pairs, tokenizer.pad_token_id, side)
    with torch.no_grad():
        sums, counts = completion_logprobs(tiny_model, ids, attn, comp, chunk_size=chunk_size)
        for k, (p, c) in enumerate(pairs):
            ref_sum, ref_count = reference_logprobs(tiny_model, p, c)
            assert counts[k].item() == ref_count
            assert sums[k].item() == pytest.approx(ref_sum, abs=1e-4)
    assert sequence_scores(sums, counts).tolist() == pytest.approx((sums / counts).tolist())


def test_prompt_and_padding_never_count(tiny_model, tokenizer):
    tiny_model.eval()
    p, c = tokenizer.encode("Tom has 3 apples."), tokenizer.encode(" 7")
    ids, attn, comp = pad_batch([(p, c), (p + c + c + c, c)], tokenizer.pad_token_id, "right")
    with torch.no_grad():
        _, counts = completion_logprobs(tiny_model, ids, attn, comp)
    assert counts.tolist() == [len(c), len(c)]


def test_gradients_match_full_softmax(tiny_model, tokenizer):
    p, c = tokenizer.encode("Tom has 3 apples."), tokenizer.encode(" 3 + 4 = 7")
    ids, attn, comp = pad_batch([(p, c)], tokenizer.pad_token_id, "right")
    sums, _ = completion_logprobs(tiny_model, ids, attn, comp, chunk_size=2)  # checkpointed chunks
    sums.sum().backward()
    chunked = {n: w.grad.clone() for n, w in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    logp = torch.log_softmax(tiny_model(ids).logits.float(), dim=-1)[0]
    sum(logp[len(p) + j - 1, tok] for j, tok in enumerate(c)).backward()
    for n, w in tiny_model.named_parameters():
        torch.testing.assert_close(chunked[n], w.grad, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_equals_the_checkpointed_module_path(autocast):
    """The hand-written backward of the vocabulary projection gives autograd's gradients (fp32: to rounding;
    bf16 autocast: to bf16 precision), for weighted, chunked rows."""
    from aft.scoring import _FusedTokenLogprobs, _head_logprobs

    torch.manual_seed(0)
    head = torch.nn.Linear(16, 50, bias=False)
    model = type("M", (), {"get_output_embeddings": lambda self: head})()
    rows, targets = torch.randn(7, 16, requires_grad=True), torch.randint(0, 50, (7,))
    weights = torch.linspace(-1.0, 2.0, 7)
    results = []
    for fused in (True, False):
        rows.grad, head.weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _head_logprobs(model, rows, targets, chunk_size=3, fused=fused)
        (out * weights).sum().backward()
        results.append((out.detach(), rows.grad, head.weight.grad))
    tol = {"atol": 2e-2, "rtol": 2e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, **tol)
    assert results[0][1].abs().sum() > 0 and results[0][2].abs().sum() > 0
    calls = []
    original = _FusedTokenLogprobs.apply
    _FusedTokenLogprobs.apply = lambda *a: calls.append(1) or original(*a)
    try:
        _head_logprobs(model, rows, targets, chunk_size=3)
        head.bias = torch.nn.Parameter(torch.zeros(50))  # a head with a bias goes through the module
        _head_logprobs(model, rows, targets, chunk_size=3)
    finally:
        _FusedTokenLogprobs.apply = original
    assert len(calls) == 1  # one call does all chunks; a head with a bias is not fused


@pytest.mark.parametrize("autocast", [False, True])
def test_fused_head_gives_the_same_result_in_one_chunk_or_many(autocast):
    """All rows in one chunk keeps the softmax for the backward instead of recomputing it; many chunks add
    their weight gradients into one buffer. Both give the same values and gradients, and a frozen head gets
    no gradient while its rows still do."""
    from aft.scoring import _FusedTokenLogprobs

    torch.manual_seed(1)
    weight = torch.randn(50, 16, requires_grad=True)
    rows, targets = torch.randn(7, 16, requires_grad=True), torch.randint(0, 50, (7,))
    weights = torch.linspace(-1.0, 2.0, 7)
    results = []
    for chunk in (7, 2, 100):
        rows.grad, weight.grad = None, None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = _FusedTokenLogprobs.apply(rows, weight, targets, chunk)
        (out * weights).sum().backward()
        results.append((out.detach(), rows.grad, weight.grad))
    expected = torch.log_softmax(rows.detach() @ weight.detach().T, -1).gather(-1, targets[:, None]).squeeze(-1)
    tol = {"atol": 3e-2, "rtol": 2e-2} if autocast else {"atol": 1e-6, "rtol": 1e-5}
    torch.testing.assert_close(results[0][0], expected, **tol)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            torch.testing.assert_close(a, b, **tol)  # bf16: chunks round their partial sums separately
    frozen = weight.detach()
    rows.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = _FusedTokenLogprobs.apply(rows, frozen, targets, 3)
    (out * weights).sum().backward()
    torch.testing.assert_close(rows.grad, results[0][1], **tol)
