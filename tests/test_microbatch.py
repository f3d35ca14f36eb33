"""``candidate_micro_batch``: the gradient formed from candidates in micro-batches (score all without a graph,
dL/ds by autograd on the scores, re-run each micro-batch weighted by it) equals the one-pass gradient, for
every loss and constraint, with the NLL term, with and without prefix sharing, and through a Trainer run."""

import pytest
import torch

from aft.data import GroupCollator
from aft.train import AlignConfig, AlignTrainer


def features(tokenizer):
    enc = lambda t: tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompt = lambda t: [tokenizer.bos_token_id] + tokenizer.encode(t)
    return [
        {"prompt_ids": prompt("Tom has 3 apples and buys 4 more."),
         "completion_ids": [enc(" 3 + 4 = 7\n#### 7"), enc(" 8"), enc(" The answer is 42."), enc(" 7")],
         "labels": [1.0, 0.0, 0.0, 1.0], "positive": [True, False, False, True], "reference_ids": enc(" 3 + 4 = 7"),
         "ref_logps": [-20.0, -5.0, -12.0, -3.0]},
        {"prompt_ids": prompt("A box"),
         "completion_ids": [enc(" holds 12 pens.\n#### 60"), enc(" 5"), enc(" 12 * 5 = 60")],
         "labels": [0.0, 1.0, 2.0], "positive": [False, False, True], "ref_logps": [-30.0, -4.0, -15.0]},
    ]


def on_device(trainer, batch):
    """The batch where the trainer put the model (a GPU, where there is one), as training_step moves it."""
    return {k: v.to(trainer.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}


def gradients(trainer, model, batch):
    model.zero_grad()
    loss = trainer.compute_loss(model, on_device(trainer, batch))
    loss.backward()  # what Trainer.training_step does with the returned loss (a no-op leaf when micro-batched)
    return loss.item(), {n: w.grad.clone() for n, w in model.named_parameters() if w.grad is not None}


@pytest.mark.parametrize("loss,constraint", [("aft", "boundary"), ("aft", "detach"), ("aft", "none"),
                                             ("rrhf", "boundary"), ("pro", "none"), ("dpo", "boundary"),
                                             ("rft", "none")])
@pytest.mark.parametrize("prefix_sharing", [False, True])
def test_micro_batched_gradients_equal_one_pass(tiny_model, tokenizer, tmp_path, loss, constraint, prefix_sharing):
    tiny_model.train()
    args = AlignConfig(output_dir=str(tmp_path), loss=loss, constraint=constraint, beta=0.1, nll_on="both",
                       prefix_sharing=prefix_sharing, report_to=[])
    trainer = AlignTrainer(model=tiny_model, args=args)
    batch = GroupCollator(tokenizer.pad_token_id, "both")(features(tokenizer))
    one_loss, one_pass = gradients(trainer, tiny_model, batch)
    args.candidate_micro_batch = 3  # 8 sequences: micro-batches of 3, 3, 2 cutting across the two groups
    micro_loss, micro = gradients(trainer, tiny_model, batch)
    assert micro_loss == pytest.approx(one_loss, rel=1e-5)
    assert one_pass.keys() == micro.keys() and one_pass
    for name, grad in one_pass.items():
        torch.testing.assert_close(micro[name], grad, atol=1e-6, rtol=1e-4, msg=name)


def test_training_run_is_the_same(tiny_model, tokenizer, tmp_path):
    """Two optimizer steps with gradient accumulation 2: micro-batched and one-pass end at the same weights."""
    import copy

    data = features(tokenizer) * 4
    finals = []
    for micro in (None, 2):
        model = copy.deepcopy(tiny_model)
        args = AlignConfig(output_dir=str(tmp_path / str(micro)), loss="aft", constraint="boundary", beta=0.1,
                           per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2,
                           learning_rate=1e-2, optim="sgd", lr_scheduler_type="constant", logging_steps=1,
                           candidate_micro_batch=micro, report_to=[], seed=0, data_seed=0)
        trainer = AlignTrainer(model=model, args=args, train_dataset=data,
                               data_collator=GroupCollator(tokenizer.pad_token_id, "both"))
        trainer.train()
        finals.append((trainer.state.log_history[0]["loss"], dict(model.named_parameters())))
    (loss_a, a), (loss_b, b) = finals
    assert loss_b == pytest.approx(loss_a, rel=1e-4)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(not torch.equal(a[n].cpu(), tiny_model.state_dict()[n]) for n in a)  # it trained


@pytest.mark.parametrize("micro", [None, 4])
def test_prefix_sharing_runs_under_the_trainers_mixed_precision(tiny_model, tokenizer, tmp_path, micro):
    """The shared path calls the decoder stack past the model's forward (where accelerate puts autocast);
    the trainer enters autocast itself, so with bf16=True the decoder's products are bf16 there too."""
    args = AlignConfig(output_dir=str(tmp_path), loss="aft", constraint="boundary", bf16=True, use_cpu=True,
                       prefix_sharing=True, candidate_micro_batch=micro, report_to=[])
    trainer = AlignTrainer(model=tiny_model, args=args)
    tiny_model.train()
    seen = []
    hook = tiny_model.model.layers[0].mlp.register_forward_hook(lambda m, i, out: seen.append(out.dtype))
    try:
        gradients(trainer, tiny_model, GroupCollator(tokenizer.pad_token_id, "both")(features(tokenizer)))
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}


def test_prefix_sharing_is_on_by_default_where_it_can_run(tiny_model, tokenizer, tmp_path, monkeypatch):
    """Unset, prefix sharing runs on a bare model and is skipped when a wrapper (DDP, DataParallel: what a
    multi-process or multi-device run hands compute_loss) holds it; set, it is what the user said."""
    import aft.scoring

    calls = []
    shared = aft.scoring.shared_prefix_logprobs
    monkeypatch.setattr(aft.scoring, "shared_prefix_logprobs", lambda *a, **k: calls.append(1) or shared(*a, **k))
    batch = GroupCollator(tokenizer.pad_token_id, "both")(features(tokenizer))
    wrapped = torch.nn.DataParallel(tiny_model)  # on CPU it just calls the module

    def used(model, **kw):
        calls.clear()
        trainer = AlignTrainer(model=tiny_model, args=AlignConfig(output_dir=str(tmp_path), report_to=[], **kw))
        trainer.compute_loss(model, on_device(trainer, batch))
        return bool(calls)

    assert used(tiny_model) and not used(tiny_model, prefix_sharing=False)
    assert not used(wrapped)
    with pytest.raises(ValueError, match="one process only"):
        used(wrapped, prefix_sharing=True)


def test_no_pass_of_a_micro_batched_step_sees_more_than_n_sequences(tiny_model, tokenizer, tmp_path, monkeypatch):
    """What keeps memory flat in k: the graph-free scoring pass and the graph passes alike take at most
    candidate_micro_batch sequences at a time (8 sequences, N = 3: 3 + 3 + 2, twice)."""
    import aft.grouped

    sizes = []
    score = aft.grouped.completion_logprobs
    monkeypatch.setattr(aft.grouped, "completion_logprobs",
                        lambda model, ids, *a, **k: sizes.append(ids.shape[0]) or score(model, ids, *a, **k))
    args = AlignConfig(output_dir=str(tmp_path), loss="aft", constraint="none", nll_on="both",
                       candidate_micro_batch=3, report_to=[])
    tiny_model.train()
    gradients(AlignTrainer(model=tiny_model, args=args), tiny_model,
              GroupCollator(tokenizer.pad_token_id, "both")(features(tokenizer)))
    assert sizes == [3, 3, 2, 3, 3, 2]
