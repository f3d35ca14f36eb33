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
