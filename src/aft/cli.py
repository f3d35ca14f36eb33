"""The ``aft`` command: one subcommand per pipeline stage, named like the Python function it calls.

    aft sft     --model M --output_dir runs/vft              (aft.train.sft)
    aft sample  --model runs/vft --k 8 --output samples.jsonl (aft.sample.sample)
    aft label   --groups samples.jsonl --output labeled.jsonl (aft.label.label)
    aft align   --model runs/vft --groups labeled.jsonl --loss aft --constraint boundary --output_dir runs/aft
    aft eval    --model runs/aft --groups test_labeled.jsonl  (aft.evaluate.evaluate)
    aft grpo    --model runs/vft --sample_budget 8000 --output_dir runs/grpo (aft.grpo.grpo; needs TRL)
    aft iterate CONFIG.yaml                                   (aft.iterate.iterate: rounds of sample/label/align)
    aft report  RUN_DIR                                       (aft.report.report)
    aft run     CONFIG.yaml                                   (aft.pipeline.run)
    aft study   CONFIG.yaml                                   (aft.study.study)
    aft demo                                                  (aft.demo.demo)

Flags come from each stage's config dataclass (``transformers.HfArgumentParser``), so every flag is also
a YAML key: ``aft sft config.yaml`` reads the same fields from a file. Dashes and underscores are both
accepted (``--lora-r`` = ``--lora_r``).
"""

from __future__ import annotations

import sys


def _stages():
    from aft.evaluate import EvalConfig, evaluate
    from aft.grpo import GRPOConfig, grpo
    from aft.label import LabelConfig, label
    from aft.sample import SampleConfig, sample
    from aft.train import AlignConfig, SFTConfig, align, sft

    return {
        "sft": (SFTConfig, sft, "Vanilla fine-tuning (VFT) on reference chains of thought."),
        "sample": (SampleConfig, sample, "Sample k chains of thought per question (resumable)."),
        "label": (LabelConfig, label, "Label sampled chains of thought: binary, step-verified or given scores."),
        "align": (AlignConfig, align, "Alignment: AFT or a baseline (rft, rrhf, pro, dpo), with a constraint."),
        "eval": (EvalConfig, evaluate, "Accuracy, majority-vote accuracy and assessment accuracy."),
        **({"grpo": (GRPOConfig, grpo, "GRPO (TRL) rewarded by the task's answer checker: an on-policy baseline.")}
           if GRPOConfig is not None else {}),
    }


def parse_config(config_class, argv):
    """A stage config from flags, or from one YAML/JSON file given as the only argument."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(config_class)
    if len(argv) == 1 and argv[0].endswith((".yaml", ".yml")):
        return parser.parse_yaml_file(argv[0])[0]
    if len(argv) == 1 and argv[0].endswith(".json"):
        return parser.parse_json_file(argv[0])[0]
    return parser.parse_args_into_dataclasses(args=argv)[0]


USAGE = """usage: aft <command> [flags] | aft <command> CONFIG.yaml | aft <command> --help

Alignment Fine-Tuning (AFT, arXiv 2309.02144) for LLM reasoners.

commands:
  demo     the whole pipeline on a built-in task with a small model, offline, on CPU
  run      the stages of a pipeline config, in order, resumable
  report   plots and a markdown page for a run directory
  study    the paper's comparison over seeds (methods, sweep, claims), written up as markdown
  iterate  rounds of sample -> label -> align, each round sampling from the last round's model
{stages}"""


def main(argv=None):
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    finally:
        _close_distributed()


def _close_distributed():
    """Destroy the process group a launcher started once the command is done on this rank (every stage ends
    with all ranks waiting for each other). Left to interpreter teardown, gloo's threads can abort a rank
    that has finished its work ("terminate called without an active exception"), failing the launch."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dispatch(argv):
    stages = _stages()
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(stages="\n".join(f"  {n:<8} {d}" for n, (_, _, d) in stages.items())))
        return 0
    command, rest = argv[0], argv[1:]
    if command == "demo":
        from aft.demo import main as demo_main
        return demo_main(rest)
    if command == "run":
        from aft.pipeline import main as run_main
        return run_main(rest)
    if command == "iterate":
        from aft.iterate import main as iterate_main
        return iterate_main(rest)
    if command == "study":
        from aft.study import main as study_main
        return study_main(rest)
    if command == "report":
        from aft.report import main as report_main
        return report_main(rest)
    if command not in stages:
        print(f"aft: unknown command {command!r}; see `aft --help`", file=sys.stderr)
        return 2
    config_class, fn, _ = stages[command]
    try:
        config = parse_config(config_class, rest)
        fn(config)
    except (ValueError, FileNotFoundError) as err:  # bad input: one clear line, no deep stack trace
        print(f"aft {command}: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
