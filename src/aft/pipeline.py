"""``aft run CONFIG.yaml``: the stages of one config, in order, each into its own folder of a run directory.

A config names a run directory, defaults shared by every stage (any stage field, e.g. ``task``), and the
stages. A stage's ``model`` or ``groups`` may name an earlier stage, which resolves to that stage's
output. Every stage writes a ``DONE`` file when it completes; a second ``aft run`` skips those stages and
continues the first one that did not finish (the samplers and trainers resume inside a stage too)::

    run_dir: runs/demo
    defaults: {task: "arithmetic:max_steps=4"}
    stages:
      - {name: init, stage: init, size: demo}            # tokenizer + model from scratch (offline)
      - {name: vft, stage: sft, model: init, num_train_epochs: 3}
      - {name: samples, stage: sample, model: vft, k: 4}
      - {name: labeled, stage: label, groups: samples}
      - {name: aft, stage: align, model: vft, groups: labeled}
      - {name: eval_aft, stage: eval, model: aft}
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

STAGE_OUTPUT = {"sample": "groups.jsonl", "label": "groups.jsonl", "merge": "groups.jsonl", "eval": "eval.json"}
# Under a multi-process launcher (accelerate launch, torchrun) sampling and training use every process; these
# stages run on the main process alone while the others wait for its DONE file (no two writers of one file).
MAIN_PROCESS_ONLY = {"init", "label", "merge", "eval"}


def _rank() -> int:
    import os

    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")))


def _wait_for(done: Path, name: str, poll: float = 0.5, timeout: float = 24 * 3600):
    start = time.time()
    while not done.exists():
        if time.time() - start > timeout:
            raise RuntimeError(f"stage {name!r}: the main process did not finish it within {timeout:.0f} s")
        time.sleep(poll)


@dataclass
class InitConfig:
    """Build a tokenizer (trained on the task's training texts) and a small random Llama, offline."""

    task: str = field(default="arithmetic", metadata={"help": "Task whose training texts train the tokenizer."})
    output_dir: str = field(default="runs/init", metadata={"help": "Where to save model and tokenizer."})
    size: str = field(default="demo", metadata={"help": "Model size: test, demo or small (see aft.tiny)."})
    vocab_size: int = field(default=512, metadata={"help": "Tokenizer vocabulary size."})
    max_length: int = field(default=512, metadata={"help": "Model's maximum sequence length."})
    seed: int = field(default=0, metadata={"help": "Initialisation seed."})


def init(config: InitConfig) -> str:
    from aft.tasks import load_task
    from aft.tiny import build_model, build_tokenizer

    task = load_task(config.task)
    examples = task.load("train")
    tokenizer = build_tokenizer((task.format_prompt(e) + task.reference_cot(e) for e in examples),
                                vocab_size=config.vocab_size)
    model = build_model(tokenizer, config.size, max_length=config.max_length, seed=config.seed)
    model.save_pretrained(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"init: {n / 1e6:.2f}M-parameter Llama, vocabulary {len(tokenizer)}, saved to {config.output_dir}")
    return config.output_dir


def stage_table():
    from aft.cli import _stages
    from aft.iterate import MergeConfig, merge

    table = {name: (cls, fn) for name, (cls, fn, _) in _stages().items()}
    table["init"] = (InitConfig, init)
    table["merge"] = (MergeConfig, merge)
    return table


def build_stage_config(spec: dict, defaults: dict, run_dir: Path, outputs: dict):
    """The config dataclass of one stage, with stage-name references resolved and outputs placed."""
    table = stage_table()
    kind = spec.get("stage")
    if kind not in table:
        raise ValueError(f"stage {spec.get('name')!r}: 'stage' must be one of {sorted(table)}; got {kind!r}")
    cls, fn = table[kind]
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in defaults.items() if k in names}
    values.update({k: v for k, v in spec.items() if k not in ("name", "stage")})
    unknown = set(values) - names
    if unknown:
        raise ValueError(f"stage {spec['name']!r} ({kind}): unknown field(s) {sorted(unknown)}")
    for key in ("model", "tokenizer", "groups", "eval_groups"):
        if isinstance(values.get(key), str) and values[key] in outputs:
            values[key] = outputs[values[key]]
    if isinstance(values.get("inputs"), list):
        values["inputs"] = [outputs.get(name, name) for name in values["inputs"]]
    folder = run_dir / spec["name"]
    if "output_dir" in names:
        values["output_dir"] = str(folder)
    if "output" in names:
        values["output"] = str(folder / STAGE_OUTPUT[kind])
    return cls(**values), fn, folder


def run(config_path: str) -> Path:
    """Run (or continue) every stage of a pipeline config; returns the run directory."""
    cfg = yaml.safe_load(Path(config_path).read_text())
    return run_config(cfg)


def run_config(cfg: dict) -> Path:
    run_dir = Path(cfg.get("run_dir", "runs/run"))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    outputs, timings = {}, {}
    stages = cfg.get("stages") or []
    seen = set()
    for spec in stages:
        if "name" not in spec or spec["name"] in seen:
            raise ValueError(f"every stage needs a unique 'name'; got {spec}")
        seen.add(spec["name"])
    for spec in stages:
        config, fn, folder = build_stage_config(spec, cfg.get("defaults", {}), run_dir, outputs)
        out = getattr(config, "output", None) or getattr(config, "output_dir")
        outputs[spec["name"]] = out
        done = folder / "DONE"
        if done.exists():
            print(f"[aft run] {spec['name']}: done already, skipped")
            continue
        if spec["stage"] in MAIN_PROCESS_ONLY and _rank() != 0:
            _wait_for(done, spec["name"])
            continue
        print(f"[aft run] {spec['name']} ({spec['stage']}) -> {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        start = time.time()
        fn(config)
        timings[spec["name"]] = round(time.time() - start, 1)
        if _rank() == 0:
            done.write_text(json.dumps({"seconds": timings[spec["name"]]}) + "\n")
        else:  # a distributed stage: the main process writes DONE once its part (and any merge) is through
            _wait_for(done, spec["name"])
    return run_dir


def main(argv) -> int:
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: aft run CONFIG.yaml\n\n" + (__doc__ or ""))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    try:
        run(argv[0])
    except (ValueError, FileNotFoundError) as err:
        print(f"aft run: error: {err}", file=sys.stderr)
        return 1
    return 0
