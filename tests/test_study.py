"""aft study: config expansion, per-method tuning, paired statistics and verdicts, one seed end to end with its
seed file, and the report rebuilt from seed files alone."""

import json
import math
import re
import shutil

import pytest
import yaml

import aft.study as study_module
from aft.cli import main
from aft.study import judge, load_study, method_stages, paired_difference, sweep_stages, tune
from aft.tasks import load_task

TASK = "arithmetic:variant=shop+mixed,min_steps=1,max_steps=1,max_value=9,n_train=48,n_val=8,n_test=12"


def tiny_study(tmp_path) -> dict:
    return {
        "run_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "outputs": {"seeds": str(tmp_path / "out" / "seeds"), "json": str(tmp_path / "out" / "study.json"),
                    "markdown": str(tmp_path / "out" / "results.md"), "figures": str(tmp_path / "out" / "figures")},
        "defaults": {"task": TASK, "per_device_train_batch_size": 8, "max_length": 96, "max_new_tokens": 16,
                     "eval_max_new_tokens": 16, "logging_steps": 1},
        "base": [
            {"name": "init", "stage": "init", "size": "test", "vocab_size": 300},
            {"name": "vft", "stage": "sft", "model": "init", "num_train_epochs": 2, "learning_rate": 3e-3,
             "eval_strategy": "epoch", "eval_limit": 8},
            {"name": "samples", "stage": "sample", "model": "vft", "limit": 8, "k": 3},
            {"name": "labeled", "stage": "label", "groups": "samples"},
            {"name": "vft_on_train", "stage": "eval", "model": "vft", "split": "train", "limit": 4, "groups": "labeled"},
            {"name": "test_samples", "stage": "sample", "model": "vft", "split": "test", "k": 2},
            {"name": "test_labeled", "stage": "label", "groups": "test_samples"},
        ],
        "evaluation": {"split": "test", "groups": "test_labeled"},
        "method_defaults": {"stage": "align", "model": "vft", "groups": "labeled", "per_device_train_batch_size": 4},
        "sweep": {"evaluation": {"limit": 8},
                  "grids": {"lr": {"learning_rate": [1e-4, 1e-3]}, "lr_beta": {"learning_rate": [1e-3], "beta": [0.05, 0.5]}}},
        "methods": [{"name": "vft", "label": "VFT"}, {"name": "more", "stage": "sft", "limit": 8, "tune": "lr"},
                    {"name": "aft", "label": "AFT", "loss": "aft", "constraint": "boundary", "tune": "lr_beta"},
                    {"name": "aft_none", "constraint": "none"}],
        "curve": {"methods": ["aft"], "seeds": [0], "stage": {"eval_strategy": "steps", "eval_steps": 1,
                                                              "eval_limit": 4, "eval_groups": "test_labeled"}},
        "ood": {"task": TASK.replace("min_steps=1,max_steps=1", "min_steps=2,max_steps=2"), "methods": ["vft", "aft"]},
        "plots": {"scores": ["vft", "aft"]},
        "rule": {"standard_errors": 2},
        "claims": [{"text": "AFT beats VFT", "a": "aft", "b": "vft"},
                   {"text": "mixed variant", "a": "aft", "b": "vft", "metric": "accuracy:mixed"},
                   {"text": "A-accuracy", "a": "aft", "b": "vft", "metric": "assessment_accuracy"}],
    }


def write(cfg, tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


# ---- expansion and tuning ------------------------------------------------------------------------------

def test_every_tuned_method_sweeps_its_own_grid_and_methods_take_their_own_stage_defaults(tmp_path):
    cfg = tiny_study(tmp_path)
    sweep = sweep_stages(cfg)
    trained = [s for s in sweep if s["stage"] != "eval"]
    assert [s["name"] for s in trained] == ["sweep_more_0", "sweep_more_1", "sweep_aft_0", "sweep_aft_1"]
    assert [(s["learning_rate"], s.get("beta")) for s in trained] == [(1e-4, None), (1e-3, None), (1e-3, 0.05),
                                                                       (1e-3, 0.5)]
    assert trained[0]["stage"] == "sft" and "groups" not in trained[0]  # sft has no such field
    assert all(s["split"] == "validation" and s["limit"] == 8 for s in sweep if s["stage"] == "eval")
    more = method_stages(cfg, cfg["methods"][1], {"learning_rate": 5e-4}, seed=1)
    assert more[0] == {"model": "vft", "per_device_train_batch_size": 4, "name": "more", "stage": "sft", "limit": 8,
                       "learning_rate": 5e-4}
    aft0 = method_stages(cfg, cfg["methods"][2], {}, seed=0, reuse="sweep_aft_1")
    assert aft0[0]["eval_strategy"] == "steps" and aft0[0]["eval_task"] == TASK  # the curve: trained, first seed
    assert [s["name"] for s in aft0] == ["aft", "eval_aft", "ood_aft"] and aft0[2]["groups"] is None
    # off the curve, the sweep's model at the chosen point is evaluated, not trained again
    more0 = method_stages(cfg, cfg["methods"][1], {}, seed=0, reuse="sweep_more_1")
    assert [s["name"] for s in more0] == ["eval_more"] and more0[0]["model"].endswith("seed0/sweep_more_1")
    assert [s["name"] for s in method_stages(cfg, cfg["methods"][0], {}, seed=0)] == ["eval_vft", "ood_vft"]


def test_tune_tests_each_method_at_its_own_best(tmp_path, monkeypatch):
    cfg = tiny_study(tmp_path)
    run_dir = tmp_path / "study" / "seed0"
    accuracy = {"sweep_more_0": 0.5, "sweep_more_1": 0.25, "sweep_aft_0": 0.25, "sweep_aft_1": 0.75}
    for name, value in accuracy.items():
        (run_dir / f"{name}_eval").mkdir(parents=True)
        (run_dir / f"{name}_eval" / "eval.json").write_text(json.dumps({"accuracy": value}))
    (run_dir / "sweep_more_0").mkdir()
    (run_dir / "sweep_more_0" / "DONE").write_text("{}")  # aft's sweep model is gone: trained again, not reused
    monkeypatch.setattr(study_module, "run_config", lambda c: run_dir)
    # another seed refuses to start before the sweep
    with pytest.raises(FileNotFoundError, match="run the sweep first"):
        tune(cfg, 1)
    chosen, table, reuse = tune(cfg, 0)
    assert chosen == {"more": {"learning_rate": 1e-4}, "aft": {"learning_rate": 1e-3, "beta": 0.5}}
    assert reuse == {"more": "sweep_more_0"}
    assert [r["chosen"] for r in table] == [True, False, False, True] and len(table) == 4
    assert {"stage", "settings"}.isdisjoint(table[0])
    # the sweep file carries the choice to another seed, with no table and nothing reused
    sweep = json.loads((tmp_path / "out" / "seeds" / "sweep.json").read_text())
    assert sweep["chosen"] == chosen and len(sweep["rows"]) == 4
    assert tune(cfg, 1) == (chosen, [], {})
    # a study run before sweep files existed: the choice is in the sweep seed's own file
    (tmp_path / "out" / "seeds" / "sweep.json").unlink()
    (tmp_path / "out" / "seeds" / "seed0.json").write_text(json.dumps({"chosen": chosen}))
    assert tune(cfg, 1) == (chosen, [], {})


def test_the_sweep_is_a_unit_that_resumes_and_refuses_other_settings(tmp_path, monkeypatch):
    cfg = tiny_study(tmp_path)
    run_dir = tmp_path / "study" / "seed0"
    trained = []

    def fake_run(seed_cfg, stop_after=None):
        names = [s["name"] for s in seed_cfg["stages"] if s["name"].startswith("sweep_") and s["stage"] != "eval"]
        if names and names[0].startswith(stop_after or "-"):
            raise KeyboardInterrupt  # the unit is stopped here
        trained.extend(names)
        for name in names:
            (run_dir / f"{name}_eval").mkdir(parents=True, exist_ok=True)
            (run_dir / f"{name}_eval" / "eval.json").write_text(json.dumps({"accuracy": 0.5}))
        return run_dir

    monkeypatch.setattr(study_module, "run_config", lambda c: fake_run(c, "sweep_aft"))
    with pytest.raises(KeyboardInterrupt):
        study_module.run_sweep(cfg)
    path = tmp_path / "out" / "seeds" / "sweep.json"
    first = json.loads(path.read_text())  # written after the first method, before the stop
    assert [r["method"] for r in first["rows"]] == ["more", "more"] and set(first["chosen"]) == {"more"}
    assert trained == ["sweep_more_0", "sweep_more_1"]
    with pytest.raises(ValueError, match="the sweep of \\['aft'\\] is missing"):
        tune(cfg, 1)
    # resumed (e.g. on another machine): only the method the file lacks is trained
    monkeypatch.setattr(study_module, "run_config", fake_run)
    record = study_module.run_sweep(cfg)
    assert trained == ["sweep_more_0", "sweep_more_1", "sweep_aft_0", "sweep_aft_1"]
    assert set(record["chosen"]) == {"more", "aft"}
    assert study_module.run_sweep(cfg) == record and len(trained) == 4  # complete: nothing trained
    # a grid changed after the sweep: its rows are refused, not reused; --overwrite trains that method again
    cfg["sweep"]["grids"]["lr"]["learning_rate"] = [1e-4, 3e-3]
    with pytest.raises(ValueError, match="other settings"):
        study_module.run_sweep(cfg)
    with pytest.raises(ValueError, match="other settings"):
        tune(cfg, 1)
    study_module.run_sweep({**cfg, "overwrite": True})
    assert trained[4:] == ["sweep_more_0", "sweep_more_1"]
    assert [r["learning_rate"] for r in json.loads(path.read_text())["rows"] if r["method"] == "more"] == [1e-4, 3e-3]


def build_shipped(name: str, seed: int, point: int, tmp_path) -> tuple[dict, dict]:
    """A shipped study config and every stage config of one seed's pipeline (its sweep included), each tuned
    method at the given point of its grid."""
    from pathlib import Path

    from aft.pipeline import build_stage_config
    from aft.study import seed_config

    cfg = load_study(str(Path(__file__).parent.parent / "configs" / name))
    chosen = {m["name"]: {k: v[point] for k, v in cfg["sweep"]["grids"][m["tune"]].items()}
              for m in cfg["methods"] if m.get("tune")}
    stages = sweep_stages(cfg) + [s for m in cfg["methods"]
                                  for s in method_stages(cfg, m, chosen.get(m["name"], {}), seed)]
    outputs, built = {}, {}
    for spec in seed_config(cfg, seed, stages)["stages"]:
        config, _, _ = build_stage_config(spec, {**cfg["defaults"], "seed": seed}, tmp_path, outputs)
        outputs[spec["name"]] = getattr(config, "output", None) or config.output_dir
        built[spec["name"]] = config
    return cfg, built


def test_shipped_study_config_builds_every_stage_of_the_sweep_seed(tmp_path):
    cfg, built = build_shipped("study.yaml", 0, 0, tmp_path)
    assert built["vft"].early_stopping_patience is None and built["vft"].num_train_epochs == 16
    assert built["dpo_pub"].nll_on == "none" and built["rrhf_pub"].nll_on == "best" and built["rrhf"].nll_on == "both"
    assert built["dpo_bc"].dpo_beta == 0.1 and built["aft"].beta == 0.05
    # every tuned method has the same budget: as many trainings on the sweep seed as its grid has points
    tuned = [m["name"] for m in cfg["methods"] if m.get("tune")]
    trainings = {m: sum(re.fullmatch(f"sweep_{m}_[0-9]+", n) is not None for n in built) for m in tuned}
    assert len(tuned) == 15 and set(trainings.values()) == {4}, trainings


def test_shipped_smollm2_study_config_builds_every_stage(tmp_path):
    cfg, built = build_shipped("study-smollm2.yaml", 1, -1, tmp_path)
    assert built["base"].gguf == "smollm2" and built["vft"].early_stopping_patience is None
    # LoRA on every training stage: VFT, the SFT control, each alignment and each sweep point
    trained = [n for n, c in built.items() if hasattr(c, "learning_rate")]
    assert len(trained) == 1 + 6 + 12 and all(built[n].lora_r == 16 and built[n].lora_alpha == 32 for n in trained)
    assert built["aft"].learning_rate == 4e-4 and built["vft_more"].limit == 160 and built["dpo_bc"].dpo_beta == 0.1
    assert built["sweep_aft_0_eval"].split == "validation" and built["sweep_aft_0_eval"].limit == 200
    assert built["eval_aft"].split == "test" and built["eval_aft"].limit == 1000 and built["eval_aft"].groups
    assert built["vft_on_train"].split == "train" and built["vft_on_train"].groups.endswith("labeled/groups.jsonl")
    fixed = [c for c in cfg["claims"] if not isinstance(c["b"], str)]
    assert [(c["a"], c["b"], c["metric"]) for c in fixed] == [("vft", 0.7, "assessment_accuracy")]


def test_bad_study_config_is_refused(tmp_path):
    cfg = tiny_study(tmp_path)
    cfg["claims"].append({"text": "x", "a": "aft", "b": "nope"})
    with pytest.raises(ValueError, match="unknown methods"):
        load_study(str(write(cfg, tmp_path)))
    assert main(["study", str(write(cfg, tmp_path))]) == 1
    cfg = tiny_study(tmp_path)
    cfg["sweep"]["grids"]["lr"]["learning_rate"].append(3e-3)  # 3 points against 2: not an equal budget
    with pytest.raises(ValueError, match="same number of points"):
        load_study(str(write(cfg, tmp_path)))
    cfg = tiny_study(tmp_path)
    cfg["methods"][1]["tune"] = "lr_beta"  # sft has no beta
    with pytest.raises(ValueError, match="cannot tune"):
        load_study(str(write(cfg, tmp_path)))
    for bad, message in [({"tune_as": "nope"}, "tune_as"), ({"rounds": 0}, "rounds"),
                         ({"rounds": 2, "tune": "lr_beta"}, "rounds")]:
        cfg = tiny_study(tmp_path)
        cfg["methods"][3].update(bad)
        with pytest.raises(ValueError, match=message):
            load_study(str(write(cfg, tmp_path)))
    cfg = tiny_study(tmp_path)
    cfg["claims"][0]["metric"] = "score_negative"  # not measured question by question
    with pytest.raises(ValueError, match="metric must be"):
        load_study(str(write(cfg, tmp_path)))


# ---- statistics and verdicts -----------------------------------------------------------------------------

def test_paired_difference_and_its_standard_error():
    # d = a - b = [1, 0, 0, 0]: mean 0.25; sd = sqrt(((0.75)^2 + 3 (0.25)^2) / 3) = 0.5; SE = 0.5 / sqrt(4) = 0.25
    found = paired_difference([1, 1, 0, 1], [0, 1, 0, 1])
    assert found["difference"] == pytest.approx(0.25) and found["se"] == pytest.approx(0.25)
    # a ratio over questions (assessment accuracy): ordered pairs 3 of 4 and 1 of 2 against 2 of 4 and 1 of 2:
    # diff = (1 + 0) / 6; residuals d - diff n = 1 - 4/6, 0 - 2/6; SE = sqrt(2 * (1/9 + 1/9)) / 6
    found = paired_difference([3, 1], [2, 1], [4, 2])
    assert found["difference"] == pytest.approx(1 / 6) and found["se"] == pytest.approx(math.sqrt(4 / 9) / 6)


def record(seed, **correct):
    """A seed file with per-question correctness ('1011...') of each method, every question of variant 'v'."""
    n = len(next(iter(correct.values())))
    return {"seed": seed, "test": {"questions": [f"q{i}" for i in range(n)], "variant": ["v"] * n},
            "methods": {name: {"correct": c, "ordered": [float(x) for x in c], "pairs": [1] * n}
                        for name, c in correct.items()}}


def test_judge_gives_each_verdict_by_the_two_se_rule():
    # 2 seeds x 50 questions. a beats b on 20 questions of 100 and loses none: d = 0.2, SE = sqrt(.2 .8 / 99) = 0.040
    records = [record(s, a="1" * 10 + "0" * 40, b="0" * 50, c="0" * 50,
                      d="1" * 3 + "0" * 47, e="1" * 25 + "0" * 25, f="0" * 25 + "1" * 25) for s in (0, 1)]
    held = judge({"text": "", "a": "a", "b": "b"}, records)
    assert held["verdict"] == "held" and held["difference"] == pytest.approx(0.2)
    assert held["se"] == pytest.approx(math.sqrt(0.2 * 0.8 / 99)) and held["per_seed"] == {"0": 0.2, "1": 0.2}
    assert judge({"text": "", "a": "a", "b": "b", "expect": "less"}, records)["verdict"] == "not held"
    assert judge({"text": "", "a": "b", "b": "a"}, records)["verdict"] == "not held"
    # d beats c on 6 of 100: 0.06 with SE sqrt(.06 .94 / 99) = 0.024: beyond 2 SE, held; under a 3-SE rule unclear
    assert judge({"text": "", "a": "d", "b": "c"}, records)["verdict"] == "held"
    assert judge({"text": "", "a": "d", "b": "c"}, records, standard_errors=3)["verdict"] == "unclear"
    # e and f have the same accuracy but disagree on every question: difference 0 with SE 0.1: unclear either way
    assert judge({"text": "", "a": "e", "b": "f"}, records)["verdict"] == "unclear"
    assert judge({"text": "", "a": "e", "b": "f", "expect": "less"}, records)["verdict"] == "unclear"
    # about equal within a tolerance: b and c agree everywhere (0 ± 0): held; a and b differ by 0.2 ± 0.04: not held;
    # e and f: 0 ± 0.1 reaches past a 0.05 tolerance: unclear
    assert judge({"text": "", "a": "b", "b": "c", "expect": "equal", "tolerance": 0.05}, records)["verdict"] == "held"
    assert judge({"text": "", "a": "a", "b": "b", "expect": "equal", "tolerance": 0.05}, records)["verdict"] == "not held"
    assert judge({"text": "", "a": "e", "b": "f", "expect": "equal", "tolerance": 0.05}, records)["verdict"] == "unclear"
    assert judge({"text": "", "a": "a", "b": "zzz"}, records)["verdict"] == "not run"
    # per variant and assessment accuracy read the same per-question data
    assert judge({"text": "", "a": "a", "b": "b", "metric": "accuracy:v"}, records)["difference"] == pytest.approx(0.2)
    assert judge({"text": "", "a": "a", "b": "b", "metric": "accuracy:w"}, records)["verdict"] == "not run"
    assert judge({"text": "", "a": "a", "b": "b", "metric": "assessment_accuracy"}, records)["verdict"] == "held"


def test_a_claim_against_a_fixed_value_is_judged_on_the_methods_own_standard_error():
    """'VFT mis-ranks its own COTs' compares one method's assessment accuracy with the paper's ~70%."""
    # ordered pairs per question 1 of 2 on 40 questions, 2 of 2 on 10 (2 seeds): 120 of 200 pairs = 0.6;
    # against 0.7: d_q = ordered - 0.7 n_q, residuals d_q - (-0.1) n_q = -0.2 (80 questions), +0.8 (20):
    # SE = sqrt(100 / 99 (80 x 0.04 + 20 x 0.64)) / 200 = sqrt(1600 / 99) / 200 = 0.0201
    rec = {"seed": 0, "test": {"questions": [f"q{i}" for i in range(50)], "variant": ["v"] * 50, "pairs": [2] * 50},
           "methods": {"vft": {"correct": "1" * 50, "ordered": [1.0] * 40 + [2.0] * 10}}}
    records = [rec, {**rec, "seed": 1}]
    found = judge({"text": "", "a": "vft", "b": 0.7, "expect": "less", "metric": "assessment_accuracy"}, records)
    assert found["difference"] == pytest.approx(-0.1) and found["se"] == pytest.approx(math.sqrt(1600 / 99) / 200)
    assert found["verdict"] == "held" and found["per_seed"] == {"0": pytest.approx(-0.1), "1": pytest.approx(-0.1)}
    assert judge({"text": "", "a": "vft", "b": 0.6, "expect": "equal", "tolerance": 0.05,
                  "metric": "assessment_accuracy"}, records)["verdict"] == "held"
    # accuracy: every question right, against 0.5: +0.5 with SE 0
    assert judge({"text": "", "a": "vft", "b": 0.5}, records)["difference"] == pytest.approx(0.5)


def test_a_claim_against_a_value_outside_0_1_is_refused(tmp_path):
    cfg = tiny_study(tmp_path)
    cfg["claims"] = [{"text": "VFT mis-ranks", "a": "vft", "b": 70, "metric": "assessment_accuracy"}]
    with pytest.raises(ValueError, match="fixed value in \\[0, 1\\]"):
        load_study(str(write(cfg, tmp_path)))


def test_mixture_task_has_both_variants():
    mix = load_task(TASK).load("test")
    assert {e["variant"] for e in mix} == {"shop", "mixed"}
    assert any("times as many" in e["question"] for e in mix)  # only the mixed variant multiplies
    with pytest.raises(ValueError, match="variant"):
        load_task("arithmetic:variant=shop+nope")


# ---- one seed end to end, and the report from seed files alone -------------------------------------------

def test_one_seed_writes_its_file_and_the_report_needs_nothing_else(tmp_path):
    cfg = tiny_study(tmp_path)
    path = write(cfg, tmp_path)
    assert main(["study", str(path), "--seed", "1"]) == 1  # seed 1 needs seed 0's sweep first
    assert main(["study", str(path), "--sweep"]) == 0
    assert json.loads((tmp_path / "out" / "seeds" / "sweep.json").read_text())["vft"]["epochs"]
    assert main(["study", str(path), "--seeds", "0"]) == 0
    run, out = tmp_path / "study", tmp_path / "out"
    assert not (run / "seed1").exists()
    seed0 = json.loads((out / "seeds" / "seed0.json").read_text())
    assert set(seed0["methods"]) == {"vft", "more", "aft", "aft_none"}
    assert set(seed0["chosen"]) == {"more", "aft"} and len(seed0["sweep"]) == 4
    assert not (run / "seed0" / "more").exists()  # tested at the sweep's model of the chosen point
    # per-question records agree with the metrics the evaluation wrote
    for name, m in seed0["methods"].items():
        metrics = json.loads((run / "seed0" / f"eval_{name}" / "eval.json").read_text())
        assert len(m["correct"]) == 12 and m["correct"].count("1") / 12 == pytest.approx(metrics["accuracy"])
        if metrics.get("assessment_accuracy") is not None:
            assert sum(m["ordered"]) / sum(seed0["test"]["pairs"]) == pytest.approx(metrics["assessment_accuracy"])
    assert seed0["methods"]["aft"]["train_tokens"] > 0 and len(seed0["methods"]["aft"]["ood_correct"]) == 12
    assert seed0["methods"]["more"]["train_tokens"] > 0 and "train_tokens" not in seed0["methods"]["vft"]
    assert [e["epoch"] for e in seed0["vft"]["epochs"]] == [1, 2]
    assert all(e["train_loss"] > 0 and 0 <= e["validation_accuracy"] <= 1 for e in seed0["vft"]["epochs"])
    assert seed0["seconds"] > 0 and seed0["versions"]["torch"] and seed0["machine"]["cpus"]
    assert seed0["curves"]["aft"] and seed0["scores"]["vft"]
    on_train = seed0["base_evaluations"]["vft_on_train"]
    assert on_train["split"] == "train" and 0 <= on_train["accuracy"] <= 1 and 0 <= on_train["assessment_accuracy"] <= 1
    # a second seed from another machine: here seed 0's file copied under seed 1 (its numbers are not the point)
    (out / "seeds" / "seed1.json").write_text(json.dumps({**seed0, "seed": 1, "sweep": []}))
    shutil.rmtree(run)  # no run folder: the report is rebuilt from the seed files alone
    for name in ("results.md", "study.json"):
        (out / name).unlink()
    assert main(["study", str(path), "--report"]) == 0
    summary = json.loads((out / "study.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["methods"]["aft"]["accuracy"]["n"] == 2
    claim = summary["claims"][0]
    assert claim["verdict"] in ("held", "not held", "unclear") and set(claim["per_seed"]) == {"0", "1"}
    page = (out / "results.md").read_text()
    assert "| AFT |" in page and "AFT beats VFT" in page and "± " in page and "(chosen)" in page
    assert "## VFT, epoch by epoch" in page and "mixed" in page
    assert re.search(r"The sweep ran as a unit of its own: \d+ minutes of stages on .+, \d+ CPUs", page)
    assert f"`vft_on_train` on seed 1 (train split): greedy accuracy {100 * on_train['accuracy']:.1f}%" in page
    for name in ("study_accuracy.png", "study_scores.png", "study_training.png"):
        assert (out / "figures" / name).stat().st_size > 0


def test_early_stopping_patience_counts_only_after_the_minimum_epochs():
    from types import SimpleNamespace

    from transformers import TrainerControl, TrainerState

    from aft.train import EarlyStopping

    args = SimpleNamespace(metric_for_best_model="accuracy", greater_is_better=True)
    callback, control = EarlyStopping(2, min_epochs=3), TrainerControl()
    state = TrainerState(best_metric=0.15)
    for epoch, accuracy in [(1, 0.10), (2, 0.12)]:  # an early dip (seed 2 of the old study): not counted
        state.epoch = epoch
        callback.on_evaluate(args, state, control, {"eval_accuracy": accuracy})
    assert not control.should_training_stop and callback.early_stopping_patience_counter == 0
    for epoch in (3, 4):
        state.epoch = epoch
        callback.on_evaluate(args, state, control, {"eval_accuracy": 0.1})
    assert control.should_training_stop
    assert type(callback)(**callback.state()["args"]).min_epochs == 3  # as a resumed Trainer rebuilds it


def test_iterative_and_grpo_methods_run_in_a_seed_and_report_their_cost(tmp_path):
    """Issue 12's methods inside a study: AFT over 3 rounds (round 1 on the shared groups, later rounds sampled
    from the last round's model on fresh questions) and GRPO at the same number of sampled completions; each method's
    completions sampled, optimizer steps and seconds reach the seed file and the page."""
    pytest.importorskip("trl")
    cfg = tiny_study(tmp_path)
    cfg.pop("curve"), cfg.pop("ood")
    cfg["seeds"] = [0]
    cfg["evaluation"]["vote_samples"] = 2
    cfg["methods"] = [
        {"name": "vft", "label": "VFT"},
        {"name": "aft", "label": "AFT", "loss": "aft", "constraint": "boundary", "tune": "lr_beta"},
        {"name": "aft3", "label": "AFT 3 rounds", "loss": "aft", "constraint": "boundary", "tune_as": "aft",
         "rounds": 3, "questions_per_round": 8, "sample": {"k": 3}},
        {"name": "grpo", "label": "GRPO", "stage": "grpo", "limit": 16, "num_generations": 3,
         "per_device_train_batch_size": 6, "sample_budget": 72, "beta": 0.0}]
    cfg["claims"] = [{"text": "iterating helps", "a": "aft3", "b": "aft"}]
    stages = method_stages(cfg, cfg["methods"][2], {"learning_rate": 1e-3, "beta": 0.05}, seed=0)
    by_name = {s["name"]: s for s in stages}
    assert "aft3/round1/samples" not in by_name and by_name["aft3/round1/align"]["groups"] == "labeled"
    assert by_name["aft3/round2/samples"]["model"] == "aft3/round1/align"
    # fresh questions past the 8 the shared samples took: [8, 16) in round 2, [16, 24) in round 3
    assert [by_name[f"aft3/round{r}/samples"]["offset"] for r in (2, 3)] == [8, 16]
    assert by_name["aft3/round2/align"]["model"] == "aft3/round1/align" and by_name["aft3/round2/align"]["beta"] == 0.05
    assert stages[-1] == {**cfg["evaluation"], "name": "eval_aft3", "stage": "eval", "model": "aft3/round3/align"}

    path = write(cfg, tmp_path)
    assert main(["study", str(path), "--seeds", "0"]) == 0
    seed0 = json.loads((tmp_path / "out" / "seeds" / "seed0.json").read_text())
    cost = {name: seed0["methods"][name]["cost"] for name in ("aft", "aft3", "grpo")}
    assert cost["aft"]["completions_sampled"] == 24                  # 8 shared questions x k 3
    assert cost["aft3"]["completions_sampled"] == 72                 # and 8 fresh ones x 3 in rounds 2 and 3
    assert cost["grpo"]["completions_sampled"] == 72                 # its budget, as counted by its reward
    assert cost["grpo"]["optimizer_steps"] == 12                     # 72 completions / 6 a step
    assert cost["aft3"]["optimizer_steps"] == 3 * cost["aft"]["optimizer_steps"] > 0  # three rounds of 8 groups
    assert all(c["seconds"] > 0 for c in cost.values())
    run = tmp_path / "study" / "seed0"
    rounds = [study_module._tokens(json.loads((run / f"aft3/round{r}/align/trainer_state.json").read_text()))
              for r in (1, 2, 3)]
    assert cost["aft3"]["completion_tokens"] == sum(rounds) > cost["aft"]["completion_tokens"] > 0
    assert seed0["methods"]["aft3"]["train_tokens"] == cost["aft3"]["completion_tokens"]
    assert 72 <= cost["grpo"]["completion_tokens"] <= 72 * cfg["defaults"]["max_new_tokens"]
    split = seed0["time_split"]
    assert set(split) == {"generation (sampling)", "evaluation (generation and scoring)", "training",
                          "training (GRPO, its sampling included)", "labelling", "other"}  # other: init
    assert sum(split.values()) == pytest.approx(seed0["seconds"], abs=0.5)
    assert seed0["methods"]["aft3"]["hyperparameters"]["learning_rate"] == seed0["chosen"]["aft"]["learning_rate"]
    assert 0 <= seed0["methods"]["grpo"]["vote_accuracy"] <= 1
    page = (tmp_path / "out" / "results.md").read_text()
    assert "## Cost" in page and f"| GRPO | 72 | {cost['grpo']['completion_tokens']:,} | 12 |" in page
    assert "maj@k" in page and "training (GRPO" in page


def test_shipped_iterative_study_config_expands():
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / "study-iterative.yaml"
    cfg = load_study(str(path))
    names = [s["name"] for s in sweep_stages(cfg)]
    assert len([n for n in names if not n.endswith("_eval")]) == 6  # 3 tuned methods x 2 points: an equal budget
    aft3 = method_stages(cfg, next(m for m in cfg["methods"] if m["name"] == "aft3"), {"learning_rate": 3e-4}, 0)
    samples = [s for s in aft3 if s["stage"] == "sample"]
    assert [(s["offset"], s["limit"], s["k"]) for s in samples] == [(500, 500, 8), (1000, 500, 8)]
    grpo = next(m for m in cfg["methods"] if m["name"] == "grpo")
    base = next(s for s in cfg["base"] if s["name"] == "samples")
    assert grpo["sample_budget"] == 3 * base["limit"] * base["k"]  # the 3-round methods' budget


def test_grpo_tokens_weight_each_logged_mean_length_by_the_steps_it_covers():
    # logs at steps 10 and 25 (TRL averages the steps since the last log): (10 x 20 + 15 x 40) / 25 = 32 tokens
    state = {"log_history": [{"step": 10, "completions/mean_length": 20.0}, {"step": 20, "loss": 0.1},
                             {"step": 25, "completions/mean_length": 40.0}, {"step": 30, "train_completion_tokens": 0}]}
    assert study_module._grpo_tokens(state, sampled=100) == 3200
    assert study_module._grpo_tokens({"log_history": []}, sampled=100) is None
    assert study_module._grpo_tokens(state, sampled=None) is None
