"""Every stage through the `aft` command on tiny data: files written, resume, bad input, `aft run`, demo."""

import json
import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from aft.cli import main
from aft.data import DataError, load_groups, tokenize_group
from aft.pipeline import InitConfig, init
from aft.tasks import load_task

TASK = "arithmetic:min_steps=1,max_steps=2,n_train=24,n_val=4,n_test=6"


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    """A tiny Llama and tokenizer saved in a folder, as every stage takes them."""
    folder = tmp_path_factory.mktemp("init")
    init(InitConfig(task=TASK, output_dir=str(folder), size="test", vocab_size=300))
    return str(folder)


def lines(path):
    return [json.loads(x) for x in open(path, encoding="utf-8") if x.strip()]


@pytest.mark.parametrize("command", ["sft", "sample", "label", "align", "eval", "run", "report", "demo"])
def test_every_subcommand_has_help(command, capsys):
    try:
        code = main([command, "--help"])
    except SystemExit as exit_:
        code = exit_.code
    assert code == 0
    assert len(capsys.readouterr().out) > 100


def test_stages_through_the_cli(base_model, tmp_path):
    vft, samples, labeled = tmp_path / "vft", tmp_path / "samples.jsonl", tmp_path / "labeled.jsonl"
    common = ["--max_length", "96"]
    assert main(["sft", "--model", base_model, "--task", TASK, "--output_dir", str(vft), "--max_steps", "2",
                 "--per_device_train_batch_size", "4", "--report_to", "none", *common]) == 0
    AutoModelForCausalLM.from_pretrained(vft)  # a plain checkpoint
    assert main(["sample", "--model", str(vft), "--task", TASK, "--k", "3", "--limit", "5", "--max_new_tokens", "12",
                 "--output", str(samples)]) == 0
    groups = lines(samples)
    assert len(groups) == 5 and all(1 <= len(g["completions"]) <= 3 and g["n_sampled"] == 3 for g in groups)
    assert main(["label", "--task", TASK, "--groups", str(samples), "--output", str(labeled)]) == 0
    labelled = lines(labeled)
    assert all(len(g["labels"]) == len(g["completions"]) == len(g["correct"]) for g in labelled)
    aligned = tmp_path / "aft"
    before = {n: p.clone() for n, p in AutoModelForCausalLM.from_pretrained(vft).named_parameters()}
    assert main(["align", "--model", str(vft), "--groups", str(labeled), "--output_dir", str(aligned),
                 "--loss", "aft", "--constraint", "boundary", "--max_steps", "2", "--learning_rate", "1e-2",
                 "--per_device_train_batch_size", "2", "--report_to", "none", *common]) == 0
    after = dict(AutoModelForCausalLM.from_pretrained(aligned).named_parameters())
    assert any(not torch.equal(before[n], after[n]) for n in before)
    out = tmp_path / "eval" / "eval.json"
    assert main(["eval", "--model", str(aligned), "--task", TASK, "--split", "test", "--groups", str(labeled),
                 "--max_new_tokens", "12", "--output", str(out), "--vote_samples", "2"]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["questions"] == 6 and 0.0 <= metrics["accuracy"] <= 1.0 and 0.0 <= metrics["vote_accuracy"] <= 1.0
    assert "assessment_accuracy" in metrics and (out.parent / "scores.jsonl").exists()
    assert len(lines(out.parent / "predictions.jsonl")) == 6


def test_yaml_config(base_model, tmp_path):
    config = tmp_path / "sft.yaml"
    config.write_text(f"model: {base_model}\ntask: '{TASK}'\noutput_dir: {tmp_path / 'out'}\nmax_steps: 1\n"
                      "per_device_train_batch_size: 2\nreport_to: none\n")
    assert main(["sft", str(config)]) == 0
    assert (tmp_path / "out" / "config.json").exists()


def test_sample_resumes_to_the_same_file(base_model, tmp_path, monkeypatch):
    import aft.sample

    args = ["sample", "--model", base_model, "--task", TASK, "--k", "2", "--limit", "12", "--batch_size", "3",
            "--max_new_tokens", "10", "--temperature", "1.0"]
    whole = tmp_path / "whole.jsonl"
    assert main(args + ["--output", str(whole)]) == 0

    # Interrupted after two batches (an exception out of generate), with half a line left by the "kill".
    resumed = tmp_path / "resumed.jsonl"
    real, calls = aft.sample.generate_batch, []

    def dying(*a, **k):
        calls.append(1)
        if len(calls) > 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(aft.sample, "generate_batch", dying)
    with pytest.raises(KeyboardInterrupt):
        main(args + ["--output", str(resumed)])
    assert len(lines(resumed)) == 6
    with resumed.open("a") as f:
        f.write('{"id": "arithm')
    monkeypatch.setattr(aft.sample, "generate_batch", real)
    assert main(args + ["--output", str(resumed)]) == 0
    assert resumed.read_bytes() == whole.read_bytes()
    ids = [g["id"] for g in lines(resumed)]
    assert len(ids) == len(set(ids)) == 12


def test_bad_input_is_named_not_a_traceback(base_model, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "q", "completions": ["a"], "labels": [1]}\n{"prompt": oops}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:2: not valid JSON"):
        load_groups(bad)
    bad.write_text('{"prompt": "q", "labels": [1]}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:1: missing field\(s\) completions"):
        load_groups(bad)
    code = main(["align", "--model", base_model, "--groups", str(bad), "--output_dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert code == 1 and "aft align: error:" in err and "bad.jsonl:1" in err and "Traceback" not in err


def test_skips_are_counted(base_model):
    from collections import Counter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    report = Counter()
    group = {"prompt": "Question: 1 + 1?\nAnswer:", "completions": [" 2\n#### 2", "  ", " 1 + 1 = 2" * 40],
             "labels": [1, 0, 0]}
    feature = tokenize_group(tok, group, max_length=48, report=report)
    assert len(feature["completion_ids"]) == 1 and feature["labels"] == [1.0]
    assert report["skipped: empty completion"] == 1 and report["skipped: longer than max_length"] == 1


def test_peer_formats(tmp_path):
    trl_pairs = tmp_path / "pairs.jsonl"
    trl_pairs.write_text("\n".join(json.dumps(x) for x in [
        {"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p1", "chosen": "a", "rejected": "c"},
        {"prompt": "p2", "chosen": "d", "rejected": "e"}]))
    groups, report = load_groups(trl_pairs)
    assert [(g["completions"], g["labels"]) for g in groups] == [(["a", "b", "c"], [1.0, 0.0, 0.0]),
                                                                 (["d", "e"], [1.0, 0.0])]
    rrhf = tmp_path / "rrhf.jsonl"
    rrhf.write_text(json.dumps({"query": "q", "responses": ["x", "y"], "scores": [0.2, 0.9]}))
    groups, _ = load_groups(rrhf)
    assert groups[0]["prompt"] == "q" and groups[0]["labels"] == [0.2, 0.9]


def test_label_binary_and_step_ranks(tmp_path):
    task = load_task("arithmetic")
    group = {"id": "g", "prompt": "Question: Ava has 3 apples. She buys 4 more. Then she sells 2. How many?",
             "answer": "5", "completions": [
                 " 3 + 4 = 7\n7 - 2 = 5\n#### 5",   # right answer, steps hold  -> 3
                 " 3 + 4 = 8\n8 - 2 = 5\n#### 5",   # right answer, a wrong step -> 2
                 " 3 + 4 = 7\n7 - 1 = 6\n#### 6",   # wrong answer, steps hold  -> 1
                 " 3 + 4 = 9\n9 - 2 = 6\n#### 6",   # wrong answer, wrong step  -> 0
                 " I do not know"]}                 # no answer                -> 0
    path = tmp_path / "g.jsonl"
    path.write_text(json.dumps(group) + "\n")
    for feedback, expected in (("binary", [1, 1, 0, 0, 0]), ("steps", [3, 2, 1, 0, 0])):
        out = tmp_path / f"{feedback}.jsonl"
        assert main(["label", "--groups", str(path), "--output", str(out), "--feedback", feedback]) == 0
        assert lines(out)[0]["labels"] == expected
    group["scores"] = [0.1, 0.2, 0.3, 0.4, 0.5]
    path.write_text(json.dumps(group) + "\n")
    assert main(["label", "--groups", str(path), "--output", str(tmp_path / "f.jsonl"), "--feedback", "field"]) == 0
    assert lines(tmp_path / "f.jsonl")[0]["labels"] == [0.1, 0.2, 0.3, 0.4, 0.5]


def test_assessment_accuracy_by_hand():
    from aft.evaluate import assessment_accuracy, majority

    groups = [{"labels": [1, 0, 0], "correct": [True, False, False]}, {"labels": [1, 1, 0]}]
    # group 0: pairs (0,1) ordered (-1 > -2), (0,2) tie (-1 = -1) -> 1.5 of 2
    # group 1: pairs (0,2) ordered (-1 > -3), (1,2) wrong (-4 < -3) -> 1 of 2;  total 2.5 / 4
    result = assessment_accuracy(groups, [[-1.0, -2.0, -1.0], [-1.0, -4.0, -3.0]])
    assert result["assessment_accuracy"] == pytest.approx(2.5 / 4) and result["pairs"] == 4
    assert result["score_positive"] == pytest.approx((-1 - 1 - 4) / 3)
    assert result["score_negative"] == pytest.approx((-2 - 1 - 3) / 3)
    assert majority(["3", None, "4", "4"]) == "4" and majority([None]) is None and majority(["5", "6"]) == "5"


def test_run_skips_finished_stages(base_model, tmp_path):
    import yaml

    from aft.pipeline import run

    config = {"run_dir": str(tmp_path / "run"), "defaults": {"task": TASK, "max_length": 96, "report_to": "none"},
              "stages": [{"name": "vft", "stage": "sft", "model": base_model, "max_steps": 1},
                         {"name": "samples", "stage": "sample", "model": "vft", "k": 2, "limit": 3,
                          "max_new_tokens": 8},
                         {"name": "labeled", "stage": "label", "groups": "samples"}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    run(str(path))
    weights = tmp_path / "run" / "vft" / "model.safetensors"
    stamp = os.stat(weights).st_mtime_ns
    assert all((tmp_path / "run" / s / "DONE").exists() for s in ("vft", "samples", "labeled"))
    assert len(lines(tmp_path / "run" / "labeled" / "groups.jsonl")) == 3
    run(str(path))
    assert os.stat(weights).st_mtime_ns == stamp  # not retrained
    config["stages"][0]["learning_rat"] = 1.0
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ValueError, match="unknown field"):
        run(str(path))


def test_demo_quick_and_report(tmp_path, capsys):
    assert main(["demo", "--quick", "--run-dir", str(tmp_path / "demo")]) == 0
    results = json.loads((tmp_path / "demo" / "results.json").read_text())["results"]
    assert list(results) == ["VFT (start)", "VFT + more SFT (control)", "AFT (boundary)"]
    assert "A-accuracy" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "demo")]) == 0
    for name in ("report.md", "scores.png", "accuracy.png", "training.png"):
        assert (tmp_path / "demo" / "report" / name).stat().st_size > 0
