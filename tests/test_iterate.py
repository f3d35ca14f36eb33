"""`aft iterate`: rounds of sample -> label -> align expanded into pipeline stages, resumable between rounds."""

import json
from collections import Counter

import pytest
import yaml

import aft.label
import aft.sample
import aft.train
from aft.data import write_jsonl
from aft.iterate import MergeConfig, expand, iterate, merge

BASE = {"run_dir": "r", "start": "vft", "rounds": 3, "questions_per_round": 5,
        "sample": {"k": 4}, "align": {"loss": "aft"}}


def _stage(cfg, name):
    return next(s for s in cfg["stages"] if s["name"] == name)


def test_previous_restart_chains_models_and_takes_fresh_questions():
    cfg = expand({**BASE, "defaults": {"seed": 7}})
    assert [s["name"] for s in cfg["stages"]][:3] == ["round1/samples", "round1/labeled", "round1/align"]
    assert _stage(cfg, "round1/samples")["model"] == "vft"
    assert _stage(cfg, "round2/samples")["model"] == "round1/align"   # sampled from the last round's model
    assert _stage(cfg, "round3/align")["model"] == "round2/align"     # and trained further
    assert _stage(cfg, "round3/align")["groups"] == "round3/labeled"
    assert [_stage(cfg, f"round{r}/samples")["offset"] for r in (1, 2, 3)] == [0, 5, 10]
    assert [_stage(cfg, f"round{r}/samples")["seed"] for r in (1, 2, 3)] == [7, 8, 9]
    assert _stage(cfg, "round2/samples")["k"] == 4 and _stage(cfg, "round2/align")["loss"] == "aft"


def test_start_restart_trains_the_start_model_on_the_union():
    cfg = expand({**BASE, "restart": "start", "fresh_questions": False})
    assert _stage(cfg, "round3/union")["inputs"] == ["round1/labeled", "round2/labeled", "round3/labeled"]
    assert _stage(cfg, "round3/align")["model"] == "vft" and _stage(cfg, "round3/align")["groups"] == "round3/union"
    assert _stage(cfg, "round3/samples")["model"] == "round2/align" and _stage(cfg, "round3/samples")["offset"] == 0


@pytest.mark.parametrize("bad, message", [({"rounds": 0}, "rounds"), ({"restart": "vft"}, "restart"),
                                          ({"questions_per_round": -1}, "questions_per_round"),
                                          ({"round": 2}, "unknown key"), ({"start": None}, "start")])
def test_bad_configs_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        expand({**BASE, **bad})


def test_merge_unions_a_questions_groups(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_jsonl(a, [{"id": "q1", "prompt": "P", "completions": ["x", "y"], "labels": [1, 0], "correct": [True, False]}])
    write_jsonl(b, [{"id": "q1", "prompt": "P", "completions": ["y ", "z"], "labels": [0, 1], "correct": [False, True]},
                    {"id": "q2", "prompt": "Q", "completions": ["w"], "labels": [1]}])
    merge(MergeConfig(inputs=[str(a), str(b)], output=str(tmp_path / "m.jsonl")))
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").open()]
    assert [r["id"] for r in rows] == ["q1", "q2"]
    assert rows[0]["completions"] == ["x", "y", "z"] and rows[0]["labels"] == [1, 0, 1]  # "y " is "y" again
    assert rows[0]["correct"] == [True, False, True] and rows[1]["correct"] == [1]


@pytest.mark.slow
def test_two_rounds_write_each_file_once_and_resume_between_rounds(tmp_path, monkeypatch):
    cfg = {"run_dir": str(tmp_path / "run"),
           "defaults": {"task": "arithmetic:min_steps=1,max_steps=1,n_train=32,n_val=4,n_test=8",
                        "max_new_tokens": 12, "max_length": 96, "per_device_train_batch_size": 4, "seed": 0,
                        "report_to": "none"},
           "stages": [{"name": "init", "stage": "init", "size": "test", "vocab_size": 300}],
           "start": "init", "rounds": 2, "questions_per_round": 6, "restart": "start",
           "sample": {"k": 3, "temperature": 1.0, "batch_size": 6}, "align": {"loss": "aft", "num_train_epochs": 1},
           "eval": {"split": "test", "limit": 4}}
    path = tmp_path / "iterate.yaml"
    path.write_text(yaml.safe_dump(cfg))
    calls = Counter()

    def counted(module, name, stop_at=None):
        original = getattr(module, name)

        def wrapper(config):
            where = getattr(config, "output", None) or config.output_dir
            calls[where] += 1
            if stop_at and stop_at in where:
                raise RuntimeError("stopped")  # the machine went away between rounds
            return original(config)
        monkeypatch.setattr(module, name, wrapper)
        return original

    sample = counted(aft.sample, "sample", stop_at="round2")
    counted(aft.label, "label")
    counted(aft.train, "align")
    with pytest.raises(RuntimeError, match="stopped"):
        iterate(str(path))
    run = tmp_path / "run"
    first = {p: p.stat().st_mtime_ns for p in (run / "round1").rglob("*") if p.is_file()}
    assert (run / "round1" / "align" / "DONE").exists() and not (run / "round2" / "samples" / "DONE").exists()

    monkeypatch.setattr(aft.sample, "sample", sample)
    counted(aft.sample, "sample")
    iterate(str(path))
    assert {p: p.stat().st_mtime_ns for p in (run / "round1").rglob("*") if p.is_file() and p in first} == first
    assert all(n == 1 for where, n in calls.items() if "round1" in where)  # round 1 ran once, before the stop
    assert calls[str(run / "round2" / "samples" / "groups.jsonl")] == 2   # the stopped stage, run again
    assert calls[str(run / "round2" / "align")] == 1
    # round 2 sampled from round 1's model and trained the start model on the union of both rounds' groups
    assert yaml.safe_load((run / "config.yaml").read_text())["stages"][-2]["model"] == "init"
    union = [json.loads(line) for line in (run / "round2" / "union" / "groups.jsonl").open()]
    assert len(union) == 12  # fresh questions: 6 per round
    spent = json.loads((run / "budget.json").read_text())
    assert spent["round1"]["completions_sampled"] == 18 and spent["total"]["completions_sampled"] == 36
    assert spent["total"]["optimizer_steps"] == spent["round1"]["optimizer_steps"] + spent["round2"]["optimizer_steps"]
    assert json.loads((run / "round2" / "eval" / "eval.json").read_text())["questions"] == 4


def test_shipped_config_expands_and_the_cli_names_a_bad_one(tmp_path, capsys):
    from pathlib import Path

    from aft.cli import main

    shipped = yaml.safe_load((Path(__file__).parents[1] / "configs" / "iterate.yaml").read_text())
    names = [s["name"] for s in expand(shipped)["stages"]]
    assert names[-4:] == ["round3/samples", "round3/labeled", "round3/align", "round3/eval"]
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**BASE, "rounds": "three"}))
    assert main(["iterate", str(bad)]) == 1
    assert "rounds must be a positive integer" in capsys.readouterr().err
