"""``aft demo``: the whole AFT pipeline, offline, on CPU, in minutes, and a table of what AFT changed.

It builds a tokenizer and a small Llama from scratch, fine-tunes it on the built-in arithmetic task
(VFT), samples and labels k solutions per training question, aligns with AFT (boundary constraint), and
evaluates against two controls on the same test questions: the VFT model itself, and the VFT model
trained further with plain SFT for as many epochs as AFT gets (so "more training" is not mistaken for
"alignment"). Assessment accuracy is measured on solutions the VFT model sampled for the test
questions, the same set for every model. The settings live in ``aft/configs/demo.yaml``; ``aft run``
runs the same file, and a second ``aft demo`` continues a stopped run.

    aft demo [--run-dir runs/demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import time
from importlib.resources import files
from pathlib import Path

import yaml

from aft.pipeline import run_config

ROWS = [("vft", "eval_vft", "VFT (start)"), ("vft_more", "eval_vft_more", "VFT + more SFT (control)"),
        ("aft", "eval_aft", "AFT (boundary)")]
COLUMNS = [("accuracy", "accuracy", "{:.1%}"), ("assessment_accuracy", "A-accuracy", "{:.1%}"),
           ("score_positive", "score +", "{:.3f}"), ("score_negative", "score -", "{:.3f}")]


def demo_config(run_dir: str, quick: bool = False) -> dict:
    cfg = yaml.safe_load(files("aft").joinpath("configs/demo.yaml").read_text())
    cfg["run_dir"] = run_dir
    if quick:  # a seconds-long smoke run of the same stages (tests use it)
        cfg["defaults"].update(cfg.pop("quick"))
        for spec in cfg["stages"]:
            for key, value in cfg.get("quick_stage", {}).get(spec["stage"], {}).items():
                spec[key] = value
    cfg.pop("quick", None)
    cfg.pop("quick_stage", None)
    return cfg


def _correct(run_dir: Path, eval_name: str) -> dict:
    path = run_dir / eval_name / "predictions.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return {r["id"]: float(r["correct"]) for r in rows}


def results_table(run_dir: Path) -> tuple[dict, str]:
    """Each model's metrics and, against VFT, its paired accuracy difference on the same test questions ± its
    standard error (``vs_vft``): what separates a real change from test noise."""
    from aft.study import paired_difference

    results = {}
    start = _correct(run_dir, ROWS[0][1])
    for _, eval_name, label in ROWS:
        path = run_dir / eval_name / "eval.json"
        if path.exists():
            results[label] = json.loads(path.read_text())
            if eval_name != ROWS[0][1] and start:
                correct = _correct(run_dir, eval_name)
                ids = [q for q in start if q in correct]
                results[label]["vs_vft"] = paired_difference([correct[q] for q in ids], [start[q] for q in ids])
    header = f"{'model':<26}" + "".join(f"{title:>12}" for _, title, _ in COLUMNS) + f"{'vs VFT ± SE':>16}"
    lines = [header, "-" * len(header)]
    for label, m in results.items():
        cells = "".join(f"{fmt.format(m[key]) if m.get(key) is not None else '-':>12}" for key, _, fmt in COLUMNS)
        diff = m.get("vs_vft", {})
        versus = f"{100 * diff['difference']:+.1f} ± {100 * diff['se']:.1f}" if diff.get("difference") is not None else "-"
        lines.append(f"{label:<26}{cells}{versus:>16}")
    return results, "\n".join(lines)


def demo(run_dir: str = "runs/demo", quick: bool = False, overwrite: bool = False) -> dict:
    start = time.time()
    cfg = demo_config(run_dir, quick)
    out = run_config(cfg, overwrite)
    results, table = results_table(out)
    minutes = (time.time() - start) / 60
    summary = {"results": results, "minutes": round(minutes, 2), "config": cfg}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n" + table)
    print(f"\naccuracy: greedy on {next(iter(results.values()))['questions']} test questions; A-accuracy: "
          "share of (right, wrong) pairs of the VFT model's own test samples that the model scores in the "
          "right order; score +/-: mean length-normalised log-likelihood of right/wrong samples; vs VFT: "
          "accuracy difference from VFT on the same questions, in points, ± its standard error (a difference "
          "within 2 SE of 0 is noise).")
    print(f"{minutes:.1f} minutes; results in {out / 'results.json'}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aft demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", default="runs/demo", help="Run directory (continued if it exists).")
    parser.add_argument("--quick", action="store_true", help="A seconds-long smoke run of the same stages.")
    parser.add_argument("--overwrite", action="store_true", help="Run again the stages whose settings changed.")
    args = parser.parse_args(argv)
    demo(args.run_dir, args.quick, args.overwrite)
    return 0
