"""``aft grpo``: GRPO (TRL's ``GRPOTrainer``) on a task's training questions, rewarded by the task's checker.

A baseline for AFT from the on-policy side of the field: each step samples ``num_generations`` completions
per prompt from the model being trained, rewards each 1 if its final answer is right (the same checker
``aft label --feedback binary`` uses) and 0 otherwise, and takes a policy-gradient step on the
group-normalised rewards. To compare with AFT at an equal sampling budget, ``--sample_budget N`` sets the
number of optimizer steps so that GRPO samples N completions in all (AFT's budget is its questions x k);
the completions actually sampled, the optimizer steps and the wall time are written to
``OUTPUT_DIR/budget.json``::

    aft grpo --model runs/vft --task gsm8k --limit 1000 --num_generations 8 --sample_budget 8000 \
             --output_dir runs/grpo

TRL is an optional dependency (``pip install 'aft[study]'``); the core package does not need it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field

import torch
from transformers import set_seed

from aft.checks import check_config, require
from aft.models import ModelFields, load_for_training
from aft.provenance import OutputFields, claim
from aft.tasks import TaskFields

try:
    from trl import GRPOConfig as _TRLGRPOConfig
except ImportError:  # keep `aft --help` and the other stages working without TRL
    _TRLGRPOConfig = None

if _TRLGRPOConfig is None:
    GRPOConfig = None
else:
    @dataclass
    class GRPOConfig(ModelFields, TaskFields, OutputFields, _TRLGRPOConfig):
        """GRPO on a task's questions with the task's answer checker as the reward (TRL's GRPOConfig plus
        the model and task fields every aft stage has)."""

        output_dir: str = field(default="runs/grpo", metadata={"help": "Where the trained model is saved."})
        sample_budget: int | None = field(default=None, metadata={
            "help": "Completions to sample in all; sets max_steps to ceil(budget / completions per step), "
                    "where a step samples per_device_train_batch_size x processes x gradient_accumulation_steps "
                    "/ num_iterations completions. Default: train by num_train_epochs / max_steps."})
        max_new_tokens: int = field(default=256, metadata={"help": "Longest completion (max_completion_length)."})
        num_generations: int | None = field(default=4, metadata={"help": "Completions per prompt in a group."})
        temperature: float = field(default=0.8, metadata={"help": "Sampling temperature, as `aft sample`."})
        per_device_train_batch_size: int = field(default=8, metadata={
            "help": "Completions (not prompts) per device per micro-batch; a multiple of num_generations."})
        learning_rate: float = 1e-5
        logging_steps: float = 10
        save_strategy: str = "no"
        bf16: bool | None = False  # TRL's default is True; on a CPU without AMX bf16 is slower: opt in with --bf16

        def __post_init__(self):
            check_config(self)
            if self.sample_budget is not None and self.sample_budget <= 0:
                raise ValueError(f"--sample_budget must be positive; got {self.sample_budget}")
            self.max_completion_length = self.max_new_tokens
            if not torch.accelerator.is_available():
                self.use_cpu = True
            super().__post_init__()
            if self.sample_budget is not None:
                self.max_steps = math.ceil(self.sample_budget / completions_per_step(self))


def completions_per_step(config) -> float:
    """Completions GRPO samples per optimizer step: one generation batch (the micro-batches of a step over
    all processes) serves ``num_iterations`` steps."""
    return (config.per_device_train_batch_size * config.world_size * config.gradient_accumulation_steps
            / config.num_iterations)


class AnswerReward:
    """The task's checker as a GRPO reward: 1.0 for a right final answer, else 0.0. Counts the completions
    it sees, so the sampling budget reported is what was sampled, not what was planned."""

    __name__ = "answer_correct"  # TRL logs each reward under its function's name

    def __init__(self, task):
        self.task = task
        self.completions = 0

    def __call__(self, prompts, completions, example, **_):
        from aft.sample import truncate_at_stop

        self.completions += len(completions)
        return [float(self.task.is_correct(truncate_at_stop(text), json.loads(e)))
                for text, e in zip(completions, example)]


def grpo(config: GRPOConfig) -> str:
    """Run GRPO; returns the folder of the saved model."""
    if GRPOConfig is None:
        raise RuntimeError("aft grpo needs TRL: pip install 'aft[study]'")
    from datasets import Dataset
    from trl import GRPOTrainer

    from aft.train import finish

    require(config, "model")
    claim("grpo", config, write=False)  # refused before the model loads
    task, examples = config.load_examples()
    set_seed(config.seed)
    model, tokenizer = load_for_training(config)
    claim("grpo", config)
    dataset = Dataset.from_list([{"prompt": task.format_prompt(e), "example": json.dumps(e)} for e in examples])
    reward = AnswerReward(task)
    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=config, train_dataset=dataset,
                          processing_class=tokenizer)
    start = time.time()
    trainer.train()
    seconds = time.time() - start
    finish(trainer, tokenizer, config)
    if trainer.is_world_process_zero():
        budget = {"completions_sampled": reward.completions * config.world_size, "optimizer_steps":
                  trainer.state.global_step, "seconds": round(seconds, 1), "questions": len(examples),
                  "num_generations": config.num_generations, "sample_budget": config.sample_budget}
        with open(f"{config.output_dir}/budget.json", "w") as f:
            json.dump(budget, f, indent=2)
        print("grpo: " + ", ".join(f"{k} {v}" for k, v in budget.items()))
    return config.output_dir
