"""dpo_loss against TRL's DPOTrainer on the same batch: a peer's implementation as the reference."""

import pytest
import torch

trl = pytest.importorskip("trl", reason="trl is a test extra: pip install -e '.[dev]'")

from aft.losses import dpo_loss  # noqa: E402
from aft.scoring import completion_logprobs  # noqa: E402
from aft.tiny import build_model  # noqa: E402


@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_dpo_loss_equals_trl(tokenizer, tmp_path, beta):
    from datasets import Dataset

    model, ref = build_model(tokenizer, "test", seed=0), build_model(tokenizer, "test", seed=1)
    pairs = [{"prompt": "Question: Tom has 3 apples and buys 4 more.", "chosen": " 3 + 4 = 7\n#### 7",
              "rejected": " 3 + 4 = 8\n#### 8"},
             {"prompt": "Question: A box holds 12 pens.", "chosen": " 12 * 5 = 60", "rejected": " 60 60 60 pens"},
             {"prompt": "How many apples?", "chosen": " 7", "rejected": " The answer is 42."}]
    # bf16=False: TRL defaults to bf16 autocast, which it applies to the reference model's forward only
    args = trl.DPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=3, beta=beta, report_to=[], bf16=False,
                         use_cpu=True)
    trainer = trl.DPOTrainer(model=model, ref_model=ref, args=args, train_dataset=Dataset.from_list(pairs),
                             processing_class=tokenizer)
    batch = next(iter(trainer.get_train_dataloader()))
    trl_loss = trainer.compute_loss(trainer.model, batch)

    # The same token ids through our scorer: TRL stacks [chosen..., rejected...]; we use groups of
    # (chosen, rejected) with labels (1, 0).
    ids, attn, comp = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    with torch.no_grad():
        ref_sums, _ = completion_logprobs(ref, ids, attn, comp)
    sums, _ = completion_logprobs(trainer.model, ids, attn, comp)
    n = len(pairs)
    as_groups = lambda x: torch.stack([x[:n], x[n:]], dim=1)  # noqa: E731
    ours = dpo_loss(as_groups(sums), torch.tensor([[1.0, 0.0]] * n), as_groups(ref_sums), dpo_beta=beta)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
