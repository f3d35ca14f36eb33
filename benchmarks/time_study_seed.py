"""How long one seed of a study config takes, from a small run of the same config: every stage at reduced size,
timed from its DONE file, then scaled linearly in its work (questions generated, groups trained, epochs).

    PYTHONPATH=src python benchmarks/time_study_seed.py configs/study.yaml [--run-dir /tmp/time_study]

The small run is one seed of the config with: VFT 1 epoch (scaled by the epoch budget), ``--groups`` sampled
training questions (every align stage trains on them: scaled by the real limit), ``--questions`` test
questions for every evaluation and test sample (scaled by the real test size) and ``--questions`` validation
questions for the sweep (scaled by its limit), each grid cut to its first point (scaled by the grid size).
The curve's stages train without evaluating; the real run's evaluations while training are added, each
counted as a whole test evaluation at the measured rate (an upper bound). It also checks the config end to end. Printed: each stage's measured
seconds, its scale factor and the estimate, the sweep seed's total and another seed's (no sweep).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
from pathlib import Path

from aft.study import load_study, run_seed, sweep_points

VFT = "vft"


def small_config(cfg: dict, run_dir: str, groups: int, questions: int) -> tuple[dict, dict]:
    """The reduced config and, per stage-name pattern, the factor from its work to the real one's."""
    small = copy.deepcopy(cfg)
    small["run_dir"] = run_dir
    small["outputs"] = {k: f"{run_dir}/out/{k}" for k in ("seeds", "figures")}
    small["outputs"].update(json=f"{run_dir}/out/study.json", markdown=f"{run_dir}/out/results.md")
    base = {s["name"]: s for s in small["base"]}
    epochs = base[VFT]["num_train_epochs"]
    base[VFT]["num_train_epochs"] = 1
    train_limit = base["samples"]["limit"]
    base["samples"]["limit"] = groups
    test_size = int(next(p.split("=")[1] for p in cfg["defaults"]["task"].split(",") if p.startswith("n_test")))
    base["test_samples"]["limit"] = questions
    small["evaluation"]["limit"] = questions
    val_limit = small["sweep"]["evaluation"]["limit"]
    small["sweep"]["evaluation"]["limit"] = questions
    grid_size = len(sweep_points(cfg, next(m for m in cfg["methods"] if m.get("tune"))))
    small["sweep"]["grids"] = {name: {k: v[:1] for k, v in grid.items()} for name, grid in small["sweep"]["grids"].items()}
    if small.get("ood"):
        small["ood"]["task"] = small["ood"]["task"].replace("n_test=1000", f"n_test={questions}")
    curve_evals = 0
    if small.get("curve"):  # trained without evaluating here; the real run's evaluations are added at the eval rate
        steps = math.ceil(train_limit / cfg["method_defaults"]["per_device_train_batch_size"])
        curve_evals = steps // small["curve"]["stage"]["eval_steps"]
        small["curve"]["stage"]["eval_steps"] = 10 ** 6
    factors = {"vft": epochs, "samples": train_limit / groups, "labeled": train_limit / groups,
               "ranked": train_limit / groups, "test_samples": test_size / questions,
               "test_labeled": test_size / questions, "eval": test_size / questions, "ood": test_size / questions,
               "sweep_train": grid_size * train_limit / groups, "sweep_eval": grid_size * val_limit / questions,
               "train": train_limit / groups, "grid_size": grid_size, "curve_evals": curve_evals}
    return small, factors


def factor(name: str, f: dict) -> float:
    if name.startswith("sweep_"):
        return f["sweep_eval"] if name.endswith("_eval") else f["sweep_train"]
    if name in f:
        return f[name]
    if name.startswith(("eval_", "ood_")):
        return f["eval"]
    return 1.0 if name == "init" else f["train"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--run-dir", default="/tmp/time_study")
    parser.add_argument("--groups", type=int, default=48)
    parser.add_argument("--questions", type=int, default=100)
    args = parser.parse_args(argv)
    cfg = load_study(args.config)
    small, f = small_config(cfg, args.run_dir, args.groups, args.questions)
    path = Path(args.run_dir) / "small.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    import yaml

    path.write_text(yaml.safe_dump(small, sort_keys=False))
    seed = small["sweep"]["seed"]
    record = run_seed(load_study(str(path)), seed)
    seconds = record["stage_seconds"]
    eval_rate = seconds[f"eval_{VFT}"] / args.questions  # seconds per test question (greedy + its 4 samples scored)
    curve = set(cfg.get("curve", {}).get("methods", []))
    estimate = {}
    print(f"{'stage':<24}{'measured s':>12}{'x':>8}{'estimate min':>14}")
    for name, s in seconds.items():
        est = s * factor(name, f)
        if name in curve:  # its evaluations while training, each at most a test evaluation's work (conservative)
            est += f["curve_evals"] * eval_rate * args.questions * f["eval"]
        estimate[name] = est
        print(f"{name:<24}{s:>12.1f}{factor(name, f):>8.1f}{est / 60:>14.1f}")
    sweep_seed_total = sum(estimate.values())
    # another seed: no sweep, and every tuned method trains (on the sweep seed it reused the sweep's model)
    align = [n for n in estimate if n.startswith("sweep_") and not n.endswith("_eval")]
    per_method_train = sum(estimate[n] for n in align) / max(1, len(align)) / f["grid_size"]
    tuned_not_curve = [m["name"] for m in cfg["methods"] if m.get("tune") and m["name"] not in curve]
    other = sum(v for n, v in estimate.items() if not n.startswith("sweep_")) + per_method_train * len(tuned_not_curve)
    load = os.getloadavg()
    print(json.dumps({"sweep_seed_minutes": round(sweep_seed_total / 60, 1), "other_seed_minutes": round(other / 60, 1),
                      "measured_minutes": round(sum(seconds.values()) / 60, 1), "load_average": load,
                      "cpus": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
