"""aft.kernels: the C decode attention equals PyTorch's attention over each row's own columns, reads no
other column, does not depend on the rows beside a row or the thread count, is built once, and is left
out (PyTorch's attention instead) where it cannot be built or is turned off; the element-wise kernels give
the model's own norm, rotary embedding and SiLU product in bfloat16."""

import copy
import shutil

import pytest
import torch
import torch.nn.functional as F

from aft import kernels
from aft.decode import LlamaDecodeStep, decode_step
from aft.kernels import Spans, decode_attention, decode_attention_available

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")


def cache_and_spans(rows=7, heads=2, groups=3, head_dim=64, capacity=40, pool=9, seed=0):
    """bf16 q, a pool x capacity cache of which a row reads [start, stop) (NaN in every other column), the
    spans, and the float32 reference: SDPA with the spans as a mask on finite copies."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(rows, heads, groups, head_dim, generator=g).bfloat16()
    keys = torch.randn(pool, heads, capacity, head_dim, generator=g).bfloat16()
    values = torch.randn(pool, heads, capacity, head_dim, generator=g).bfloat16()
    start = torch.randint(0, 12, (rows,), generator=g)
    stop = start + torch.randint(1, 25, (rows,), generator=g)
    columns = torch.arange(capacity)
    attend = (columns >= start[:, None]) & (columns < stop[:, None])
    mask = torch.zeros(rows, capacity).masked_fill(~attend, float("-inf"))[:, None, None]
    reference = F.scaled_dot_product_attention(q.float(), keys[:rows].float(), values[:rows].float(), attn_mask=mask,
                                               scale=head_dim ** -0.5)
    outside = torch.cat([~attend, torch.ones(pool - rows, capacity, dtype=torch.bool)])[:, None, :, None]
    keys.masked_fill_(outside, float("nan"))
    values.masked_fill_(outside, float("nan"))
    return q, keys, values, start, stop, reference, mask


@pytest.mark.parametrize("groups,head_dim", [(3, 64), (2, 16)])
def test_equals_attention_over_each_rows_own_columns_and_reads_no_other(groups, head_dim):
    q, keys, values, start, stop, reference, mask = cache_and_spans(groups=groups, head_dim=head_dim)
    got = decode_attention(q, keys[:7, :, :36], values[:7, :, :36], Spans(start, stop), head_dim ** -0.5)  # views
    assert got.dtype == torch.bfloat16 and got.shape == q.shape
    assert torch.isfinite(got).all()  # no NaN column was read
    # float32 inside, one bf16 rounding at the end: within half a bf16 unit of the reference
    assert torch.allclose(got.float(), reference, rtol=2 ** -8, atol=1e-3)
    finite = (keys.nan_to_num(), values.nan_to_num())
    sdpa = F.scaled_dot_product_attention(q, finite[0][:7], finite[1][:7], attn_mask=mask.bfloat16(),
                                          scale=head_dim ** -0.5)
    assert (got.float() - reference).abs().max() <= (sdpa.float() - reference).abs().max() + 1e-3


@pytest.mark.parametrize("sharpness", [0.01, 1.0, 40.0])
def test_softmax_stays_exact_from_flat_to_one_hot_scores(sharpness):
    """The kernel's exp is a polynomial (exp_poly): scores spread over hundreds (most of the exp
    terms below its -87 cut, so 0) or nearly equal still give the fp32 attention within half a bf16 unit."""
    q, keys, values, start, stop, _, mask = cache_and_spans(seed=3)
    q = (q.float() * sharpness).bfloat16()
    finite_k, finite_v = keys.nan_to_num()[:7], values.nan_to_num()[:7]
    reference = F.scaled_dot_product_attention(q.float(), finite_k.float(), finite_v.float(), attn_mask=mask,
                                               scale=0.125)
    got = decode_attention(q, keys, values, Spans(start, stop), 0.125)
    assert torch.allclose(got.float(), reference, rtol=2 ** -8, atol=1e-3)


def test_a_rows_result_depends_on_neither_the_rows_beside_it_nor_the_threads():
    q, keys, values, start, stop, *_ = cache_and_spans(rows=9, pool=9)
    together = decode_attention(q, keys, values, Spans(start, stop), 0.125)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        alone = [decode_attention(q[r:r + 1], keys[r:r + 1], values[r:r + 1], Spans(start[r:r + 1], stop[r:r + 1]),
                                  0.125)
                 for r in range(9)]
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(together, torch.cat(alone))


def test_siblings_read_their_shared_columns_from_the_source_row_and_get_the_same_result():
    """Three prompts' samples, rows interleaved (as compaction leaves them): each row's first columns (its
    prompt) are also in its prompt's source row. Reading them there gives exactly the same output, and only
    there: the rows' own copies are NaN."""
    q, keys, values, *_ = cache_and_spans(rows=9, pool=9, capacity=40)
    g = torch.Generator().manual_seed(5)
    keys, values = torch.randn(keys.shape, generator=g).bfloat16(), torch.randn(values.shape, generator=g).bfloat16()
    prompt = torch.tensor([0, 1, 2, 0, 1, 2, 2, 0, 1])
    first, length, begin = torch.tensor([0, 1, 2]), torch.tensor([5, 9, 14]), torch.tensor([3, 0, 2])
    start, shared = begin[prompt], length[prompt]
    stop = start + shared + torch.arange(1, 10)  # each row's generated columns after its prompt
    for cache in (keys, values):  # a prompt's columns: one copy in each of its rows
        for r in range(9):
            cache[r, :, start[r]:start[r] + shared[r]] = cache[first[prompt[r]], :, start[r]:start[r] + shared[r]]
    alone = decode_attention(q, keys, values, Spans(start, stop), 0.125)
    for cache in (keys, values):  # the non-source rows' copies are not read
        for r in range(3, 9):
            cache[r, :, start[r]:start[r] + shared[r]] = float("nan")
    spans = Spans(start, stop, (first[prompt], shared))
    assert spans.order.tolist() == [0, 3, 7, 1, 4, 8, 2, 5, 6]  # a prompt's rows one after another
    assert torch.equal(decode_attention(q, keys, values, spans, 0.125), alone)


def test_bad_inputs_raise():
    q, keys, values, start, stop, *_ = cache_and_spans()
    spans = Spans(start, stop)
    with pytest.raises(ValueError, match="bfloat16"):
        decode_attention(q.float(), keys, values, spans, 0.1)
    with pytest.raises(ValueError, match="start < stop"):
        Spans(start, start)  # a row with no column
    with pytest.raises(ValueError, match="up to column"):
        decode_attention(q, keys[:, :, :10], values[:, :, :10], spans, 0.1)  # past the columns given
    with pytest.raises(ValueError, match="do not fit"):
        decode_attention(q, keys[:, :1], values[:, :1], spans, 0.1)
    with pytest.raises(ValueError, match="source row"):
        Spans(start, stop, (torch.full((7,), 7), torch.zeros(7)))  # not a row of the batch
    with pytest.raises(ValueError, match="same column"):
        Spans(start, stop, (torch.zeros(7), torch.zeros(7)))  # rows starting elsewhere than row 0


def test_built_once_per_shape_into_the_kernel_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("AFT_KERNEL_DIR", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert decode_attention_available(3, 64)
        built = list(tmp_path.glob("decode_attention-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        kernels._library.cache_clear()  # a new process: loads the built library, no compiling

        def no_compiling(*args, **kwargs):
            raise AssertionError("compiled again")
        monkeypatch.setattr(kernels.subprocess, "run", no_compiling)
        assert decode_attention_available(3, 64) and built[0].stat().st_mtime_ns == stamp
        with pytest.raises(AssertionError, match="compiled again"):
            decode_attention_available(2, 64)  # another shape: its own library
    finally:
        kernels._library.cache_clear()


@pytest.mark.parametrize("width", [96, 101])  # 101: a row's last elements past the 16-wide loop
def test_add_rms_norm_is_the_residual_add_and_the_models_own_norm(width):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(width, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.normal_()
    g = torch.Generator().manual_seed(4)
    h, delta = (torch.randn(33, width, generator=g).mul(3).bfloat16() for _ in range(2))
    expected_h = h + delta
    got = kernels.add_rms_norm(h, delta, norm.weight, norm.variance_epsilon)
    assert torch.equal(h, expected_h)  # the sum, written into h: bf16(h + delta) as PyTorch rounds it
    with torch.no_grad():
        reference = norm(expected_h)
    assert torch.equal(got, reference)
    again = kernels.add_rms_norm(h, None, norm.weight, norm.variance_epsilon)  # no delta: h left as it was
    assert torch.equal(h, expected_h) and torch.equal(again, reference)


@pytest.mark.parametrize("width", [64, 77])
def test_silu_mul_is_silu_of_the_gate_times_up(width):
    g = torch.Generator().manual_seed(6)
    stacked = torch.randn(40, 2 * width, generator=g).mul(6).bfloat16()
    stacked[0, :4] = torch.tensor([-100.0, 100.0, 0.0, float("nan")])  # exp's cuts and NaN
    gate, up = stacked.split(width, -1)  # views of one product, as the step's gate and up are
    got, reference = kernels.silu_mul(gate, up), F.silu(gate) * up
    # the same bf16 roundings; exp is a polynomial, not PyTorch's, so a rare value may differ by one unit
    same = (got == reference) | (got.isnan() & reference.isnan())
    assert same.float().mean() > 0.99 and torch.isnan(got[0, 3])
    assert torch.allclose(got.float(), reference.float(), rtol=2 ** -7, atol=0, equal_nan=True)


@pytest.mark.parametrize("head_dim", [64, 24])  # 24: halves of 12, not a multiple of 16
def test_rotary_is_transformers_rotary_embedding_in_bf16(head_dim):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(8)
    heads, rows = 5, 11
    projected = torch.randn(rows, (heads + 4) * head_dim, generator=g).bfloat16()
    x = projected[:, :heads * head_dim]  # a view with the row stride of the stacked product
    cos, sin = (torch.randn(rows, head_dim, generator=g).bfloat16() for _ in range(2))
    heads_first = x.reshape(rows, heads, head_dim).transpose(0, 1)[None]  # (1, heads, rows, d): transformers' layout
    reference, _ = apply_rotary_pos_emb(heads_first, heads_first, cos[None], sin[None])
    assert torch.equal(kernels.rotary(x, cos, sin, heads), reference[0].transpose(0, 1))


def test_pointwise_kernels_refuse_what_they_cannot_read():
    x = torch.randn(4, 32).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        kernels.add_rms_norm(x.float(), None, torch.ones(32).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        kernels.add_rms_norm(x, None, torch.ones(31).bfloat16(), 1e-5)
    with pytest.raises(ValueError, match="one shape"):
        kernels.silu_mul(x[:, :16], torch.randn(4, 8).bfloat16())
    with pytest.raises(ValueError, match="rotary"):
        kernels.rotary(x, torch.ones(4, 16).bfloat16(), torch.ones(4, 16).bfloat16(), 3)


@pytest.fixture
def bf16_model(make_llama):
    return make_llama(96, 128, heads=6, kv_heads=2, seed=1).to(torch.bfloat16)  # 3 query heads a kv head


def step_logits(model, attend, tokens=(5, 9, 11)):
    """One fused decode step of 3 rows on a cache of random keys and values, reading ``attend``."""
    from aft.generation import _new_cache

    cache = _new_cache(model, attend.shape[1])
    torch.manual_seed(2)
    for layer in cache.layers:  # a cache filled as a prefill would, then the step writes its last column
        layer.update(torch.randn(3, 2, attend.shape[1] - 1, 16).bfloat16(), torch.randn(3, 2, attend.shape[1] - 1, 16).bfloat16())
    return decode_step(model)(torch.tensor(tokens), attend.sum(-1) - 1, cache.layers, attend)


def test_the_bfloat16_step_uses_it_where_rows_read_one_run_of_columns(bf16_model, monkeypatch):
    step = decode_step(bf16_model)
    assert isinstance(step, LlamaDecodeStep) and step.kernel
    calls = []
    monkeypatch.setattr("aft.decode.decode_attention", lambda *a: calls.append(a) or decode_attention(*a))
    attend = torch.ones(3, 9, dtype=torch.bool)
    attend[0, :4] = attend[1, :2] = False  # left padding: each row's columns are one run
    with_kernel = step_logits(bf16_model, attend)
    assert len(calls) == 2  # one per layer
    step.kernel = False
    with_sdpa = step_logits(bf16_model, attend)
    assert (with_kernel.float() - with_sdpa.float()).abs().max() < 0.05 * with_sdpa.float().abs().max()
    step.kernel, calls[:] = True, []
    attend[2, 3] = False  # a gap: PyTorch's attention with the mask
    step_logits(bf16_model, attend)
    assert not calls


def test_turned_off_or_without_a_compiler_the_step_uses_pytorchs_attention(bf16_model, tmp_path, monkeypatch):
    monkeypatch.setenv("AFT_KERNEL_DIR", str(tmp_path))  # nothing built there yet
    try:
        for name, value in (("AFT_KERNELS", "0"), ("CC", "no-such-compiler")):
            with monkeypatch.context() as m:
                m.setenv(name, value)
                kernels._library.cache_clear()
                assert not decode_step(copy.deepcopy(bf16_model)).kernel
    finally:
        kernels._library.cache_clear()
    assert not list(tmp_path.glob("*.so"))


def test_a_kernel_folder_that_cannot_be_written_leaves_pytorchs_attention(bf16_model, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("AFT_KERNEL_DIR", str(blocker / "kernels"))  # its parent is a file: mkdir fails
    kernels._library.cache_clear()
    try:
        assert not decode_attention_available(3, 16)
        assert not decode_step(copy.deepcopy(bf16_model)).kernel
    finally:
        kernels._library.cache_clear()
    assert blocker.read_text() == "not a folder"


def test_generate_reads_a_prompts_columns_once_for_its_samples_with_the_same_samples(bf16_model, tokenizer,
                                                                                      monkeypatch):
    from aft import generation

    prompts = ["Tom has 3 apples", "A box holds 12 pens. 5 boxes", "3 + 4 =", "Step"]
    args = dict(k=3, temperature=1.0, max_new_tokens=12, seed=2, stops=(), batch_tokens=6 * 40)  # 2 prompts at once
    made = []
    monkeypatch.setattr("aft.decode.Spans", lambda *a: made.append(a) or Spans(*a))
    shared = generation.generate(bf16_model, tokenizer, prompts, **args)
    assert made and all(siblings is not None for *_, siblings in made)
    monkeypatch.setattr(generation, "_siblings", lambda *a: None)  # every row reads its own copy
    assert generation.generate(bf16_model, tokenizer, prompts, **args) == shared


def test_the_prefill_on_the_kernels_is_as_close_to_float32_as_the_models_bf16_forward(make_llama, tokenizer):
    """``LlamaDecodeStep.prefill`` (bf16, C kernels, SDPA) against the model's own forward: the last
    position's logits and every real position's keys and values, each compared with the float32 model;
    its error is no more than twice the bf16 model's own. Padding positions' keys are never read."""
    from transformers import DynamicCache

    from aft.generation import _left_padded

    model = make_llama(96, 128, heads=6, kv_heads=2, seed=1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    prompts = ["Tom has 3 apples and buys 4 more", "A box holds 12 pens. 5 boxes", "3 + 4 =", "Step"]
    input_ids, mask, positions = _left_padded([tokenizer(p)["input_ids"] for p in prompts],
                                              tokenizer.pad_token_id, "cpu")

    def forward(m):
        cache = DynamicCache(config=m.config)
        with torch.no_grad():
            logits = m(input_ids=input_ids, attention_mask=mask, position_ids=positions, cache=cache,
                       use_cache=True, logits_to_keep=1).logits[:, -1]
        return logits.float(), [(layer.keys.float(), layer.values.float()) for layer in cache.layers]

    exact = forward(model)
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    step = decode_step(bf16)
    assert step.kernel
    logits, written = step.prefill(input_ids, mask, positions)
    fused = (logits.float(), [(k.float(), v.float()) for k, v in written])
    theirs = forward(bf16)
    real = mask.bool()[:, None, :, None]

    def error(got):
        errors = [(got[0] - exact[0]).abs().max()]
        for (k, v), (k0, v0) in zip(got[1], exact[1]):
            errors += [((k - k0) * real).abs().max(), ((v - v0) * real).abs().max()]
        return torch.stack(errors)

    assert (error(fused) <= 2 * error(theirs) + 1e-2).all()


def test_top_candidates_are_the_k_largest_lowest_ids_first_and_the_rests_log_sum_exp():
    g = torch.Generator().manual_seed(9)
    logits = torch.randint(-20, 20, (6, 300), generator=g).float().div(4).bfloat16()  # many ties
    logits[0, 250:] = -200.0  # a rest far below its candidates
    values, ids, rest = kernels.top_candidates(logits, 16, 0.7)
    assert torch.equal(ids, ids.sort(-1).values)  # each row's in increasing id
    assert torch.equal(values, logits.gather(-1, ids).float())
    for r in range(6):
        order = sorted(range(300), key=lambda i: (-logits[r, i].item(), i))  # by value, lowest id first
        assert ids[r].tolist() == sorted(order[:16])
    others = logits.float().div(0.7).scatter(-1, ids, float("-inf")).logsumexp(-1).double()
    assert torch.allclose(rest, others, rtol=1e-5, atol=1e-5)
    assert torch.isneginf(kernels.top_candidates(logits, 300, 0.7)[2]).all()  # no rest
    with pytest.raises(ValueError, match="top_candidates"):
        kernels.top_candidates(logits, 301, 0.7)


def test_gumbel_max_on_bf16_logits_draws_the_same_tokens_through_the_c_pass():
    """Distinct logits (no ties at the k-th): the C pass gives the candidates and the exact rest, the
    PyTorch pass the same candidates and a bound, and every row draws the same token; with 3 candidates the
    rest often wins, and the frequencies are softmax(logits / T)."""
    from aft import generation

    g = torch.Generator().manual_seed(1)
    logits = (torch.randperm(200, generator=g).float() / 40).bfloat16()  # 200 distinct bf16 values
    n = 20000
    draw = lambda: generation.gumbel_max(logits.expand(n, -1).contiguous(), 0.7,  # noqa: E731
                                         [generation._row_generator(0, "p", c) for c in range(n)], candidates=3)
    in_c = draw()
    with pytest.MonkeyPatch.context() as m:
        m.setattr(generation, "top_candidates_available", lambda: False)
        assert torch.equal(draw(), in_c)
    seen = torch.bincount(in_c, minlength=200).double() / n
    expected = (logits.double() / 0.7).softmax(0)
    assert (seen - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max() + 1e-3
    assert (logits.topk(3).indices[:, None] != in_c).all(0).float().mean() > 0.05  # the rest's tokens won too
