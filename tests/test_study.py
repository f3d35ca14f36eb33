"""aft study: config expansion, the claim check, held-out evaluation while training, and a tiny end-to-end run."""

import json

import pytest
import yaml

from aft.cli import main
from aft.study import judge, load_study, method_stages, summarize
from aft.tasks import load_task

TASK = "arithmetic:variant=shop+mixed,min_steps=1,max_steps=1,max_value=5,n_train=48,n_val=8,n_test=12"


def tiny_study(tmp_path) -> dict:
    return {
        "run_dir": str(tmp_path / "study"), "seeds": [0, 1],
        "outputs": {"json": str(tmp_path / "out" / "study.json"), "markdown": str(tmp_path / "out" / "results.md"),
                    "figures": str(tmp_path / "out" / "figures")},
        "defaults": {"task": TASK, "per_device_train_batch_size": 8, "max_length": 96, "max_new_tokens": 16,
                     "eval_max_new_tokens": 16, "logging_steps": 1},
        "base": [
            {"name": "init", "stage": "init", "size": "test", "vocab_size": 300},
            {"name": "vft", "stage": "sft", "model": "init", "num_train_epochs": 3, "learning_rate": 3e-3,
             "eval_strategy": "epoch", "early_stopping_patience": 1, "eval_limit": 8},
            {"name": "samples", "stage": "sample", "model": "vft", "limit": 8, "k": 3},
            {"name": "labeled", "stage": "label", "groups": "samples"},
            {"name": "test_samples", "stage": "sample", "model": "vft", "split": "test", "k": 2},
            {"name": "test_labeled", "stage": "label", "groups": "test_samples"},
        ],
        "evaluation": {"split": "test", "groups": "test_labeled"},
        "method_defaults": {"stage": "align", "model": "vft", "groups": "labeled", "per_device_train_batch_size": 4},
        "sweep": {"method": "aft", "grid": {"learning_rate": [1e-4, 1e-3]}},
        "methods": [{"name": "vft", "label": "VFT"}, {"name": "more", "stage": "sft", "limit": 8},
                    {"name": "aft", "label": "AFT", "loss": "aft", "constraint": "boundary"}, {"name": "aft_none", "constraint": "none"}],
        "curve": {"methods": ["aft"], "seeds": [0], "stage": {"eval_strategy": "steps", "eval_steps": 1,
                                                              "eval_limit": 4, "eval_groups": "test_labeled"}},
        "ood": {"task": TASK.replace("min_steps=1,max_steps=1", "min_steps=2,max_steps=2"), "methods": ["vft", "aft"]},
        "plots": {"scores": ["vft", "aft"]},
        "sensitivity": {"field": "constraint", "methods": ["aft", "aft_none"]},
        "claims": [{"text": "AFT beats VFT", "a": "aft", "b": "vft"},
                   {"text": "mixed variant", "a": "aft", "b": "vft", "metric": "accuracy:mixed"}],
    }


def test_method_stages_take_defaults_of_their_own_stage_and_the_chosen_values(tmp_path):
    cfg = tiny_study(tmp_path)
    more = method_stages(cfg, cfg["methods"][1], {"learning_rate": 5e-4, "align_weight": 2.0}, seed=1)
    assert more[0] == {"model": "vft", "per_device_train_batch_size": 4, "name": "more", "stage": "sft", "limit": 8,
                       "learning_rate": 5e-4}  # no 'groups' / 'align_weight': sft has no such fields
    aft0 = method_stages(cfg, cfg["methods"][2], {}, seed=0)
    assert aft0[0]["eval_strategy"] == "steps" and aft0[0]["eval_task"] == TASK  # the curve, first seed only
    assert "eval_strategy" not in method_stages(cfg, cfg["methods"][2], {}, seed=1)[0]
    assert [s["name"] for s in aft0] == ["aft", "eval_aft", "ood_aft"] and aft0[2]["groups"] is None
    assert [s["name"] for s in method_stages(cfg, cfg["methods"][0], {}, seed=0)] == ["eval_vft", "ood_vft"]


def test_judge_checks_each_seed():
    methods = {n: {"per_seed": {str(s): {"accuracy": v} for s, v in enumerate(vals)}}
               for n, vals in {"a": [0.5, 0.6, 0.7], "b": [0.4, 0.5, 0.6], "c": [0.45, 0.7, 0.71]}.items()}
    held = judge({"text": "", "a": "a", "b": "b"}, methods)
    assert held["verdict"] == "held" and held["mean_difference"] == pytest.approx(0.1)
    assert judge({"text": "", "a": "a", "b": "b", "expect": "less"}, methods)["verdict"] == "not held"
    assert judge({"text": "", "a": "c", "b": "a"}, methods)["verdict"].startswith("unclear")  # -.05, +.1, +.01
    assert judge({"text": "", "a": "c", "b": "a", "expect": "equal"}, methods)["verdict"] == "not held"  # +.02
    assert judge({"text": "", "a": "c", "b": "a", "expect": "equal", "tolerance": 0.03}, methods)["verdict"] == "held"
    assert judge({"text": "", "a": "a", "b": "zzz"}, methods)["verdict"] == "not run"


def test_bad_study_config_is_refused(tmp_path):
    cfg = tiny_study(tmp_path)
    cfg["claims"].append({"text": "x", "a": "aft", "b": "nope"})
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(ValueError, match="unknown methods"):
        load_study(str(path))
    assert main(["study", str(path)]) == 1


def test_mixture_task_has_both_variants():
    mix = load_task(TASK).load("test")
    assert {e["variant"] for e in mix} == {"shop", "mixed"}
    assert any("times as many" in e["question"] for e in mix)  # only the mixed variant multiplies
    with pytest.raises(ValueError, match="variant"):
        load_task("arithmetic:variant=shop+nope")


def test_study_end_to_end_resumes_and_reports(tmp_path):
    cfg = tiny_study(tmp_path)
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["study", str(path)]) == 0
    out = tmp_path / "out"
    summary = json.loads((out / "study.json").read_text())
    assert summary["chosen"]["learning_rate"] in (1e-4, 1e-3) and len(summary["sweep"]) == 2
    run = tmp_path / "study"
    assert (run / "seed0" / "sweep1_eval" / "eval.json").exists() and not (run / "seed1" / "sweep0").exists()
    for name in ("vft", "more", "aft", "aft_none"):
        assert summary["methods"][name]["accuracy"]["n"] == 2  # both seeds evaluated
    eval_aft = json.loads((run / "seed0" / "eval_aft" / "eval.json").read_text())
    assert set(eval_aft["accuracy_by_variant"]) == {"shop", "mixed"}
    assert summary["methods"]["aft"]["ood_accuracy"]["n"] == 2
    # VFT evaluated its validation accuracy every epoch; the curve stage every step, with A-accuracy
    vft_log = json.loads((run / "seed0" / "vft" / "trainer_state.json").read_text())["log_history"]
    assert sum("eval_accuracy" in h for h in vft_log) >= 2
    curve = json.loads((run / "seed0" / "aft" / "trainer_state.json").read_text())["log_history"]
    # A-accuracy measured on the held-out groups at each evaluation; its value exists only when the tiny
    # model's samples happen to hold a (right, wrong) pair, which depends on the sampler's draws
    evals = [h for h in curve if "eval_accuracy" in h]
    assert len(evals) >= 2 and all("eval_pairs" in h and "eval_score_negative" in h for h in evals)
    assert [c["verdict"] for c in summary["claims"]][0] in ("held", "not held", "unclear (seeds disagree)")
    page = (out / "results.md").read_text()
    assert "| AFT |" in page and "AFT beats VFT" in page and "mixed" in page
    assert "## Sensitivity to constraint" in page and "| none |" in page and "| boundary |" in page
    for name in ("study_accuracy.png", "study_scores.png", "study_training.png"):
        assert (out / "figures" / name).stat().st_size > 0
    # a second run trains nothing (every stage DONE) and --report rewrites the page from disk
    (out / "results.md").unlink()
    done = sorted(p.stat().st_mtime for p in run.glob("seed*/*/DONE"))
    assert main(["study", str(path), "--report"]) == 0 and (out / "results.md").exists()
    assert main(["study", str(path)]) == 0
    assert sorted(p.stat().st_mtime for p in run.glob("seed*/*/DONE")) == done
