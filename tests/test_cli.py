"""The `aft` command: every subcommand answers --help, and bad input gives one clear error line."""

import pytest

from aft.cli import main


@pytest.mark.parametrize("command", ["sft", "sample", "label", "align", "eval", "run", "report", "demo", "iterate", "grpo", "study"])
def test_every_subcommand_has_help(command, capsys):
    # argparse exits 0 after printing help, `aft run`/`demo` may return 0 instead; anything else is a failure
    try:
        code = main([command, "--help"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code in (0, None)
    assert "usage" in capsys.readouterr().out.lower()


def test_unknown_command_returns_2(capsys):
    assert main(["nonsense"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_missing_groups_file_prints_one_error_line(tmp_path, capsys):
    code = main(["label", "--groups", str(tmp_path / "absent.jsonl"), "--output", str(tmp_path / "out.jsonl")])
    err = capsys.readouterr().err
    assert code != 0
    assert err.startswith("aft label: error:") and "Traceback" not in err


def test_stage_usage_and_help_show_the_stage_flags_first(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["align", "--help"])
    out = capsys.readouterr().out
    assert out.startswith("usage: aft align ")
    trainer = out.index("Trainer options (transformers.TrainingArguments)")
    order = [out.index(flag) for flag in ("--beta", "--model", "--max_length")] + [trainer, out.index("--warmup_steps")]
    assert order == sorted(order)
    assert "One of aft, rft, rrhf, pro, dpo" in out and "('aft'" not in out


def test_yaml_keys_and_flags_combine_flags_win(tmp_path):
    from aft.cli import parse_config
    from aft.train import AlignConfig

    cfg = tmp_path / "align.yaml"
    cfg.write_text("groups: g.jsonl\nbeta: 0.5\nloss: rrhf\noutput_dir: out\n")
    config = parse_config(AlignConfig, [str(cfg), "--beta", "0.1", "--nll-weight", "2"], "align")
    assert (config.beta, config.nll_weight, config.loss, config.groups) == (0.1, 2.0, "rrhf", "g.jsonl")


def test_usage_error_is_one_line_exit_2_and_debug_shows_the_traceback(capsys):
    import pytest

    from aft.checks import AftError

    assert main(["sample", "--k", "abc"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("aft sample: error: argument --k: invalid int value")
    with pytest.raises(AftError, match="--k must be at least 1"):
        main(["sample", "--k", "0", "--debug"])


def test_settings_that_do_not_change_results_are_not_compared(tmp_path):
    from aft.provenance import changes, record
    from aft.train import AlignConfig

    def rec(**kw):
        return record("align", AlignConfig(groups="g.jsonl", report_to="none", **kw))

    base = rec(output_dir=str(tmp_path / "a"))
    same = rec(output_dir=str(tmp_path / "b"), logging_steps=1, save_steps=7, save_strategy="steps",
               dataloader_num_workers=2, disable_tqdm=True, overwrite=True)
    assert changes(base, same) == []
    changed = changes(base, rec(output_dir=str(tmp_path / "a"), beta=0.1, seed=3))
    assert changed == ["beta (0.5 -> 0.1)", "seed (42 -> 3)"]


@pytest.mark.parametrize("argv, named", [
    (["sample", "--offset", "-1"], "--offset"),
    (["sample", "--batch_tokens", "-1"], "--batch_tokens"),
    (["sample", "--gen_dtype", "float8"], "gen_dtype"),
    (["eval", "--batch_size", "-2"], "--batch_size"),
    (["label", "--answer_match", "fuzzy"], "answer_match"),
    (["align", "--dpo_boundary", "-1"], "--dpo_boundary"),
    (["sft", "--early_stopping_min_epochs", "-1"], "--early_stopping_min_epochs"),
    (["grpo", "--sample_budget", "0"], "--sample_budget"),
])
def test_new_fields_are_checked_before_any_file_is_written(argv, named, tmp_path, monkeypatch, capsys):
    if argv[0] == "grpo":
        pytest.importorskip("trl")
    monkeypatch.chdir(tmp_path)
    assert main([*argv, "--output_dir" if argv[0] in ("sft", "align", "grpo") else "--output",
                 "out" if argv[0] in ("sft", "align", "grpo") else "out.jsonl"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0]
    assert list(tmp_path.iterdir()) == []


def test_merge_needs_inputs():
    from aft.checks import AftError
    from aft.iterate import MergeConfig

    for inputs in ([], [""], [3]):
        with pytest.raises(AftError, match="inputs"):
            MergeConfig(inputs=inputs)


@pytest.mark.parametrize("command", ["eval", "sample"])
def test_generating_stages_start_without_the_trainers(command):
    """`aft eval` and `aft sample` import their own stage only: the trainers' imports (PEFT, TRL, datasets)
    are seconds of start-up on a CPU, paid on every evaluation of a study."""
    import subprocess
    import sys

    script = (f"import sys\nfrom aft.cli import main\ntry:\n    main([{command!r}, '--help'])\nexcept SystemExit:\n"
              "    pass\nprint('MODULES', ' '.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
    assert f"usage: aft {command}" in out
    loaded = set(out.split("MODULES", 1)[1].split())
    assert f"aft.{'evaluate' if command == 'eval' else 'sample'}" in loaded
    assert not loaded & {"aft.train", "aft.grpo", "aft.label", "aft.iterate", "trl", "peft", "datasets"}


def test_grpo_without_trl_says_what_it_needs(monkeypatch, capsys):
    import aft.grpo

    monkeypatch.setattr(aft.grpo, "GRPOConfig", None)  # as aft.grpo defines it where TRL is not installed
    assert main(["grpo", "--help"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aft grpo: error: aft grpo needs TRL") and "pip install 'aft[study]'" in err


def test_help_lists_the_commands_not_the_pipeline_only_stages(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "  eval " in out and "  grpo " in out
    assert "  merge " not in out and "  convert " not in out


EXIT_SCRIPT = """
import atexit, sys, threading, time
from pathlib import Path
import aft.cli

class AtTeardown:
    def __del__(self):
        sys.stderr.write("torn down\\n")

kept = AtTeardown()  # a module global: deleted only by the interpreter's teardown
atexit.register(lambda: sys.stderr.write("atexit ran\\n"))
if sys.argv[1] == "thread":  # a thread that is not a daemon, still working when the command ends
    threading.Thread(target=lambda: (time.sleep(0.3), Path(sys.argv[2]).write_text("finished"))).start()
sys.stdout.write("buffered, no newline")
aft.cli.exit_now(3)
"""


def test_exit_now_skips_teardown_but_not_atexit_or_buffered_output(tmp_path):
    import subprocess
    import sys

    script = tmp_path / "exit.py"
    script.write_text(EXIT_SCRIPT)
    fast = subprocess.run([sys.executable, str(script), "plain"], capture_output=True, text=True)
    assert fast.returncode == 3
    assert fast.stdout == "buffered, no newline"
    assert fast.stderr == "atexit ran\n"  # and not "torn down": the teardown was skipped
    # a thread still working gets the ordinary exit, which waits for it (and tears down)
    done = tmp_path / "thread.txt"
    waited = subprocess.run([sys.executable, str(script), "thread", str(done)], capture_output=True, text=True)
    assert waited.returncode == 3 and done.read_text() == "finished"
    assert "atexit ran" in waited.stderr and "torn down" in waited.stderr


def test_the_aft_command_is_run():
    from importlib.metadata import entry_points

    (script,) = [e for e in entry_points(group="console_scripts") if e.name == "aft"]
    assert script.value == "aft.cli:run"
