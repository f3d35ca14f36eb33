"""aft.generation: the fast path gives transformers' greedy outputs, its sampler is exact and does not depend
on the batch, finished rows leave the batch without changing anything, batches are sized by tokens."""

import copy

import pytest
import torch

import aft.generation as generation
from aft.generation import generate, generation_dtype, gumbel_max, nucleus_mask, plan_batches

PROMPTS = ["Tom has 3 apples", "A box holds 12 pens. 5 boxes", "3 + 4 =", "The answer is 42. Question:",
           "Step", "12 * 5 = 60 pens.\n#### 60 Question: Tom"]


def plain_generate(model, tokenizer, prompts, max_new_tokens):
    """transformers' ``generate``, greedy, left padding (what ``aft sample`` ran before): token ids, texts."""
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    width, pad = max(len(x) for x in ids), tokenizer.pad_token_id
    out = model.generate(input_ids=torch.tensor([[pad] * (width - len(x)) + x for x in ids]),
                         attention_mask=torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids]),
                         max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id)
    return out[:, width:].tolist(), tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)


@pytest.fixture
def lively(tiny_model):
    """The tiny model with larger random weights: at initialisation it repeats one token forever."""
    model = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.fixture
def early_eos(tokenizer, lively):
    """The tokenizer with EOS moved to a token the model emits after a few steps in some rows but not in
    others, so rows finish at different steps."""
    rows, _ = plain_generate(lively, tokenizer, PROMPTS, max_new_tokens=12)
    in_prompts = {t for p in PROMPTS for t in tokenizer(p)["input_ids"]}
    counts = torch.bincount(torch.tensor([t for row in rows for t in row[2:]]))
    for candidate in counts.argsort(descending=True).tolist():
        hit = sum(candidate in row[2:] for row in rows)
        if 2 <= hit < len(PROMPTS) and candidate not in in_prompts and candidate not in tokenizer.all_special_ids:
            tok = copy.deepcopy(tokenizer)
            tok.eos_token = tok.convert_ids_to_tokens(candidate)
            return tok
    pytest.skip("no token of the model ends some rows but not all")


def test_greedy_equals_transformers_generate_in_float32(lively, early_eos, monkeypatch):
    dropped = []
    compact = generation._PreallocatedLayer.compact
    monkeypatch.setattr(generation._PreallocatedLayer, "compact",
                        lambda self, holes, movers, rows: dropped.append(rows) or compact(self, holes, movers, rows))
    _, plain = plain_generate(lively, early_eos, PROMPTS, max_new_tokens=12)
    fast = [t[0] for t in generate(lively, early_eos, PROMPTS, max_new_tokens=12, stops=())]
    assert fast == plain
    assert dropped  # rows finished at different steps and left the batch
    assert len({len(t) for t in plain}) > 1
    # neither the pre-allocated cache, nor dropping finished rows, nor prefilling in groups changes anything
    for preallocate, drop, grouped in ((False, False, True), (True, False, True), (False, True, True),
                                       (True, True, False)):
        assert [t[0] for t in generate(lively, early_eos, PROMPTS, max_new_tokens=12, stops=(),
                                       preallocate=preallocate, drop_finished=drop,
                                       group_prefill=grouped)] == plain


@pytest.mark.parametrize("fused_step", [True, False])
def test_waiting_prompts_take_finished_rows_places_without_changing_outputs(lively, early_eos, fused_step,
                                                                            monkeypatch):
    """With room for 2 rows, the 6 prompts decode 2 at a time, each joining as a row finishes (its prompt
    written beside rows far ahead of it): transformers' greedy outputs, and the samples of one batch."""
    capacity = max(len(early_eos(p)["input_ids"]) for p in PROMPTS) + 12
    batches = []
    prefill = generation._prefill
    monkeypatch.setattr(generation, "_prefill", lambda model, ids, *a: batches.append(len(ids)) or prefill(model, ids, *a))
    _, plain = plain_generate(lively, early_eos, PROMPTS, max_new_tokens=12)
    done = []
    fast = generate(lively, early_eos, PROMPTS, max_new_tokens=12, stops=(), batch_tokens=2 * capacity,
                    fused_step=fused_step, progress=done.append)
    assert [t[0] for t in fast] == plain and len(done) == len(PROMPTS)
    assert batches[0] == 2 and sum(batches) == len(PROMPTS) and len(batches) > 2  # joined a few at a time
    args = dict(k=3, temperature=1.0, max_new_tokens=10, seed=5, fused_step=fused_step)
    assert generate(lively, early_eos, PROMPTS, batch_tokens=7 * capacity, **args) == generate(
        lively, early_eos, PROMPTS, **args)  # 6 rows: 2 prompts at a time


def test_prompts_are_prefilled_in_groups_of_similar_length(lively, tokenizer, monkeypatch):
    lengths = [len(tokenizer(p)["input_ids"]) for p in PROMPTS]
    groups = generation.prefill_groups(lengths)
    assert sorted(i for g in groups for i in g) == list(range(len(PROMPTS)))
    assert len(groups) > 1 and all(max(lengths[i] for i in g) <= 1.5 * min(lengths[i] for i in g) for g in groups)
    written = []
    write = generation._PreallocatedLayer.write_rows
    monkeypatch.setattr(generation._PreallocatedLayer, "write_rows",
                        lambda self, rows, keys, *a: written.append((len(rows), keys.shape[-2])) or
                        write(self, rows, keys, *a))
    args = dict(k=3, temperature=1.0, max_new_tokens=10, seed=5)
    grouped = generate(lively, tokenizer, PROMPTS, **args)
    n_layers = lively.config.num_hidden_layers
    assert written[::n_layers] == [(3 * len(g), max(lengths[i] for i in g)) for g in groups]  # each padded to its own
    assert grouped == generate(lively, tokenizer, PROMPTS, group_prefill=False, **args)


def test_dropping_finished_rows_moves_only_the_live_rows_at_the_back():
    finished = torch.tensor([False, True, False, True, False, False])
    order, holes, movers = generation.compaction(finished)
    # 4 rows stay: the finished rows 1 and 3 among the first 4 take the live rows 4 and 5
    assert holes.tolist() == [1, 3] and movers.tolist() == [4, 5] and order.tolist() == [0, 4, 2, 5]
    layer = generation._PreallocatedLayer(capacity=5)
    keys = torch.arange(6.0)[:, None, None, None].expand(6, 2, 3, 4).clone()  # row r holds r
    layer.update(keys, -keys)
    before = layer.key_buffer.clone()
    layer.compact(holes, movers, len(order))
    assert torch.equal(layer.keys, before[order, :, :3]) and torch.equal(layer.values, -before[order, :, :3])
    assert layer.get_seq_length() == 3 and layer.keys.shape[0] == 4


def test_stop_string_ends_a_row_as_truncation_would(lively, tokenizer):
    free = generate(lively, tokenizer, PROMPTS, max_new_tokens=16, stops=())
    word = next(t[0][3:6] for t in free if len(t[0]) > 8)  # a piece of text some completion contains
    stopped = generate(lively, tokenizer, PROMPTS, max_new_tokens=16, stops=(word,))
    assert stopped == [[t[0][:t[0].find(word)] if word in t[0] else t[0]] for t in free]


def test_sampling_is_seeded_per_prompt_and_sample_not_per_batch(lively, tokenizer):
    args = dict(k=3, temperature=1.0, max_new_tokens=10)
    together = generate(lively, tokenizer, PROMPTS, seed=5, **args)
    assert together == generate(lively, tokenizer, PROMPTS, seed=5, **args)  # rerun: same samples
    apart = [generate(lively, tokenizer, [p], seed=5, **args)[0] for p in reversed(PROMPTS)][::-1]
    assert apart == together  # alone or in a batch, the same samples
    assert generate(lively, tokenizer, PROMPTS, seed=6, **args) != together
    assert any(len(set(ts)) > 1 for ts in together)  # the k samples of a prompt differ


@pytest.mark.parametrize("candidates", [64, 3])  # 3: the rest of the vocabulary often has to be checked
def test_gumbel_max_draws_from_the_softmax(candidates):
    torch.manual_seed(0)
    logits = torch.randn(40) * 2
    n = 20000
    generators = [generation._row_generator(0, "p", c) for c in range(n)]
    tokens = gumbel_max(logits.expand(n, -1).contiguous(), 0.7, generators, candidates=candidates)
    seen = torch.bincount(tokens, minlength=40).double() / n
    expected = (logits.double() / 0.7).softmax(0)
    assert (seen - expected).abs().max() < 4 * (expected * (1 - expected) / n).sqrt().max() + 1e-3


def test_nucleus_keeps_the_smallest_set_reaching_top_p():
    logits = torch.tensor([[0.0, 2.0, 1.0, -1.0]]).log_softmax(-1)  # probabilities .09 .67 .24 .03
    kept = nucleus_mask(logits, 0.8).isfinite()[0].tolist()
    assert kept == [False, True, True, False]          # .67 < .8 <= .67 + .24
    assert nucleus_mask(logits, 0.5).isfinite()[0].tolist() == [False, True, False, False]


def test_batches_are_sized_by_tokens(tokenizer):
    prompts = ["1 " * n for n in (3, 9, 1, 6, 2, 8, 5)]
    lengths = {p: len(tokenizer(p)["input_ids"]) for p in prompts}
    batches = plan_batches(tokenizer, prompts, k=2, max_new_tokens=10, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    for b in batches:
        assert len(b) == 1 or len(b) * 2 * (max(lengths[prompts[i]] for i in b) + 10) <= 100
    assert len(batches) > 1
    assert [len(b) for b in plan_batches(tokenizer, prompts, batch_size=3)] == [3, 3, 1]


def test_auto_gen_dtype_follows_the_cpus_bf16_instructions_and_times_only_where_it_cannot_read_them(monkeypatch):
    def no_timing(device):
        raise AssertionError("timed although the CPU's flags say")
    monkeypatch.setattr(generation, "_bf16_speedup", no_timing)
    for flags, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(generation, "_cpu_multiplies_bf16", lambda flags=flags: flags)
        assert generation_dtype("auto") == dtype
    monkeypatch.setattr(generation, "_cpu_multiplies_bf16", lambda: None)  # not x86 Linux: the timing decides
    for speedup, dtype in ((2.0, torch.bfloat16), (1.2, torch.float32)):
        monkeypatch.setattr(generation, "_bf16_speedup", lambda device, speedup=speedup: speedup)
        assert generation_dtype("auto") == dtype


def test_gen_dtype():
    assert generation_dtype("float32") == torch.float32 and generation_dtype("bfloat16") == torch.bfloat16
    assert generation_dtype("auto") in (torch.float32, torch.bfloat16)
    with pytest.raises(ValueError, match="gen_dtype"):
        generation_dtype("float8")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sampling_on_a_gpu_draws_what_the_cpu_draws(lively, tokenizer):
    """The uniforms come from per-row CPU generators whatever the device: the same logits give the same tokens
    on a GPU (the rest-of-vocabulary path included, with 3 candidates), and generate samples there reproducibly."""
    logits = torch.randn(64, 300, generator=torch.Generator().manual_seed(0))
    draw = lambda device: gumbel_max(logits.to(device), 2.0, [torch.Generator().manual_seed(i) for i in range(64)],
                                     candidates=3).cpu()
    assert torch.equal(draw("cuda"), draw("cpu"))
    gpu = copy.deepcopy(lively).cuda()
    args = dict(k=3, temperature=1.0, max_new_tokens=10)
    assert generate(gpu, tokenizer, PROMPTS, seed=5, **args) == generate(gpu, tokenizer, PROMPTS, seed=5, **args)
