"""How long one seed of a study config takes on this machine, from one small piece of each kind of stage.

    PYTHONPATH=src python benchmarks/time_study_seed.py configs/study.yaml [--vft runs/study/seed0/vft]

It runs, on one thread, and times in *CPU seconds of this process* (``time.process_time``: what the work
costs, whatever else the machine is doing; on an idle 2-core machine the same work takes at most that long,
less where torch's two threads overlap): VFT steps, sampling, one SFT control, one AFT and one DPO training
(DPO also computes its reference log-probs), a validation, a test (greedy + assessment) and an
out-of-distribution evaluation, each at reduced size from the config's own stages. Each piece is scaled
linearly to its real size (questions, groups, steps) and multiplied by how many of its kind the config
runs on the sweep's seed and on any other seed. VFT is timed over ``--vft_steps`` steps; ``--vft`` gives a
trained VFT model for the pieces after it (else the few-step model is used, whose answers may run longer:
generation cost depends on their length).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

import aft.pipeline as pipeline
from aft.study import _method_spec, load_study, sweep_points


def _task_size(task: str, key: str) -> int:
    return int(next(p.split("=")[1] for p in task.split(":", 1)[1].split(",") if p.startswith(key)))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", default="/tmp/time_study_pieces")
    parser.add_argument("--vft", default=None, help="A trained VFT model to sample and align from.")
    parser.add_argument("--vft_steps", type=int, default=20)
    parser.add_argument("--groups", type=int, default=32, help="Training questions sampled, groups aligned.")
    parser.add_argument("--questions", type=int, default=64, help="Questions per evaluation piece.")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pipeline.time = SimpleNamespace(time=time.process_time, sleep=time.sleep)  # DONE files record CPU seconds
    cfg = load_study(args.config)
    base = {s["name"]: copy.deepcopy(s) for s in cfg["base"]}
    methods = {m["name"]: m for m in cfg["methods"]}
    first = lambda name: {**_method_spec(cfg, methods[name]), **sweep_points(cfg, methods[name])[0]}  # noqa: E731
    task = cfg["defaults"]["task"]
    vft = args.vft or "vft"
    stages = [base["init"], {**base["vft"], "max_steps": args.vft_steps, "eval_strategy": "no"}]
    stages += [
        {**base["samples"], "model": vft, "limit": args.groups},
        {**base["labeled"]},
        {**base["test_samples"], "model": vft, "limit": args.questions},
        {**base["test_labeled"]},
        {**first("vft_more"), "name": "sft_control", "model": vft, "limit": args.groups},
        {**first("aft"), "name": "align_aft", "model": vft, "groups": "labeled"},
        {**first("dpo"), "name": "align_dpo", "model": vft, "groups": "labeled"},
        {**cfg["evaluation"], "name": "validation_eval", "stage": "eval", "model": vft, "split": "validation",
         "groups": None, "limit": args.questions},
        {**cfg["evaluation"], "name": "test_eval", "stage": "eval", "model": vft, "limit": args.questions},
        {**cfg["evaluation"], "name": "ood_eval", "stage": "eval", "model": vft, "task": cfg["ood"]["task"],
         "groups": None, "limit": args.questions},
    ]
    run = pipeline.run_config({"run_dir": args.run_dir, "defaults": {**cfg["defaults"], "seed": 0}, "stages": stages})
    cpu = {p.parent.name: json.loads(p.read_text())["seconds"] for p in Path(run).glob("*/DONE")}

    # real sizes
    n_train = _task_size(task, "n_train")
    batch = cfg["base"][1].get("per_device_train_batch_size", cfg["defaults"]["per_device_train_batch_size"])
    epochs, vft_val = base["vft"]["num_train_epochs"], base["vft"].get("eval_limit", 0)
    train_limit, test_size = base["samples"]["limit"], _task_size(task, "n_test")
    val_limit = cfg["sweep"]["evaluation"]["limit"]
    ood_size = _task_size(cfg["ood"]["task"], "n_test")
    per_val_q = cpu["validation_eval"] / args.questions
    unit = {  # CPU seconds of one real stage of each kind
        "vft": epochs * (math.ceil(n_train / batch) / args.vft_steps * cpu["vft"] + vft_val * per_val_q),
        "samples": cpu["samples"] * train_limit / args.groups,
        "test_samples": cpu["test_samples"] * test_size / args.questions,
        "sft": cpu["sft_control"] * train_limit / args.groups,
        "align": cpu["align_aft"] * train_limit / args.groups,
        "align_dpo": cpu["align_dpo"] * train_limit / args.groups,
        "validation_eval": per_val_q * val_limit,
        "test_eval": cpu["test_eval"] * test_size / args.questions,
        "ood_eval": cpu["ood_eval"] * ood_size / args.questions,
    }
    steps = math.ceil(train_limit / cfg["method_defaults"]["per_device_train_batch_size"])
    curve = cfg.get("curve", {})
    curve_evals = steps // curve["stage"]["eval_steps"] if curve else 0
    # each evaluation while training: validation questions + the test samples scored (as a test evaluation)
    unit["curve_extra"] = curve_evals * (unit["validation_eval"] + unit["test_eval"])
    trained = [m for m in cfg["methods"] if m["name"] not in base]
    kind = lambda m: "sft" if m.get("stage") == "sft" else "align_dpo" if m.get("loss") == "dpo" else "align"  # noqa: E731
    tuned = [m for m in trained if m.get("tune")]
    points = len(sweep_points(cfg, tuned[0])) if tuned else 0
    on_curve = [m for m in trained if m["name"] in curve.get("methods", [])]
    common = unit["vft"] + unit["samples"] + unit["test_samples"] + unit["test_eval"] * len(cfg["methods"]) \
        + unit["ood_eval"] * len(cfg.get("ood", {}).get("methods", []))
    sweep_seed = common + sum(points * (unit[kind(m)] + unit["validation_eval"]) for m in tuned) \
        + sum(unit[kind(m)] + unit["curve_extra"] for m in on_curve) \
        + sum(unit[kind(m)] for m in trained if not m.get("tune") and m not in on_curve)
    other_seed = common + sum(unit[kind(m)] for m in trained)
    print(json.dumps({"measured_cpu_seconds": cpu, "cpu_seconds_per_real_stage": {k: round(v, 1) for k, v in unit.items()},
                      "sweep_seed_minutes": round(sweep_seed / 60, 1), "other_seed_minutes": round(other_seed / 60, 1),
                      "trainings": {"sweep_seed": points * len(tuned) + len(on_curve), "other_seed": len(trained)}},
                     indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
