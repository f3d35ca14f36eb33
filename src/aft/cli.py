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
accepted (``--lora-r`` = ``--lora_r``). Flags after the file override its keys (``aft align cfg.yaml --beta 0.1``).

Every error a user can cause (a bad flag, file, line or field) ends the command with one line
``aft STAGE: error: ...`` and exit status 1 (2 for a usage error); ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import sys

from aft.checks import AftError, UsageError

CONFIG_SUFFIXES = (".yaml", ".yml", ".json")


def _parser(command: str, config_class):
    """The stage's flag parser: usage ``aft COMMAND ...``, a usage error raised (not a 100-line dump and
    exit), and for the training stages their own flags first, the Trainer's after a heading."""
    from transformers import HfArgumentParser

    # only a training stage's config derives from TrainingArguments, whose module is then loaded already; importing
    # it here would load PEFT and the Trainer for `aft eval` and `aft sample` too (seconds of start-up)
    training_args = sys.modules.get("transformers.training_args")
    trainer_classes = training_args.TrainingArguments.__mro__ if training_args else (object,)

    class Parser(HfArgumentParser):
        def error(self, message):
            raise UsageError(f"{message} (see `aft {command} --help`)")

    parser = Parser(config_class, prog=f"aft {command}", usage=f"aft {command} [CONFIG.yaml] [--flag VALUE ...]",
                    description=(config_class.__doc__ or "").strip())
    # the stage's own fields first (the most derived class's first), then any Trainer option under a heading
    mro = [cls for cls in config_class.__mro__ if cls not in trainer_classes]
    rank = {}
    for position, cls in reversed(list(enumerate(mro))):
        rank.update({name: position for name in getattr(cls, "__annotations__", {})})
    options = parser._optionals._group_actions
    trainer = [a for a in options if a.dest not in rank and a.dest != "help"]
    options.sort(key=lambda a: -1 if a.dest == "help" else rank.get(a.dest, len(mro)))
    if trainer:
        group = parser.add_argument_group("Trainer options (transformers.TrainingArguments)")
        for action in trainer:
            options.remove(action)
            group._group_actions.append(action)
    return parser


def _read_config_file(path: str) -> dict:
    import json

    import yaml

    try:
        with open(path, encoding="utf-8") as f:
            values = json.load(f) if path.endswith(".json") else yaml.safe_load(f)
    except FileNotFoundError:
        raise AftError(f"{path}: no such config file") from None
    except (yaml.YAMLError, json.JSONDecodeError) as err:
        raise AftError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'YAML'}: "
                       + " ".join(str(err).split())) from None
    except UnicodeDecodeError as err:
        raise AftError(f"{path}: not valid UTF-8 (byte {err.start})") from None
    if not isinstance(values, dict):
        raise AftError(f"{path}: expected a mapping of field: value, got {type(values).__name__}")
    return values


def parse_config(config_class, argv, command: str = "stage"):
    """A stage config from flags, or from a YAML/JSON file given first, whose keys later flags override."""
    from dataclasses import fields

    parser = _parser(command, config_class)
    path = argv[0] if argv and argv[0].endswith(CONFIG_SUFFIXES) and not argv[0].startswith("-") else None
    values = _read_config_file(path) if path else {}
    names = {f.name for f in fields(config_class) if f.init}
    unknown = sorted(set(values) - names)
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {', '.join(unknown)} for aft {command}")
    unset = object()
    if path:  # only flags actually given replace the file's values
        parser.set_defaults(**{name: unset for name in names})
    namespace, remaining = parser.parse_known_args(argv[1:] if path else argv)
    if remaining:
        raise UsageError(f"unrecognized arguments: {' '.join(remaining)} (see `aft {command} --help`)")
    given = {k: v for k, v in vars(namespace).items() if k in names and v is not unset}
    try:
        return config_class(**{**values, **given})
    except AftError as err:
        raise AftError(f"{path}: {err}" if path else str(err)) from None


USAGE = """usage: aft <command> [flags] | aft <command> CONFIG.yaml [flags] | aft <command> --help

Alignment Fine-Tuning (AFT, arXiv 2309.02144) for LLM reasoners. Add --debug to any command to see the
traceback of an error instead of its one line.

commands:
  demo     the whole pipeline on a built-in task with a small model, offline, on CPU
  run      the stages of a pipeline config, in order, resumable
  report   plots and a markdown page for a run directory
  study    the paper's comparison over seeds (methods, sweep, claims), written up as markdown
  iterate  rounds of sample -> label -> align, each round sampling from the last round's model
{stages}"""


def error_line(err: BaseException) -> str | None:
    """The one line that reports an error a user can cause; None for anything else (a bug: traceback)."""
    import yaml

    user_errors = (ValueError, OSError, TypeError, UnicodeError, yaml.YAMLError)
    if not isinstance(err, user_errors) and type(err).__name__ != "SafetensorError":
        return None
    if isinstance(err, UnicodeDecodeError):
        return f"not valid UTF-8 (byte {err.start}): {err.reason}"
    text = " ".join(str(err).split()) or type(err).__name__
    return text if isinstance(err, (ValueError, OSError)) else f"{type(err).__name__}: {text}"


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    command = argv[0] if argv and not argv[0].startswith("-") else ""
    finished = False
    try:
        code = _dispatch(argv)
        finished = True
        return code
    except Exception as err:
        line = error_line(err)
        if debug or line is None:
            raise
        print(f"aft {command}: error: {line}".replace("aft : ", "aft: "), file=sys.stderr)
        return 2 if isinstance(err, UsageError) else 1
    finally:
        _close_distributed(wait=finished)


def _close_distributed(wait: bool = True):
    """Destroy the process groups a launcher started once the command is done on this rank. Left to interpreter
    teardown, or destroyed while another rank still has work in flight with this one, gloo's threads can abort a
    rank that has finished ("terminate called without an active exception"), failing the launch: so when the
    command succeeded, every rank first waits for the others (after an error the others may never arrive)."""
    if "torch.distributed" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def _dispatch(argv):
    from aft.pipeline import STAGES, stage

    commands = {name: where for name, where in STAGES.items() if where.command}
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE.format(stages="\n".join(f"  {n:<8} {w.description}" for n, w in commands.items())))
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
    if command not in commands:
        raise UsageError(f"unknown command {command!r}; see `aft --help`")
    config_class, fn = stage(command)
    fn(parse_config(config_class, rest, command))
    return 0


def run():
    """The ``aft`` command and ``python -m aft.cli``: ``main``, then ``exit_now``."""
    exit_now(main())


def exit_now(code):
    """End the process with exit status ``code``, skipping the interpreter's teardown where nothing is left
    running. Tearing down torch's and transformers' thousands of modules and objects takes 0.8 s on 2 cores
    (measured after loading SmolLM2), a tenth of an `aft eval` of 64 questions; what teardown would still do
    for us is done first: the atexit functions (logging's flush among them) and the flush of stdout and stderr.
    Files the stages write are closed by then (``with``). Where another thread that is not a daemon still runs
    (an upload, a thread pool), the ordinary exit, which waits for it."""
    import atexit
    import os
    import threading

    code = code if isinstance(code, int) else (0 if code is None else 1)
    if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.current_thread()):
        sys.exit(code)
    atexit._run_exitfuncs()  # what the interpreter runs at exit; os._exit alone would skip them
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a closed pipe or stream: the ordinary exit would lose it too
            pass
    os._exit(code)


if __name__ == "__main__":
    run()
