"""The Python API: the package root exports the public pieces, `AlignTrainer` takes a `datasets.Dataset` of
groups or of TRL pairs as well as a file, and the README's Python example runs as written (read from
README.md here, only the model name swapped for the tiny test model, so the two cannot drift apart)."""

import json
import re
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from safetensors.torch import load_file

import aft
from aft import AlignConfig, AlignTrainer
from aft.data import DataError

README = Path(__file__).resolve().parents[1] / "README.md"
README_MODEL = '"HuggingFaceTB/SmolLM2-135M"'


def test_root_exports_the_public_pieces():
    from aft import (EvalConfig, LabelConfig, SampleConfig, SFTConfig, SFTTrainer, align, alignment_loss,  # noqa: F401
                     dpo_loss, evaluate, label, load_task, nll_loss, pro_loss, rrhf_loss, sample, sft)
    import aft.losses
    import aft.train

    assert aft.AlignTrainer is aft.train.AlignTrainer and aft.alignment_loss is aft.losses.alignment_loss
    assert all(getattr(aft, name) is not None for name in aft.__all__)
    with pytest.raises(AttributeError):
        aft.nothing_here


def readme_example() -> str:
    """The README's Python example: the code block that builds an ``AlignTrainer``."""
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.DOTALL)
    example = [b for b in blocks if "AlignTrainer(" in b]
    assert len(example) == 1
    return example[0]


def test_readme_python_example_runs(checkpoint, tmp_path, monkeypatch):
    code = readme_example()
    assert code.count(README_MODEL) == 1 and len(code.strip().splitlines()) <= 14
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code.replace(README_MODEL, repr(checkpoint)), "README.md", "exec"), namespace)
    trainer = namespace["trainer"]
    assert trainer.state.global_step == 1 and len(trainer.train_dataset) == 2
    saved = load_file(str(tmp_path / "runs" / "aft-python" / "model.safetensors"))
    start = load_file(str(Path(checkpoint) / "model.safetensors"))
    moved = max((saved[k] - start[k]).abs().max().item() for k in start)
    assert moved > 0  # the example trained and saved the model


PAIRS = [{"prompt": "Question: 3 + 4?\nAnswer:", "chosen": " 3 + 4 = 7\n#### 7", "rejected": " 3 + 4 = 8\n#### 8"},
         {"prompt": "Question: 3 + 4?\nAnswer:", "chosen": " 3 + 4 = 7\n#### 7", "rejected": " 4 + 3 = 6\n#### 6"},
         {"prompt": "Question: 5 * 2?\nAnswer:", "chosen": " 5 * 2 = 10\n#### 10", "rejected": " 5 * 2 = 7\n#### 7"}]
GROUPS = [{"id": "a", "prompt": PAIRS[0]["prompt"], "labels": [1, 0, 0],
           "completions": [" 3 + 4 = 7\n#### 7", " 3 + 4 = 8\n#### 8", " 4 + 3 = 6\n#### 6"]},
          {"id": "b", "prompt": PAIRS[2]["prompt"], "labels": [1, 0],
           "completions": [" 5 * 2 = 10\n#### 10", " 5 * 2 = 7\n#### 7"]}]


def _losses(checkpoint, tmp_path, name, train_dataset, **config):
    args = AlignConfig(output_dir=str(tmp_path / name), max_steps=2, logging_steps=1, per_device_train_batch_size=2,
                       learning_rate=1e-2, seed=1, report_to="none", **config)
    trainer = AlignTrainer(model=checkpoint, args=args, train_dataset=train_dataset)
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


def test_align_trainer_takes_datasets_lists_and_files_alike(checkpoint, tmp_path):
    file = tmp_path / "groups.jsonl"
    file.write_text("".join(json.dumps(g) + "\n" for g in GROUPS))
    from_file = _losses(checkpoint, tmp_path, "file", None, groups=str(file))
    assert len(from_file) == 2 and all(torch.isfinite(torch.tensor(from_file)))
    # groups as a Dataset, TRL pairs as a Dataset (merged by prompt into the same two groups), pairs as a list
    assert _losses(checkpoint, tmp_path, "groups", Dataset.from_list(GROUPS)) == pytest.approx(from_file, rel=1e-6)
    assert _losses(checkpoint, tmp_path, "pairs", Dataset.from_list(PAIRS)) == pytest.approx(from_file, rel=1e-6)
    assert _losses(checkpoint, tmp_path, "list", PAIRS) == pytest.approx(from_file, rel=1e-6)


def test_align_trainer_computes_dpo_reference_from_a_dataset(checkpoint, tmp_path):
    args = AlignConfig(output_dir=str(tmp_path / "dpo"), loss="dpo", max_steps=1, report_to="none")
    trainer = AlignTrainer(model=checkpoint, args=args, train_dataset=Dataset.from_list(PAIRS))
    assert all(len(f["ref_logps"]) == len(f["completion_ids"]) for f in trainer.train_dataset)
    assert all(v < 0 for f in trainer.train_dataset for v in f["ref_logps"])


def test_conversational_pairs_are_refused_with_a_clear_message(checkpoint, tmp_path):
    chat = [{"prompt": [{"role": "user", "content": "3 + 4?"}], "chosen": [{"role": "assistant", "content": "7"}],
             "rejected": [{"role": "assistant", "content": "8"}]}]
    with pytest.raises(DataError, match="dataset row 1: .*chat template"):
        AlignTrainer(model=checkpoint, args=AlignConfig(output_dir=str(tmp_path / "x"), report_to="none"),
                     train_dataset=chat)
