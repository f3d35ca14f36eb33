"""LoRA through peft, and loading checkpoints safely.

- `aft align --lora_r ...` trains the adapters only: every base weight is bit-identical to the starting
  checkpoint after training, every LoRA B matrix (initialised to zero) has moved.
- The merged save is a plain checkpoint (no adapter files) that `AutoModelForCausalLM.from_pretrained`
  loads and that gives the adapter model's logits; it differs from the base only in the adapted
  projections, by a matrix of rank <= r.
- Loading runs no checkpoint code unless `trust_remote_code` is passed, and reads safetensors only.
"""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import aft.train
from aft.models import load_model
from aft.train import AlignConfig, align


def _groups(path):
    rows = [{"id": f"q{i}", "prompt": f"Question: {i} + 3?\nAnswer:",
             "completions": [f" {i} + 3 = {i + 3}\n#### {i + 3}", f" {i} + 3 = {i + 4}\n#### {i + 4}"],
             "labels": [1, 0], "correct": [True, False]} for i in range(6)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_lora_align_trains_adapters_only_and_merges(checkpoint, tokenizer, monkeypatch, tmp_path):
    probe = torch.tensor([tokenizer("Question: 4 + 3?\nAnswer: 4 + 3 = 7")["input_ids"]])
    seen = {}
    real_save = aft.train.save_for_inference

    def save_and_record(model, tok, output_dir):  # the trained adapter model, just before merging
        model.eval()
        with torch.no_grad():
            seen["logits"] = model(input_ids=probe).logits
        seen["params"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        seen["trainable"] = {n for n, p in model.named_parameters() if p.requires_grad}
        real_save(model, tok, output_dir)

    monkeypatch.setattr(aft.train, "save_for_inference", save_and_record)
    out = tmp_path / "aft"
    align(AlignConfig(model=checkpoint, groups=_groups(tmp_path / "g.jsonl"), loss="aft", constraint="boundary",
                      lora_r=4, lora_alpha=8, lora_target_modules="q_proj,v_proj", learning_rate=5e-2,
                      per_device_train_batch_size=2, max_steps=4, output_dir=str(out), report_to="none"))

    start = load_file(str(Path(checkpoint) / "model.safetensors"))
    lora = {n: p for n, p in seen["params"].items() if "lora_" in n}
    base = {n: p for n, p in seen["params"].items() if "lora_" not in n}
    assert seen["trainable"] == set(lora) and len(lora) == 2 * 2 * 2   # A and B, q and v, 2 layers
    assert all(p.abs().max() > 0 for n, p in lora.items() if "lora_B" in n)   # B starts at zero: it moved
    for name, p in base.items():  # peft names: base_model.model.<name>, adapted layers' weights in base_layer
        plain = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(p, start[plain]), plain

    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=probe).logits, seen["logits"], atol=1e-5, rtol=1e-5)
    after = load_file(str(out / "model.safetensors"))
    changed = sorted(k for k in start if not torch.equal(start[k], after[k]))
    assert changed == sorted(f"model.layers.{i}.self_attn.{m}_proj.weight" for i in range(2) for m in "qv")
    assert all(torch.linalg.matrix_rank(after[k] - start[k]) <= 4 for k in changed)


def test_remote_code_never_runs_unless_asked(checkpoint, tmp_path):
    """A checkpoint that ships code (auto_map) loads with the built-in class; its code is not imported."""
    folder = tmp_path / "with_code"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(folder)
    marker = tmp_path / "code_ran"
    (folder / "evil_model.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaForCausalLM as EvilForCausalLM\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "evil_model.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load_model(str(folder))
    assert type(loaded).__name__ == "LlamaForCausalLM" and not marker.exists()


def test_weights_load_from_safetensors_only(checkpoint, tmp_path):
    """A pickle-only checkpoint (pytorch_model.bin, which could run code when unpickled) is refused."""
    folder = tmp_path / "pickle_only"
    model = AutoModelForCausalLM.from_pretrained(checkpoint)
    model.save_pretrained(folder)
    (folder / "model.safetensors").unlink()
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(OSError):
        load_model(str(folder))


def test_hub_kernels_are_not_fetched(checkpoint):
    """With the `kernels` package installed (transformers 5.25 requires it), transformers swaps layers for kernels
    it fetches from the hub when a model first trains on a GPU: code from the hub that nobody asked for, and a
    crash where the hub cannot be reached (seen on an H200). Loaded by aft, a model never uses them."""
    model = load_model(checkpoint)
    model.train()
    assert model.use_kernels is False
