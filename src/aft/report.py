"""``aft report RUN_DIR``: pictures and a markdown page of a run directory, for any user's own run.

It reads what the stages wrote: every ``*/eval.json`` (metrics) with its ``scores.jsonl`` (each sampled
COT's score under that model, with its label), and every training stage's ``trainer_state.json`` (the
logged loss parts, mean positive/negative scores and pair accuracy). It writes into ``RUN_DIR/report``:

- ``scores.png``: the distribution of the model's scores of right and wrong COTs, one panel per model;
- ``accuracy.png``: accuracy and assessment accuracy per evaluated model;
- ``training.png``: positive/negative scores, pair accuracy and loss against step, per training stage, and
  held-out accuracy and assessment accuracy where the stage evaluated while training (``--eval_strategy``);
- ``report.md``: the table and the pictures.

    aft report runs/demo [--output DIR]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

METRICS = [("accuracy", "accuracy", "{:.1%}"), ("vote_accuracy", "vote acc.", "{:.1%}"),
           ("assessment_accuracy", "A-accuracy", "{:.1%}"), ("score_positive", "score +", "{:.3f}"),
           ("score_negative", "score -", "{:.3f}")]


def collect(run_dir: Path):
    evals = {p.parent.name: json.loads(p.read_text()) for p in sorted(run_dir.glob("*/eval.json"))}
    scores = {}
    for name in evals:
        path = run_dir / name / "scores.jsonl"
        if path.exists():
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            scores[name] = [r for r in rows if r["score"] is not None]
    training = {}
    for path in sorted(run_dir.glob("*/trainer_state.json")):
        history = json.loads(path.read_text()).get("log_history", [])
        if any("pair_accuracy" in h or "loss" in h for h in history):
            training[path.parent.name] = history
    return evals, scores, training


def markdown_table(evals: dict) -> str:
    shown = [m for m in METRICS if any(e.get(m[0]) is not None for e in evals.values())]
    lines = ["| model | " + " | ".join(title for _, title, _ in shown) + " |",
             "|---" * (len(shown) + 1) + "|"]
    for name, e in evals.items():
        cells = [fmt.format(e[key]) if e.get(key) is not None else "-" for key, _, fmt in shown]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_scores(scores: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(scores), figsize=(4 * len(scores), 3.2), sharey=True, squeeze=False)
    for ax, (name, rows) in zip(axes[0], scores.items()):
        right = [r["score"] for r in rows if r["correct"]]
        wrong = [r["score"] for r in rows if not r["correct"]]
        lo = min(right + wrong, default=-1.0)
        bins = [lo + (0 - lo) * i / 30 for i in range(31)]
        for values, name_, color in ((wrong, "wrong", "tab:red"), (right, "right", "tab:green")):
            if values:  # an empty set has no density
                ax.hist(values, bins=bins, alpha=0.6, label=f"{name_} ({len(values)})", color=color, density=True)
        ax.set_title(name)
        ax.set_xlabel("score (mean token log-prob)")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("density")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_accuracy(evals: dict, path: Path, errors: dict | None = None):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(evals)
    fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(names)), 3.2))
    width = 0.38
    for offset, key, label in ((-width / 2, "accuracy", "accuracy"),
                               (width / 2, "assessment_accuracy", "assessment accuracy")):
        values = [evals[n].get(key) or 0.0 for n in names]
        spread = [(errors or {}).get(n, {}).get(key) or 0.0 for n in names] if errors else None
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label, yerr=spread, capsize=2)
        ax.bar_label(bars, labels=[f"{v:.0%}" for v in values], fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=30 if len(names) > 6 else 15, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_training(training: dict, path: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("score_positive", "score_negative"), ("pair_accuracy",), ("loss",)]
    # held-out evaluations during training (--eval_strategy): accuracy and assessment accuracy against step
    panels += [(key,) for key in ("eval_accuracy", "eval_assessment_accuracy")
               if any(key in h for history in training.values() for h in history)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.3 * len(panels), 3.2))
    for name, history in training.items():
        for ax, keys in zip(axes, panels):
            for key in keys:
                points = [(h["step"], h[key]) for h in history if key in h]
                if points:
                    style = "--" if key == "score_negative" else "-"
                    ax.plot(*zip(*points), style, label=f"{name} {key}" if len(keys) > 1 else name)
    for ax, keys in zip(axes, panels):
        ax.set_title(" / ".join(keys))
        ax.set_xlabel("step")
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(run_dir: str, output: str | None = None) -> Path:
    """Write the report of ``run_dir``; returns the path of ``report.md``."""
    run = Path(run_dir)
    if not run.is_dir():
        raise FileNotFoundError(f"{run}: no such run directory")
    out = Path(output) if output else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    evals, scores, training = collect(run)
    if not evals and not training:
        raise ValueError(f"{run}: nothing to report (no */eval.json or */trainer_state.json)")
    parts = [f"# Report: `{run}`", ""]
    if evals:
        parts += ["## Evaluation", "", markdown_table(evals), "",
                  "accuracy: greedy decoding; A-accuracy: share of (better, worse) pairs of sampled COTs that "
                  "the model scores in the right order; score +/-: mean score of right/wrong COTs.", ""]
        plot_accuracy(evals, out / "accuracy.png")
        parts += ["![accuracy](accuracy.png)", ""]
    if scores:
        plot_scores(scores, out / "scores.png")
        parts += ["## Scores of right and wrong chains of thought", "", "![scores](scores.png)", ""]
    if training:
        plot_training(training, out / "training.png")
        parts += ["## Training", "", "![training](training.png)", ""]
    page = out / "report.md"
    page.write_text("\n".join(parts))
    print(f"report: {page}")
    return page


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aft report", description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="A run directory written by `aft run` or `aft demo`.")
    parser.add_argument("--output", default=None, help="Folder for the report (default RUN_DIR/report).")
    args = parser.parse_args(argv)
    report(args.run_dir, args.output)  # errors: one line from aft.cli.main
    return 0
