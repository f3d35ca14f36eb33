"""Resume, as torchtune tests it: a run killed after a checkpoint and started again with the same command
logs the same losses, and ends with the same weights, as a run that was never stopped.

The "kill" is an exception raised right after the Trainer has written checkpoint-N (nothing else is written
after it, so it leaves the disk as SIGKILL would). The align run uses LoRA with dropout, so its losses
match only if the resumed run restores the random-number state as well as the weights, optimizer,
scheduler and data order.
"""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file
from transformers import TrainerCallback

import aft.train
from aft.train import AlignConfig, SFTConfig, align, sft

TASK = "arithmetic:min_steps=1,max_steps=2,n_train=32,n_val=4,n_test=8"


class Killed(Exception):
    pass


class KillAfterCheckpoint(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Killed(f"killed after checkpoint-{self.step}")


def killed_at(trainer_class, step):
    class Trainer(trainer_class):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(KillAfterCheckpoint(step))
    return Trainer


def _losses(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [(h["step"], h["loss"]) for h in state["log_history"] if "loss" in h]


def _assert_resumed_equals_uninterrupted(run, make_config, trainer_name, monkeypatch, tmp_path):
    whole = make_config(tmp_path / "whole")
    run(whole)
    resumed = make_config(tmp_path / "resumed")
    with monkeypatch.context() as m:  # 8 steps over 2 epochs; killed after checkpoint-6, in the second epoch
        m.setattr(aft.train, trainer_name, killed_at(getattr(aft.train, trainer_name), 6))
        with pytest.raises(Killed):
            run(resumed)
    assert sorted(p.name for p in (tmp_path / "resumed").glob("checkpoint-*")) == ["checkpoint-3", "checkpoint-6"]
    run(make_config(tmp_path / "resumed"))            # the same command again: continues from checkpoint-6
    a, b = _losses(tmp_path / "whole"), _losses(tmp_path / "resumed")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(1, 9))
    assert [x for _, x in b] == pytest.approx([x for _, x in a], rel=1e-6)
    wa, wb = load_file(str(tmp_path / "whole" / "model.safetensors")), load_file(
        str(tmp_path / "resumed" / "model.safetensors"))
    assert max((wa[k] - wb[k]).abs().max().item() for k in wa) < 1e-6
    return a


COMMON = dict(per_device_train_batch_size=2, num_train_epochs=2, save_strategy="steps", save_steps=3,
              logging_steps=1, learning_rate=1e-2, warmup_steps=2, seed=5, report_to="none")


def test_sft_resumes_with_identical_losses(checkpoint, monkeypatch, tmp_path):
    make = lambda out: SFTConfig(model=checkpoint, task=TASK, limit=8, output_dir=str(out), **COMMON)  # noqa: E731
    losses = _assert_resumed_equals_uninterrupted(sft, make, "SFTTrainer", monkeypatch, tmp_path)
    assert losses[-1][1] < losses[0][1]


def _groups(path):
    rows = []
    for i in range(8):
        a, b = i % 5 + 1, i % 3 + 2
        rows.append({"id": f"q{i}", "prompt": f"Question: {a} + {b}?\nAnswer:",
                     "completions": [f" {a} + {b} = {a + b}\n#### {a + b}", f" {a} + {b} = {a + b + 1}\n#### {a + b + 1}"],
                     "labels": [1, 0], "correct": [True, False], "reference": f" {a} + {b} = {a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_align_with_lora_dropout_resumes_with_identical_losses(checkpoint, monkeypatch, tmp_path):
    groups = _groups(tmp_path / "groups.jsonl")
    make = lambda out: AlignConfig(model=checkpoint, groups=groups, loss="aft", constraint="boundary",  # noqa: E731
                                   lora_r=4, lora_alpha=8, lora_dropout=0.2, output_dir=str(out), **COMMON)
    _assert_resumed_equals_uninterrupted(align, make, "AlignTrainer", monkeypatch, tmp_path)

