"""Mixed precision (--bf16) and gradient checkpointing (--activation_checkpointing,
formerly --gradient_checkpointing) on a tiny model.

Each option runs through `aft sft` and `aft align` and is compared with the same run in float32 without
checkpointing, same seed, same data: bf16 autocast changes the losses by rounding only (well under 2%
over 4 steps), checkpointing recomputes the same activations, so its losses agree to float rounding. On
this CPU machine bf16 is CPU autocast; on a GPU the same flags use CUDA autocast.
"""

import json
from pathlib import Path

import pytest

from aft.tiny import build_model
from aft.train import AlignConfig, SFTConfig, align, sft

TASK = "arithmetic:min_steps=1,max_steps=2,n_train=32,n_val=4,n_test=8"
COMMON = dict(per_device_train_batch_size=4, max_steps=4, logging_steps=1, learning_rate=1e-2, seed=1,
              report_to="none")


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    rows = [{"id": f"q{i}", "prompt": f"Question: {i} + 3?\nAnswer:", "reference": f" {i} + 3 = {i + 3}\n#### {i + 3}",
             "completions": [f" {i} + 3 = {i + 3}\n#### {i + 3}", f" {i} + 3 = {i + 4}\n#### {i + 4}"],
             "labels": [1, 0], "correct": [True, False]} for i in range(16)]
    path = tmp_path_factory.mktemp("groups") / "groups.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _losses(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


@pytest.fixture(scope="module")
def float32_losses(tmp_path_factory, checkpoint, groups):
    """The float32, no-checkpointing run of each stage: the baseline every option is compared with."""
    folder = tmp_path_factory.mktemp("float32")
    return {stage: _run(stage, folder, stage, checkpoint, groups) for stage in ("sft", "align")}


def _run(stage, tmp_path, name, checkpoint, groups, **options):
    out = str(tmp_path / name)
    if stage == "sft":
        sft(SFTConfig(model=checkpoint, task=TASK, limit=16, output_dir=out, **COMMON, **options))
    else:
        align(AlignConfig(model=checkpoint, groups=groups, loss="aft", constraint="boundary", output_dir=out,
                          **COMMON, **options))
    return _losses(out)


def _scorer_goes_through_forward() -> bool:
    """Autocast (accelerate wraps the model's forward in it) applies only if the scorer calls that forward."""
    import torch

    from aft.scoring import completion_logprobs
    from aft.tiny import build_tokenizer

    model, seen = build_model(build_tokenizer(["1 + 2 = 3"] * 4, vocab_size=270), size="test"), []
    model.register_forward_pre_hook(lambda *_: seen.append(1))
    ids = torch.tensor([[1, 5, 6, 7]])
    completion_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]).bool())
    return bool(seen)


@pytest.mark.parametrize("stage", ["sft", "align"])
@pytest.mark.xfail(not _scorer_goes_through_forward(), strict=True,
                   reason="aft.scoring.hidden_states calls the decoder directly, bypassing the forward that "
                          "accelerate wraps in autocast: --bf16 silently trains in float32")
def test_bf16_close_to_float32(stage, checkpoint, groups, float32_losses, tmp_path):
    fp32 = float32_losses[stage]
    bf16 = _run(stage, tmp_path, "bf16", checkpoint, groups, bf16=True)
    assert len(fp32) == len(bf16) == 4 and fp32[-1] < fp32[0]   # it trains
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != pytest.approx(fp32, rel=1e-6)                # bf16 really was on


@pytest.mark.parametrize("stage", ["sft", "align"])
def test_gradient_checkpointing_matches_float32(stage, checkpoint, groups, float32_losses, tmp_path):
    plain = float32_losses[stage]
    ckpt = _run(stage, tmp_path, "ckpt", checkpoint, groups, activation_checkpointing=True)
    assert len(plain) == len(ckpt) == 4 and plain[-1] < plain[0]
    assert ckpt == pytest.approx(plain, rel=1e-5)


def test_gradient_checkpointing_with_lora(checkpoint, groups, tmp_path):
    """LoRA freezes the embeddings, so the checkpointed blocks get inputs that need no grad: the adapters
    must still receive gradients (non-reentrant checkpointing), giving the losses of a plain LoRA run."""
    lora = dict(lora_r=4, lora_alpha=8)
    plain = _run("align", tmp_path, "lora", checkpoint, groups, **lora)
    ckpt = _run("align", tmp_path, "lora_ckpt", checkpoint, groups, activation_checkpointing=True, **lora)
    assert plain[-1] < plain[0]
    assert ckpt == pytest.approx(plain, rel=1e-5)
