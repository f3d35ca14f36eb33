"""The shipped paper and accelerate configs parse: every stage of every `configs/paper/*.yaml` builds its
config dataclass (unknown keys or bad values would fail here, not hours into a GPU job), and each names an
accelerate config that accelerate itself can read. Nothing is run or downloaded."""

from pathlib import Path

import pytest
import yaml

from aft.pipeline import build_stage_config

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
ACCELERATE = sorted((ROOT / "configs" / "accelerate").glob("*.yaml"))


def test_every_setup_is_shipped():
    names = {p.stem for p in PAPER}
    assert names == {f"llama2-{size}-{task}" for size in ("7b", "13b") for task in ("gsm8k", "aqua", "ecqa")}
    assert {p.stem for p in ACCELERATE} == {"ddp", "deepspeed_zero2", "deepspeed_zero3", "fsdp"}


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_config_builds_every_stage(path, tmp_path):
    cfg = yaml.safe_load(path.read_text())
    assert (ROOT / cfg["accelerate"]).exists()
    outputs, kinds = {}, []
    for spec in cfg["stages"]:
        config, _, _ = build_stage_config(spec, cfg["defaults"], tmp_path, outputs)
        outputs[spec["name"]] = getattr(config, "output", None) or config.output_dir
        kinds.append((spec["stage"], getattr(config, "constraint", None)))
    assert kinds.count(("sft", None)) == 1 and kinds.count(("sample", None)) == 2
    assert ("align", "boundary") in kinds and ("align", "detach") in kinds
    aligned = [build_stage_config(s, cfg["defaults"], tmp_path, outputs)[0] for s in cfg["stages"]
               if s["stage"] == "align"]
    assert all(c.model == outputs["vft"] and c.bf16 and c.activation_checkpointing for c in aligned)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_defaults_are_all_used(path):
    """`defaults` keys go only to the stages that have the field, silently: a misspelt or removed
    TrainingArguments name (say warmup_ratio in transformers 5) would vanish without this check."""
    from dataclasses import fields

    from aft.pipeline import STAGES, stage

    cfg = yaml.safe_load(path.read_text())
    known = {f.name for kind in STAGES for f in fields(stage(kind)[0])}
    assert set(cfg["defaults"]) <= known, set(cfg["defaults"]) - known


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.stem)
def test_accelerate_config_parses(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_machines == 1 and config.num_processes == 8
