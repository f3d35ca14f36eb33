"""``aft study CONFIG.yaml``: the paper's comparison at small scale, over seeds, resumable, written up.

For every seed, one pipeline of ``aft run`` stages in ``RUN_DIR/seed{N}``:

- the ``base`` stages: a model from scratch, VFT trained to a plateau of validation accuracy (early
  stopping), k sampled COTs per training question labelled two ways (binary, step-verified ranking), and
  the VFT model's samples of the test questions (the fixed set for assessment accuracy);
- one training stage per ``method`` from the same VFT model and the same groups, then its evaluation on
  the test split (and, for the methods under ``ood``, on harder questions than trained on).

Before the seeds, the ``sweep`` trains one method at every point of a small grid on the first seed and
evaluates it on the *validation* split; the best point's values are used by every method that has those
fields. Every stage writes ``DONE``, so a second run continues where the first stopped. At the end every
``eval.json`` is gathered into ``study.json`` (per seed, mean and spread), the paper's claims listed in
the config are checked seed by seed, and ``results.md`` is written with its plots (drawn by the same
functions as ``aft report``)::

    aft study configs/study.yaml            # the committed study: docs/results.md
    aft study configs/study.yaml --report   # rewrite the report from the runs on disk, train nothing
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import statistics
import time
from dataclasses import fields
from pathlib import Path

import yaml

from aft.pipeline import run_config, stage_table

METRICS = ("accuracy", "assessment_accuracy", "score_positive", "score_negative")


# ---- expanding the config into pipeline stages ----------------------------------------------------------

def _fields_of(stage: str) -> set[str]:
    return {f.name for f in fields(stage_table()[stage][0])}


def _method_spec(cfg: dict, method: dict, chosen: dict | None = None) -> dict:
    """A method's training stage: its own keys over the sweep's chosen values over ``method_defaults``
    (only the keys its stage has)."""
    stage = method.get("stage", cfg.get("method_defaults", {}).get("stage", "align"))
    names = _fields_of(stage)
    return {**{k: v for k, v in {**cfg.get("method_defaults", {}), **(chosen or {})}.items() if k in names},
            **{k: v for k, v in method.items() if k != "label"}, "stage": stage}


def method_stages(cfg: dict, method: dict, chosen: dict, seed: int) -> list[dict]:
    """The training stage of one method (none for a base model) and its evaluation stages."""
    name = method["name"]
    stages = []
    if name not in {s["name"] for s in cfg["base"]}:
        spec = _method_spec(cfg, method, chosen)
        curve = cfg.get("curve", {})
        if name in curve.get("methods", []) and seed in curve.get("seeds", [seed]):
            spec.update({"eval_task": cfg.get("defaults", {}).get("task"), **curve.get("stage", {})})
        stages.append(spec)
    stages.append({**cfg["evaluation"], "name": f"eval_{name}", "stage": "eval", "model": name})
    ood = cfg.get("ood")
    if ood and name in ood["methods"]:
        stages.append({**cfg["evaluation"], "name": f"ood_{name}", "stage": "eval", "model": name,
                       "task": ood["task"], "groups": None})
    return stages


def sweep_points(cfg: dict) -> list[dict]:
    sweep = cfg.get("sweep") or {}
    grid = sweep.get("grid") or {}
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())]


def sweep_stages(cfg: dict) -> list[dict]:
    """Every grid point trains ``sweep.method`` and evaluates it on the validation split."""
    sweep = cfg["sweep"]
    method = next(m for m in cfg["methods"] if m["name"] == sweep["method"])
    stages = []
    for i, point in enumerate(sweep_points(cfg)):
        spec = {**_method_spec(cfg, method), **point, "name": f"sweep{i}"}
        stages.append(spec)
        stages.append({**cfg["evaluation"], **sweep.get("evaluation", {}), "name": f"sweep{i}_eval",
                       "stage": "eval", "model": spec["name"], "split": "validation", "groups": None})
    return stages


def seed_config(cfg: dict, seed: int, stages: list[dict]) -> dict:
    return {"run_dir": str(Path(cfg["run_dir"]) / f"seed{seed}"), "defaults": {**cfg.get("defaults", {}), "seed": seed},
            "stages": [dict(s) for s in cfg["base"]] + stages, "overwrite": cfg.get("overwrite", False)}


def choose(cfg: dict) -> tuple[dict, list[dict]]:
    """Run the sweep (first seed, validation split); the best point's values and every point's result."""
    if not cfg.get("sweep"):
        return {}, []
    seed = cfg["seeds"][0]
    run_dir = run_config(seed_config(cfg, seed, sweep_stages(cfg)))
    results = []
    for i, point in enumerate(sweep_points(cfg)):
        metrics = json.loads((run_dir / f"sweep{i}_eval" / "eval.json").read_text())
        results.append({**point, "validation_accuracy": metrics["accuracy"]})
    best = max(results, key=lambda r: r["validation_accuracy"])  # first of equals: the grid's order decides
    return {k: best[k] for k in cfg["sweep"]["grid"]}, results


def run_study(cfg: dict) -> dict:
    """Train and evaluate everything the config asks for (skipping what is done); returns the summary."""
    start = time.time()
    chosen, sweep = choose(cfg)
    for seed in cfg["seeds"]:
        stages = [s for m in cfg["methods"] for s in method_stages(cfg, m, chosen, seed)]
        run_config(seed_config(cfg, seed, stages))
    return summarize(cfg, chosen, sweep, minutes=(time.time() - start) / 60)


# ---- gathering and judging -------------------------------------------------------------------------------

def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def summarize(cfg: dict, chosen: dict, sweep: list[dict], minutes: float | None = None) -> dict:
    run_dir = Path(cfg["run_dir"])
    methods = {}
    for method in cfg["methods"]:
        name = method["name"]
        evals = {s: _read(run_dir / f"seed{s}" / f"eval_{name}" / "eval.json") for s in cfg["seeds"]}
        oods = {s: _read(run_dir / f"seed{s}" / f"ood_{name}" / "eval.json") for s in cfg["seeds"]}
        # every per-seed value under its seed, so claims pair seeds even when a stage is missing for one
        per_seed = {}
        for s, m in evals.items():
            if m:
                per_seed[str(s)] = {**{k: m.get(k) for k in METRICS},
                                    **{f"accuracy:{v}": a for v, a in m.get("accuracy_by_variant", {}).items()}}
                if oods[s]:
                    per_seed[str(s)]["ood_accuracy"] = oods[s]["accuracy"]
        entry = {"label": method.get("label", name), "seeds": [int(s) for s in per_seed]}
        for metric in METRICS:
            entry[metric] = spread([m.get(metric) for m in per_seed.values()])
        variants = sorted({k.split(":", 1)[1] for m in per_seed.values() for k in m if k.startswith("accuracy:")})
        entry["accuracy_by_variant"] = {v: spread([m.get(f"accuracy:{v}") for m in per_seed.values()]) for v in variants}
        if any("ood_accuracy" in m for m in per_seed.values()):
            entry["ood_accuracy"] = spread([m.get("ood_accuracy") for m in per_seed.values()])
        entry["per_seed"] = per_seed
        methods[name] = entry
    vft = {s: _read(run_dir / f"seed{s}" / "vft" / "trainer_state.json") for s in cfg["seeds"]}
    return {"config": cfg, "chosen": chosen, "sweep": sweep, "methods": methods,
            "vft_epochs": {str(s): st.get("epoch") for s, st in vft.items() if st},
            "vft_validation": {str(s): [h["eval_accuracy"] for h in st.get("log_history", []) if "eval_accuracy" in h]
                               for s, st in vft.items() if st},
            "claims": [judge(claim, methods) for claim in cfg.get("claims", [])],
            "minutes": None if minutes is None else round(minutes, 1)}


def _paired(methods: dict, a: str, b: str, metric: str) -> list[float]:
    """Per-seed differences a - b of one metric (``ood_accuracy`` and ``accuracy:VARIANT`` allowed)."""
    def per_seed(name):
        return {int(s): m[metric] for s, m in methods.get(name, {}).get("per_seed", {}).items()
                if m.get(metric) is not None}

    x, y = per_seed(a), per_seed(b)
    return [x[s] - y[s] for s in sorted(set(x) & set(y))]


def judge(claim: dict, methods: dict) -> dict:
    """Check one claim seed by seed. ``expect``: ``greater`` (a above b), ``less`` or ``equal`` (within
    ``tolerance``). Held: the mean difference goes the claimed way and every seed agrees; not held: the
    mean goes the other way (or, for ``equal``, is outside the tolerance); unclear: seeds disagree."""
    diffs = _paired(methods, claim["a"], claim["b"], claim.get("metric", "accuracy"))
    out = {**claim, "differences": diffs}
    if not diffs:
        return {**out, "verdict": "not run", "mean_difference": None}
    mean = statistics.fmean(diffs)
    expect = claim.get("expect", "greater")
    if expect == "equal":
        tol = claim.get("tolerance", 0.015)
        verdict = "held" if abs(mean) <= tol else "not held"
    else:
        sign = 1 if expect == "greater" else -1
        if sign * mean <= 0:
            verdict = "not held"
        else:
            verdict = "held" if all(sign * d > 0 for d in diffs) else "unclear (seeds disagree)"
    return {**out, "verdict": verdict, "mean_difference": mean}


# ---- writing it up ---------------------------------------------------------------------------------------

def _pct(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["n"] > 1 else f"{100 * s['mean']:.1f}"


def _num(s: dict | None) -> str:
    return "-" if not s or s.get("mean") is None else f"{s['mean']:.3f}"


def write_results(summary: dict, command: str) -> Path:
    cfg = summary["config"]
    out = cfg.get("outputs", {})
    md, js = Path(out.get("markdown", Path(cfg["run_dir"]) / "results.md")), out.get("json")
    figures = Path(out.get("figures", md.parent))
    figures.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    if js:
        Path(js).parent.mkdir(parents=True, exist_ok=True)
        Path(js).write_text(json.dumps(summary, indent=2) + "\n")
    methods = summary["methods"]
    images = plot_study(summary, figures)
    rel = lambda p: Path(p).resolve().relative_to(md.parent.resolve()).as_posix()  # noqa: E731
    seeds = cfg["seeds"]
    lines = [f"# {cfg.get('title', 'Study results')}", "",
             f"Written by `{command}` from its own runs ({len(seeds)} seeds: {seeds}"
             + (f"; {summary['minutes']} minutes" if summary.get("minutes") else "")
             + f"; {platform.machine()}, Python {platform.python_version()}). "
             "Rerunning the command reproduces it within seed noise; the numbers are also in "
             f"`{js}`.", ""]
    if cfg.get("description"):
        lines += [cfg["description"].strip(), ""]
    if summary["sweep"]:
        lines += ["## Hyper-parameters chosen on the validation split", "",
                  f"`{cfg['sweep']['method']}` trained at each point on seed {seeds[0]}, greedy accuracy on "
                  "validation questions; the best point is used by every method that has the field.", "",
                  "| " + " | ".join(list(cfg["sweep"]["grid"]) + ["validation accuracy"]) + " |",
                  "|---" * (len(cfg["sweep"]["grid"]) + 1) + "|"]
        for r in summary["sweep"]:
            mark = " **(chosen)**" if all(r[k] == summary["chosen"][k] for k in summary["chosen"]) else ""
            lines.append("| " + " | ".join(str(r[k]) for k in cfg["sweep"]["grid"])
                         + f" | {100 * r['validation_accuracy']:.1f}{mark} |")
        lines.append("")
    if summary.get("vft_epochs"):
        lines += ["VFT: epochs trained (early stopping on validation accuracy, or the epoch budget) and validation "
                  "accuracy (%) after each epoch, per seed; the model kept is the best epoch's:", ""]
        lines += [f"- seed {s}: {e:g} epochs: " + ", ".join(f"{100 * a:.1f}" for a in summary.get("vft_validation", {})
                                                           .get(s, [])) for s, e in summary["vft_epochs"].items()]
        lines.append("")
    lines += ["## Test results", "",
              "Accuracy: greedy decoding on the test split, % (mean ± standard deviation over seeds). A-accuracy: share "
              "of (right, wrong) pairs of the VFT model's own test samples that the model orders correctly. "
              "Score +/-: mean length-normalised log-likelihood of right/wrong test samples.", "",
              "| method | accuracy | A-accuracy | score + | score - | accuracy per seed |", "|---|---|---|---|---|---|"]
    for name, m in methods.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in m["accuracy"].get("values", []))
        lines.append(f"| {m['label']} | {_pct(m['accuracy'])} | {_pct(m['assessment_accuracy'])} | "
                     f"{_num(m['score_positive'])} | {_num(m['score_negative'])} | {per_seed} |")
    variants = sorted({v for m in methods.values() for v in m.get("accuracy_by_variant", {})})
    with_ood = [n for n, m in methods.items() if "ood_accuracy" in m]
    if variants or with_ood:
        lines += ["", "## Multi-task and out-of-distribution", "",
                  "Trained on a mixture of task variants: accuracy per variant on the test split"
                  + (f"; out of distribution: `{cfg['ood']['task']}` (test split)." if with_ood else "."), "",
                  "| method | " + " | ".join(variants + (["out of distribution"] if with_ood else [])) + " |",
                  "|---" * (len(variants) + 1 + bool(with_ood)) + "|"]
        for name in (with_ood or methods):
            m = methods[name]
            cells = [_pct(m["accuracy_by_variant"].get(v)) for v in variants]
            lines.append(f"| {m['label']} | " + " | ".join(cells + ([_pct(m.get("ood_accuracy"))] if with_ood else []))
                         + " |")
    sens = cfg.get("sensitivity")
    if sens:
        key = sens["field"]
        lines += ["", f"## Sensitivity to {key}", "", f"The same method at several values of `{key}` (test split).", "",
                  f"| {key} | accuracy | A-accuracy | score + | score - |", "|---|---|---|---|---|"]
        for name in sens["methods"]:
            method = next(m for m in cfg["methods"] if m["name"] == name)
            m = methods[name]
            lines.append(f"| {_method_spec(cfg, method, summary['chosen']).get(key)} | {_pct(m['accuracy'])} | "
                         f"{_pct(m['assessment_accuracy'])} | {_num(m['score_positive'])} | {_num(m['score_negative'])} |")
    if summary["claims"]:
        lines += ["", "## The paper's claims, checked here", "",
                  "Difference = first minus second, in points, mean over seeds (per seed in brackets). Held: the "
                  "mean goes the claimed way and every seed agrees.", "",
                  "| claim | paper | compared | difference | verdict |", "|---|---|---|---|---|"]
        for c in summary["claims"]:
            metric = c.get("metric", "accuracy")
            diff = "-" if c["mean_difference"] is None else (
                f"{100 * c['mean_difference']:+.1f} ({', '.join(f'{100 * d:+.1f}' for d in c['differences'])})"
                if "score" not in metric else f"{c['mean_difference']:+.3f}")
            lines.append(f"| {c['text']} | {c.get('paper', '')} | {methods.get(c['a'], {}).get('label', c['a'])} vs "
                         f"{methods.get(c['b'], {}).get('label', c['b'])} ({metric}) | {diff} | {c['verdict']} |")
    lines += ["", "## Figures", ""] + [f"![{title}]({rel(path)})\n\n{text}\n" for title, path, text in images]
    if cfg.get("discussion"):
        lines += ["## Discussion", "", cfg["discussion"].strip(), ""]
    md.write_text("\n".join(lines) + "\n")
    print(f"study: {md}" + (f", {js}" if js else ""))
    return md


def plot_study(summary: dict, figures: Path) -> list[tuple[str, Path, str]]:
    """The study's figures, drawn by ``aft report``'s plotting functions; (title, path, caption) each."""
    from aft.report import collect, plot_accuracy, plot_scores, plot_training

    cfg, methods = summary["config"], summary["methods"]
    images = []
    means = {m["label"]: {"accuracy": m["accuracy"]["mean"], "assessment_accuracy": m["assessment_accuracy"]["mean"]}
             for m in methods.values() if m["accuracy"]["mean"] is not None}
    errors = {m["label"]: {"accuracy": m["accuracy"]["std"], "assessment_accuracy": m["assessment_accuracy"]["std"]}
              for m in methods.values() if m["accuracy"]["mean"] is not None}
    if means:
        plot_accuracy(means, figures / "study_accuracy.png", errors=errors)
        images.append(("accuracy", figures / "study_accuracy.png",
                       "Test accuracy and assessment accuracy per method (mean over seeds, bars: standard deviation)."))
    seed_dir = Path(cfg["run_dir"]) / f"seed{cfg['seeds'][0]}"
    plots = cfg.get("plots", {})
    _, scores, training = collect(seed_dir)
    chosen = {methods[n]["label"]: scores[f"eval_{n}"] for n in plots.get("scores", []) if f"eval_{n}" in scores}
    if chosen:
        plot_scores(chosen, figures / "study_scores.png")
        images.append(("scores", figures / "study_scores.png",
                       f"Scores of right and wrong test COTs (sampled by the VFT model) under each model, seed "
                       f"{cfg['seeds'][0]}."))
    curves = {methods[n]["label"]: training[n] for n in cfg.get("curve", {}).get("methods", []) if n in training}
    if curves:
        plot_training(curves, figures / "study_training.png")
        images.append(("training", figures / "study_training.png",
                       f"Alignment with and without the constraint, seed {cfg['seeds'][0]}: mean scores of positives "
                       "(solid) and negatives (dashed) in the training batches, training pair accuracy, loss, and "
                       "held-out accuracy and assessment accuracy against step (a collapse shows here)."))
    return images


# ---- command line ----------------------------------------------------------------------------------------

def load_study(path: str) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for key in ("run_dir", "seeds", "base", "methods", "evaluation"):
        if key not in cfg:
            raise ValueError(f"{path}: a study config needs '{key}'")
    names = [m["name"] for m in cfg["methods"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: method names must be unique")
    if cfg.get("sweep") and cfg["sweep"].get("method") not in names:
        raise ValueError(f"{path}: sweep.method must be one of the methods {names}")
    for name in (cfg.get("sensitivity") or {}).get("methods", []):
        if name not in names:
            raise ValueError(f"{path}: sensitivity lists unknown method {name!r}")
    for claim in cfg.get("claims", []):
        if claim["a"] not in names or claim["b"] not in names:
            raise ValueError(f"{path}: claim {claim['text']!r} compares unknown methods")
    return cfg


def study(config_path: str, report_only: bool = False, command: str | None = None, overwrite: bool = False) -> dict:
    cfg = {**load_study(config_path), "overwrite": overwrite}  # rerun stages whose settings changed
    if report_only:
        js = cfg.get("outputs", {}).get("json")
        previous = _read(Path(js)) if js else None
        chosen, sweep = (previous["chosen"], previous["sweep"]) if previous else ({}, [])
        summary = summarize(cfg, chosen, sweep, minutes=previous.get("minutes") if previous else None)
    else:
        summary = run_study(cfg)
    write_results(summary, command or f"aft study {config_path}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aft study", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="Study config (YAML), e.g. configs/study.yaml.")
    parser.add_argument("--report", action="store_true", help="Only rewrite the report from the runs on disk.")
    parser.add_argument("--overwrite", action="store_true", help="Run again the stages whose settings changed.")
    args = parser.parse_args(argv)
    # errors: one line from aft.cli.main
    study(args.config, args.report, command=f"aft study {args.config}", overwrite=args.overwrite)
    return 0
