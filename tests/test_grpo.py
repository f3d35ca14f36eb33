"""`aft grpo`: TRL's GRPOTrainer on a task's questions with the task's checker as reward, at a set budget."""

import json

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("trl")

from aft.grpo import AnswerReward, GRPOConfig, completions_per_step, grpo  # noqa: E402
from aft.tasks import TASKS, ArithmeticTask, load_task  # noqa: E402

TASK = "arithmetic:min_steps=1,max_steps=1,n_train=16,n_val=4,n_test=4"


def test_reward_is_the_task_checker_and_counts_completions():
    task = load_task(TASK)
    example = task.load("train", limit=1)[0]
    reward = AnswerReward(task)
    right = task.reference_cot(example)
    wrong = right.replace(f"#### {example['answer']}", f"#### {int(example['answer']) + 1}")
    assert wrong != right
    got = reward(prompts=["p"] * 3, completions=[right, wrong, right + "\nQuestion: next"],
                 example=[json.dumps(example)] * 3)
    assert got == [1.0, 0.0, 1.0]  # text a base model adds after the answer is cut, as `aft sample` cuts it
    assert reward.completions == 3


def test_sample_budget_sets_the_steps(tmp_path, checkpoint):
    config = GRPOConfig(model=checkpoint, output_dir=str(tmp_path), num_generations=4, per_device_train_batch_size=8,
                        gradient_accumulation_steps=2, sample_budget=40)
    assert completions_per_step(config) == 16
    assert config.max_steps == 3  # ceil(40 / 16)
    with pytest.raises(ValueError, match="sample_budget"):
        GRPOConfig(model=checkpoint, output_dir=str(tmp_path), sample_budget=0)


def test_grpo_runs_two_steps_with_the_task_reward(tmp_path, checkpoint):
    out = tmp_path / "grpo"
    config = GRPOConfig(model=checkpoint, task=TASK, output_dir=str(out), num_generations=4,
                        per_device_train_batch_size=8, sample_budget=16, max_new_tokens=8, logging_steps=1, seed=0)
    grpo(config)
    budget = json.loads((out / "budget.json").read_text())
    assert budget["optimizer_steps"] == 2 and budget["completions_sampled"] == 16
    logged = [row for row in json.loads((out / "trainer_state.json").read_text())["log_history"]
              if "rewards/answer_correct/mean" in row]
    assert len(logged) == 2


class DigitTask(ArithmeticTask):
    """The arithmetic questions with a checker a random model passes about half the time (an even length),
    so GRPO's group-normalised rewards differ and its step has a gradient."""

    def is_correct(self, text, example):
        return len(text) % 2 == 0


def test_grpo_steps_move_the_weights_when_rewards_differ(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(TASKS, "digit", DigitTask)
    out = tmp_path / "grpo"
    config = GRPOConfig(model=checkpoint, task="digit:" + TASK.split(":")[1], output_dir=str(out),
                        num_generations=4, per_device_train_batch_size=8, max_steps=2, max_new_tokens=8,
                        temperature=1.5, learning_rate=1e-2, logging_steps=1, seed=0)
    grpo(config)
    rewards = [row["rewards/answer_correct/mean"] for row in
               json.loads((out / "trainer_state.json").read_text())["log_history"] if "rewards/answer_correct/mean" in row]
    assert any(0 < r < 1 for r in rewards)
    before, after = load_file(f"{checkpoint}/model.safetensors"), load_file(out / "model.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
