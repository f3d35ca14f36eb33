"""aft.decode: the fused decode step gives the model's own logits (exactly in float32), writes the cache as
the model's forward does, is made again when the weights change, and is used only where it applies."""

import copy

import pytest
import torch

from aft.decode import LlamaDecodeStep, decode_step, projection
from aft.generation import _new_cache, generate

PROMPTS = ["Tom has 3 apples", "A box holds 12 pens. 5 boxes", "3 + 4 =", "Step"]


@pytest.fixture
def gqa_model(make_llama):
    """A tiny Llama whose 4 query heads share 2 key/value heads, lively weights."""
    model = make_llama(32, 48, heads=4, kv_heads=2, seed=3)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


def both_steps(model, tokenizer, extra=4):
    """One decode step after a left-padded prefill, by the fused step and by the model's forward, each on
    its own copy of the pre-allocated cache: (fused logits, model logits, fused cache, model cache, width)."""
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]
    width = max(len(x) for x in ids)
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) + [0] * extra for x in ids])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = _new_cache(model, width + extra)
    with torch.no_grad():
        model(input_ids=torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in ids]),
              attention_mask=mask[:, :width], position_ids=positions[:, :width], cache=cache, use_cache=True)
        theirs = copy.deepcopy(cache)
        tokens, position = torch.tensor([5, 9, 11, 7]), mask.sum(-1)
        mask[:, width] = 1
        expected = model(input_ids=tokens[:, None], attention_mask=mask[:, :width + 1], position_ids=position[:, None],
                         cache=theirs, use_cache=True).logits[:, -1]
    got = decode_step(model)(tokens, position, cache.layers, mask[:, :width + 1].bool())
    return got, expected, cache, theirs, width


@pytest.mark.parametrize("fixture", ["gqa_model", "tiny_model"])
def test_logits_and_cache_equal_the_models_forward_in_float32(fixture, tokenizer, request):
    model = request.getfixturevalue(fixture)
    assert isinstance(decode_step(model), LlamaDecodeStep)
    got, expected, cache, theirs, width = both_steps(model, tokenizer)
    assert torch.equal(got, expected)
    for mine, ref in zip(cache.layers, theirs.layers):
        assert mine.get_seq_length() == ref.get_seq_length() == width + 1
        assert torch.equal(mine.keys, ref.keys) and torch.equal(mine.values, ref.values)


def test_bfloat16_step_is_close_to_the_models_forward(gqa_model, tokenizer):
    got, expected, *_ = both_steps(gqa_model.to(torch.bfloat16), tokenizer)
    assert got.dtype == torch.bfloat16  # stacked products round differently in bf16: close, not equal
    assert (got.float() - expected.float()).abs().max() < 0.05 * expected.float().abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_projections_equal_the_layers_products_at_any_row_count(dtype):
    torch.manual_seed(0)
    q, k = torch.randn(96, 32, dtype=dtype), torch.randn(16, 32, dtype=dtype)
    one, both = projection(q), projection(q, k)
    for rows in (1, 7, 64, 300):  # packed for a 64-row hint, right for every count
        x = torch.randn(rows, 32, dtype=dtype)
        assert torch.equal(one(x), torch.nn.functional.linear(x, q))
        got_q, got_k = both(x)
        if dtype == torch.float32:  # one product each: the layers' own
            assert torch.equal(got_q, one(x)) and torch.equal(got_k, torch.nn.functional.linear(x, k))
        else:  # one stacked product: each column the same dot product, summed in its own order
            assert torch.allclose(got_q.float(), one(x).float(), rtol=0.02, atol=0.05)


def test_made_once_and_again_when_the_weights_change(gqa_model):
    first = decode_step(gqa_model)
    assert decode_step(gqa_model) is first
    with torch.no_grad():
        gqa_model.lm_head.weight.add_(1.0)  # an optimizer step changes parameters in place
    assert decode_step(gqa_model) is not first


def test_used_only_where_it_applies(gqa_model):
    from peft import LoraConfig, get_peft_model

    biased = copy.deepcopy(gqa_model)
    biased.config.attention_bias = True
    training = copy.deepcopy(gqa_model).train()
    training.config.attention_dropout = 0.1
    lora = get_peft_model(copy.deepcopy(gqa_model), LoraConfig(r=2, target_modules=["q_proj"]))
    for model in (biased, training, lora):
        assert decode_step(model) is None
    assert decode_step(copy.deepcopy(gqa_model).train()) is not None  # no dropout: training mode is the same


def test_no_packed_copy_where_memory_is_short(gqa_model, monkeypatch):
    import psutil

    bf16 = copy.deepcopy(gqa_model).to(torch.bfloat16)
    size = sum(p.numel() * p.element_size() for p in bf16.parameters())
    monkeypatch.setattr(psutil, "virtual_memory", lambda: type("Memory", (), {"available": 3 * size})())
    assert decode_step(bf16) is None  # the copy would take a third of what is left
    assert decode_step(gqa_model) is not None  # float32: no copy is made


def test_generate_gives_the_same_samples_with_and_without_the_fused_step(gqa_model, tokenizer):
    args = dict(k=3, temperature=1.0, max_new_tokens=10, seed=4, stops=())
    fused = generate(gqa_model, tokenizer, PROMPTS, **args)
    assert fused == generate(gqa_model, tokenizer, PROMPTS, fused_step=False, **args)
    greedy = generate(gqa_model, tokenizer, PROMPTS, max_new_tokens=10, stops=())
    assert greedy == generate(gqa_model, tokenizer, PROMPTS, max_new_tokens=10, stops=(), fused_step=False)
