"""``aft study CONFIG.yaml``: the paper's comparison at small scale, seed by seed, judged against noise.

A study's unit of work is one seed: one pipeline of ``aft run`` stages in ``RUN_DIR/seed{N}``:

- the ``base`` stages: a model from scratch, VFT for a fixed epoch budget (validation accuracy logged after
  each epoch, so the plateau shows), k sampled COTs per training question labelled (binary, step-verified
  ranking), and the VFT model's samples of the test questions (the fixed set for assessment accuracy);
- the sweep, first, on its own seed: every tuned method trained at each point of its grid and evaluated on
  the *validation* split: each method gets a grid of the same size (an equal budget) over its own knobs
  (learning rate; ``beta`` for constrained losses, ``dpo_beta`` for DPO) and is tested at its own best. Its
  table goes to a sweep file of its own, rewritten after each method, so a sweep too long for one run can
  be a unit of its own (``--sweep``) that resumes where it stopped;
- one training stage per ``method`` (on the sweep's seed the sweep's model at the chosen point is reused:
  same seed, data and values), then its evaluation on the test split (and on harder questions for ``ood``).

When a seed finishes, everything the report needs is written to a small seed file
(``outputs.seeds``/seed{N}.json, committed): every metric, each method's per-question test correctness and
per-question ordered pairs (the paired statistics need them), the values chosen, the tokens each method
trained on, VFT's per-epoch training loss and validation accuracy, the machine, versions and wall time.
Models and samples stay in the run folder and are not needed afterwards: ``--report`` rebuilds the summary,
the claims, the tables and the plots from the seed files alone, so the seeds of one study can run on
different days and machines. Claims are judged by the rule registered in the config (``rule``): the paired
difference on the same test questions, pooled over seeds, against its standard error::

    aft study configs/study.yaml --sweep     # the sweep alone (resumes where a stopped one was)
    aft study configs/study.yaml --seeds 0   # one seed (its sweep first, if it is the sweep's seed)
    aft study configs/study.yaml             # every seed of the config, one after another
    aft study configs/study.yaml --report    # rewrite the page from the seed files, train nothing
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import platform
import re
import statistics
import subprocess
from collections import defaultdict
from dataclasses import fields
from pathlib import Path

import yaml

from aft.checks import AftError
from aft.pipeline import run_config, stage, stage_seconds

METRICS = ("accuracy", "assessment_accuracy", "score_positive", "score_negative")
# an iterative method (rounds of sample -> label -> align from its own models, aft.iterate): these keys say how
ROUND_KEYS = ("rounds", "questions_per_round", "fresh_questions", "restart", "sample", "feedback")
VFT = "vft"  # the base stage every method starts from


# ---- expanding the config into pipeline stages ----------------------------------------------------------

def _fields_of(kind: str) -> set[str]:
    return {f.name for f in fields(stage(kind)[0])}


def _stage_of(cfg: dict, method: dict) -> str:
    return method.get("stage", cfg.get("method_defaults", {}).get("stage", "align"))


def _method_spec(cfg: dict, method: dict, chosen: dict | None = None) -> dict:
    """A method's training stage: the sweep's chosen values over its own keys over ``method_defaults``
    (only the keys its stage has)."""
    stage = _stage_of(cfg, method)
    names = _fields_of(stage)
    spec = {k: v for k, v in cfg.get("method_defaults", {}).items() if k in names}
    spec.update({k: v for k, v in method.items() if k not in ("label", "tune", "tune_as", *ROUND_KEYS)})
    return {**spec, **(chosen or {}), "stage": stage}


def sweep_points(cfg: dict, method: dict) -> list[dict]:
    """The grid points of a tuned method (``tune`` names one of ``sweep.grids``); none if it is not tuned."""
    grid = cfg.get("sweep", {}).get("grids", {}).get(method.get("tune"), {})
    return [dict(zip(grid, values)) for values in itertools.product(*grid.values())] if grid else []


def sweep_seed(cfg: dict) -> int | None:
    return cfg["sweep"].get("seed", cfg["seeds"][0]) if cfg.get("sweep") else None


def sweep_stages(cfg: dict, methods: list[dict] | None = None) -> list[dict]:
    """Every tuned method (of ``methods``, default all) at every point of its grid, each evaluated on the
    validation split."""
    stages = []
    for method in cfg["methods"] if methods is None else methods:
        for i, point in enumerate(sweep_points(cfg, method)):
            name = f"sweep_{method['name']}_{i}"
            stages.append({**_method_spec(cfg, method, point), "name": name})
            stages.append({**cfg["evaluation"], **cfg["sweep"].get("evaluation", {}), "name": f"{name}_eval",
                           "stage": "eval", "model": name, "split": "validation", "groups": None})
    return stages


def method_stages(cfg: dict, method: dict, chosen: dict, seed: int, reuse: str | None = None) -> list[dict]:
    """The training stage of one method (none for a base model, or where ``reuse`` names a stage that trained
    the same thing) and its evaluation stages."""
    name = method["name"]
    stages, model = [], name
    if name not in {s["name"] for s in cfg["base"]}:
        curve = cfg.get("curve", {})
        on_curve = name in curve.get("methods", []) and seed in curve.get("seeds", [seed])
        if reuse and not on_curve:  # a path: the sweep's stage ran in an earlier pipeline of this seed
            model = str(Path(cfg["run_dir"]) / f"seed{seed}" / reuse)
        elif method.get("rounds"):
            stages += iterative_stages(cfg, method, chosen, seed)
            model = f"{name}/round{method['rounds']}/align"
        else:
            spec = _method_spec(cfg, method, chosen)
            if on_curve:  # evaluation while training: the same training, logged against step
                spec.update({"eval_task": cfg.get("defaults", {}).get("task"), **curve.get("stage", {})})
            stages.append(spec)
    stages.append({**cfg["evaluation"], "name": f"eval_{name}", "stage": "eval", "model": model})
    ood = cfg.get("ood")
    if ood and name in ood["methods"]:
        stages.append({**cfg["evaluation"], "name": f"ood_{name}", "stage": "eval", "model": model,
                       "task": ood["task"], "groups": None})
    return stages


def iterative_stages(cfg: dict, method: dict, chosen: dict, seed: int) -> list[dict]:
    """An iterative method's rounds (``aft.iterate.round_stages``), each aligning as the method's own keys say.
    Round 1 trains on the study's shared labelled groups (those every one-round method trains on), so it is
    that round's one-round method; later rounds sample ``questions_per_round`` fresh training questions."""
    from aft.iterate import round_stages

    align = {k: v for k, v in _method_spec(cfg, method, chosen).items() if k not in ("name", "stage")}
    groups = align.pop("groups", "labeled")
    sample = {"k": 8, "temperature": 0.8, **method.get("sample", {})}
    stages = round_stages(VFT, method["rounds"], method.get("questions_per_round"),
                          method.get("fresh_questions", True), method.get("restart", "previous"), sample,
                          {"feedback": method.get("feedback", "binary")}, align, seed=seed, prefix=f"{method['name']}/",
                          first_groups=groups)
    if method.get("fresh_questions", True) and method.get("questions_per_round"):
        # round r >= 2 samples questions past those the shared samples took: [first + (r-2)N, first + (r-1)N)
        shift = _base_limit(cfg) - method["questions_per_round"]
        for s in stages:
            if s["stage"] == "sample":
                s["offset"] += shift
    return stages


def _base_limit(cfg: dict) -> int:
    """How many training questions the shared samples took (the first N): later rounds start past them."""
    return next((s.get("limit", 0) for s in cfg["base"]
                 if s["stage"] == "sample" and s.get("split", "train") == "train"), 0)


def seed_config(cfg: dict, seed: int, stages: list[dict]) -> dict:
    return {"run_dir": str(Path(cfg["run_dir"]) / f"seed{seed}"), "defaults": {**cfg.get("defaults", {}), "seed": seed},
            "stages": [dict(s) for s in cfg["base"]] + stages, "overwrite": cfg.get("overwrite", False)}


def seed_file(cfg: dict, seed: int) -> Path:
    return Path(cfg["outputs"]["seeds"]) / f"seed{seed}.json"


def sweep_file(cfg: dict) -> Path:
    return Path(cfg["outputs"]["seeds"]) / "sweep.json"


def sweep_settings(cfg: dict, method: dict) -> str:
    """A fingerprint of what a method's sweep points are made with (the shared defaults and base stages, its
    training stage at each point, the validation evaluation): a sweep file's rows are reused only under it."""
    made_with = {"defaults": cfg.get("defaults", {}), "base": cfg["base"],
                 "stages": sweep_stages(cfg, [method])}
    return hashlib.sha256(json.dumps(made_with, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_sweep(cfg: dict) -> dict:
    """The sweep as a unit of its own: on the sweep's seed, the base stages and each tuned method at every point
    of its grid, evaluated on validation. The sweep file (``outputs.seeds``/sweep.json, committed) is rewritten
    after each method, so a unit stopped part-way resumes on any machine with only the methods it lacks (the
    base stages run again there). Rows made with other settings are refused, or retrained with ``overwrite``."""
    seed, path = sweep_seed(cfg), sweep_file(cfg)
    record = json.loads(path.read_text()) if path.exists() else {}
    rows, seconds = record.get("rows", []), record.get("stage_seconds", {})
    for method in cfg["methods"]:
        points = sweep_points(cfg, method)
        if not points:
            continue
        key = sweep_settings(cfg, method)
        have = [r for r in rows if r["method"] == method["name"]]
        if have and any(r["settings"] != key for r in have):
            if not cfg.get("overwrite"):
                raise AftError(f"{path}: the sweep of {method['name']!r} was made with other settings; pass "
                               "--overwrite to train it again, or use other outputs")
            have = []
        if len(have) == len(points):
            continue
        rows = [r for r in rows if r["method"] != method["name"]]
        run_dir = run_config(seed_config(cfg, seed, sweep_stages(cfg, [method])))
        for i, point in enumerate(points):
            metrics = json.loads((run_dir / f"sweep_{method['name']}_{i}_eval" / "eval.json").read_text())
            rows.append({"method": method["name"], **point, "validation_accuracy": metrics["accuracy"],
                         "stage": f"sweep_{method['name']}_{i}", "settings": key})
        now = stage_seconds(run_dir)
        seconds.update({k: v for k, v in now.items() if k in {s["name"] for s in cfg["base"]}
                        or k.startswith(f"sweep_{method['name']}_")})
        record = {"seed": seed, "study": cfg.get("title"), **_environment(),
                  "seconds": round(sum(v for v in seconds.values() if v), 1), "stage_seconds": seconds,
                  "vft": {"epochs": _vft_epochs(_read(run_dir / VFT / "trainer_state.json"))},
                  "rows": rows, "chosen": _best(cfg, rows)[0]}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(compact_json(record) + "\n")
        print(f"study: sweep of {method['name']} written to {path}")
    return record


def _best(cfg: dict, rows: list[dict]) -> tuple[dict, dict]:
    """Per tuned method whose every point is in ``rows``: its best point's values and the stage that trained it
    (the first of equals, in the grid's order)."""
    chosen, stage = {}, {}
    for method in cfg["methods"]:
        points = sweep_points(cfg, method)
        results = [r for r in rows if r["method"] == method["name"]]
        if points and len(results) == len(points):
            best = max(results, key=lambda r: r["validation_accuracy"])
            chosen[method["name"]] = {k: best[k] for k in points[0]}
            stage[method["name"]] = best["stage"]
    return chosen, stage


def tune(cfg: dict, seed: int) -> tuple[dict, list[dict], dict]:
    """The values each tuned method is tested at: ``{method: {field: value}}``, the sweep's table (on the
    sweep's seed) and, per method, the sweep stage of this seed's run folder that trained the chosen point (its
    model is reused, where it is still there). The sweep runs on its own seed, first (``run_sweep``); another
    seed reads the choice from the sweep file (or, in studies run before it existed, the sweep seed's file)."""
    if not cfg.get("sweep"):
        return {}, [], {}
    tuned = [m for m in cfg["methods"] if sweep_points(cfg, m)]
    if seed == sweep_seed(cfg):
        rows = run_sweep(cfg).get("rows", [])
    elif sweep_file(cfg).exists():
        rows = json.loads(sweep_file(cfg).read_text())["rows"]
        stale = [m["name"] for m in tuned if {r["settings"] for r in rows if r["method"] == m["name"]}
                 != {sweep_settings(cfg, m)}]
        if stale:
            raise AftError(f"{sweep_file(cfg)}: the sweep of {stale} is missing or was made with other settings: "
                           f"run it first (aft study CONFIG --sweep)")
    elif seed_file(cfg, sweep_seed(cfg)).exists():
        return json.loads(seed_file(cfg, sweep_seed(cfg)).read_text())["chosen"], [], {}
    else:
        raise FileNotFoundError(f"{sweep_file(cfg)}: run the sweep first (aft study CONFIG --sweep, or seed "
                                f"{sweep_seed(cfg)}); it chooses the values seed {seed} is trained at")
    chosen, stage = _best(cfg, rows)
    folder = Path(cfg["run_dir"]) / f"seed{seed}"
    reuse = {m: s for m, s in stage.items() if seed == sweep_seed(cfg) and (folder / s / "DONE").exists()}
    table = [{**{k: v for k, v in r.items() if k not in ("stage", "settings")}, "chosen": stage[r["method"]] == r["stage"]}
             for m in tuned for r in rows if r["method"] == m["name"]] if seed == sweep_seed(cfg) else []
    return chosen, table, reuse


def run_seed(cfg: dict, seed: int) -> dict:
    """Train and evaluate one seed (skipping what is done), then write its seed file; returns its record."""
    chosen, sweep, reuse = tune(cfg, seed)
    stages = [s for m in cfg["methods"]
              for s in method_stages(cfg, m, chosen.get(m.get("tune_as", m["name"]), {}), seed, reuse.get(m["name"]))]
    run_dir = run_config(seed_config(cfg, seed, stages))
    record = seed_record(cfg, seed, run_dir, chosen, sweep, reuse)
    path = seed_file(cfg, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(compact_json(record) + "\n")
    print(f"study: seed {seed} written to {path}")
    return record


# ---- one seed's record, from its run folder ----------------------------------------------------------------

def compact_json(obj) -> str:
    """Indented JSON with every list of numbers or strings on one line: a seed file stays small and diffable."""
    text = json.dumps(obj, indent=1)
    return re.sub(r"\[\n\s*((?:(?:-?[\d.eE+-]+|\"[^\"\n]*\"|true|false|null),\n\s*)*(?:-?[\d.eE+-]+|\"[^\"\n]*\"|true|false|null))\n\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",\n")) + "]", text)


def _read(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def ordered_pairs(rows: list[dict]) -> dict[str, tuple[float, int]]:
    """Per test group (by id), from ``scores.jsonl``: (pairs ordered right, ties counting one half; pairs) over
    the (better, worse) pairs of scored candidates: assessment accuracy question by question."""
    by_group = defaultdict(list)
    for r in rows:
        if r["score"] is not None:
            by_group[r["id"]].append((r["label"], r["score"]))
    out = {}
    for gid, cands in by_group.items():
        pairs = [(si, sj) for li, si in cands for lj, sj in cands if li > lj]
        out[gid] = (sum(1.0 if si > sj else 0.5 if si == sj else 0.0 for si, sj in pairs), len(pairs))
    return out


def _vft_epochs(state: dict | None) -> list[dict]:
    """VFT's mean logged training loss and its validation accuracy, per epoch."""
    if not state:
        return []
    history = state.get("log_history", [])
    epochs = sorted({math.ceil(h["epoch"] - 1e-9) for h in history if "epoch" in h and h["epoch"] > 0})
    rows = []
    for e in epochs:
        losses = [h["loss"] for h in history if "loss" in h and e - 1 < h.get("epoch", 0) <= e + 1e-9]
        accuracy = [h["eval_accuracy"] for h in history if "eval_accuracy" in h and abs(h["epoch"] - e) < 1e-6]
        rows.append({"epoch": e, "train_loss": statistics.fmean(losses) if losses else None,
                     "validation_accuracy": accuracy[-1] if accuracy else None})
    return rows


def _tokens(state: dict | None) -> int | None:
    found = [h["train_completion_tokens"] for h in (state or {}).get("log_history", []) if "train_completion_tokens" in h]
    return found[-1] if found else None


SPLIT = {"sample": "generation (sampling)", "eval": "evaluation (generation and scoring)", "sft": "training",
         "align": "training", "grpo": "training (GRPO, its sampling included)", "label": "labelling",
         "merge": "labelling"}


def time_split(run_dir: Path, seconds: dict) -> dict:
    """A seed's seconds by kind of stage, read from each stage folder's manifest (what made it)."""
    from aft.provenance import FOLDER_MANIFEST

    split = defaultdict(float)
    for folder, sec in seconds.items():
        manifests = [run_dir / folder / FOLDER_MANIFEST, *sorted((run_dir / folder).glob("*.manifest.json"))]
        kind = next((json.loads(m.read_text()).get("stage") for m in manifests if m.is_file()), None)
        split[SPLIT.get(kind, "other")] += sec or 0
    return {k: round(v, 1) for k, v in sorted(split.items())}


def method_cost(cfg: dict, method: dict, run_dir: Path, trained: str, seconds: dict) -> dict:
    """What a method cost on one seed: the completions sampled for it (the shared samples its groups came from,
    its own rounds' samples, or what GRPO sampled), its optimizer steps, and the seconds of its own stages
    (training, and an iterative method's own sampling; the shared samples' time is the seed's)."""
    from aft.sample import completions_sampled

    def shared_completions() -> int:
        return completions_sampled(run_dir / "samples" / "groups.jsonl")

    stage = _stage_of(cfg, method)
    if method.get("rounds"):
        own = [k for k in seconds if k.startswith(f"{method['name']}/")]
        sampled = shared_completions() + sum(completions_sampled(run_dir / k / "groups.jsonl")
                                             for k in own if k.endswith("/samples"))
        states = [_read(run_dir / k / "trainer_state.json") or {} for k in own if k.endswith("/align")]
        steps = sum(s.get("global_step", 0) for s in states)
        tokens = [_tokens(s) for s in states]
        tokens = sum(tokens) if tokens and None not in tokens else None
    else:
        own = [trained]
        state = _read(run_dir / trained / "trainer_state.json") or {}
        steps = state.get("global_step")
        if stage == "grpo":
            sampled = (_read(run_dir / trained / "budget.json") or {}).get("completions_sampled")
            tokens = _grpo_tokens(state, sampled)
        else:
            sampled = shared_completions() if stage == "align" else 0
            tokens = _tokens(state)
    return {"completions_sampled": sampled, "optimizer_steps": steps, "completion_tokens": tokens,
            "seconds": round(sum(seconds.get(k) or 0 for k in own), 1)}


def _grpo_tokens(state: dict, sampled: int | None) -> int | None:
    """Completion tokens GRPO's loss read (every completion it sampled): ``sampled`` x the mean completion
    length TRL logs (each log averages the steps since the last one, all of the same number of completions,
    so the mean is weighted by the steps each log covers)."""
    logs = [h for h in state.get("log_history", []) if "completions/mean_length" in h]
    steps = [h["step"] - (prev["step"] if prev else 0) for prev, h in zip([None] + logs, logs)]
    if not sampled or not logs or sum(steps) <= 0:
        return None
    mean = sum(h["completions/mean_length"] * n for h, n in zip(logs, steps)) / sum(steps)
    return round(sampled * mean)


def _environment() -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                        "cpus": os.cpu_count(), "accelerator": torch.cuda.get_device_name(0)
                        if torch.cuda.is_available() else None},
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "transformers": transformers.__version__, "aft_commit": commit}}


def seed_record(cfg: dict, seed: int, run_dir: Path, chosen: dict, sweep: list[dict], reuse: dict) -> dict:
    """Everything the report needs from one seed, read from its run folder."""
    seconds = stage_seconds(run_dir)
    questions = [r["id"] for r in _jsonl(run_dir / f"eval_{VFT}" / "predictions.jsonl")]
    from aft.tasks import load_task

    task = load_task(cfg["evaluation"].get("task", cfg.get("defaults", {}).get("task")))
    variant = {e["id"]: e.get("variant") for e in task.load(cfg["evaluation"].get("split", "test"))}
    vft_pairs = ordered_pairs(_jsonl(run_dir / f"eval_{VFT}" / "scores.jsonl"))
    groups = sorted(vft_pairs)
    test_pairs = [vft_pairs[g][1] for g in groups]
    methods = {}
    for method in cfg["methods"]:
        name = method["name"]
        metrics = _read(run_dir / f"eval_{name}" / "eval.json")
        if not metrics:
            continue
        correct = {r["id"]: r["correct"] for r in _jsonl(run_dir / f"eval_{name}" / "predictions.jsonl")}
        pairs = ordered_pairs(_jsonl(run_dir / f"eval_{name}" / "scores.jsonl"))
        entry = {**{k: metrics.get(k) for k in METRICS},
                 "accuracy_by_variant": metrics.get("accuracy_by_variant", {}),
                 "correct": "".join("1" if correct[q] else "0" for q in questions),
                 "ordered": [pairs.get(g, (0.0, 0))[0] for g in groups]}
        if [pairs.get(g, (0.0, 0))[1] for g in groups] != test_pairs:  # scored on other pairs than VFT's (rare)
            entry["pairs"] = [pairs.get(g, (0.0, 0))[1] for g in groups]
        ood = _read(run_dir / f"ood_{name}" / "eval.json")
        if ood:
            entry["ood_accuracy"] = ood["accuracy"]
            entry["ood_correct"] = "".join("1" if r["correct"] else "0"
                                           for r in _jsonl(run_dir / f"ood_{name}" / "predictions.jsonl"))
        trained = reuse.get(name, name)
        if metrics.get("vote_accuracy") is not None:
            entry["vote_accuracy"] = metrics["vote_accuracy"]
        if name not in {s["name"] for s in cfg["base"]}:
            entry["cost"] = method_cost(cfg, method, run_dir, trained, seconds)
            entry["train_tokens"] = entry["cost"]["completion_tokens"]
            entry["hyperparameters"] = {k: v for k, v in _method_spec(
                cfg, method, chosen.get(method.get("tune_as", name))).items()
                                        if k in ("learning_rate", "beta", "dpo_beta", "dpo_boundary", "nll_on",
                                                 "nll_weight", "constraint", "loss")}
        methods[name] = entry
    vft_state = _read(run_dir / VFT / "trainer_state.json")
    record = {"seed": seed, "study": cfg.get("title"), **_environment(),
              "seconds": round(sum(s for s in seconds.values() if s), 1), "stage_seconds": seconds,
              "time_split": time_split(run_dir, seconds),
              "chosen": chosen, "sweep": sweep,
              "vft": {"epochs": _vft_epochs(vft_state), "train_tokens": _tokens(vft_state)},
              # evaluations among the base stages (e.g. VFT on its own training questions and samples)
              "base_evaluations": {s["name"]: {k: metrics.get(k) for k in ("split", "accuracy", "assessment_accuracy")}
                                   for s in cfg["base"] if s["stage"] == "eval"
                                   for metrics in [_read(run_dir / s["name"] / "eval.json")] if metrics},
              "test": {"questions": questions, "variant": [variant.get(q) for q in questions], "groups": groups,
                       "pairs": test_pairs},
              "methods": methods}
    from aft.report import collect

    _, scores, training = collect(run_dir)
    record["scores"] = {n: {"right": [round(r["score"], 4) for r in scores[f"eval_{n}"] if r["correct"]],
                            "wrong": [round(r["score"], 4) for r in scores[f"eval_{n}"] if not r["correct"]]}
                        for n in cfg.get("plots", {}).get("scores", []) if f"eval_{n}" in scores}
    keys = ("step", "loss", "score_positive", "score_negative", "pair_accuracy", "eval_accuracy",
            "eval_assessment_accuracy")
    record["curves"] = {n: [{k: h[k] for k in keys if k in h} for h in training[n]]
                        for n in cfg.get("curve", {}).get("methods", []) if n in training}
    return record


# ---- statistics and judging ------------------------------------------------------------------------------

def paired_difference(a: list[float], b: list[float], weights: list[float] | None = None) -> dict:
    """The difference of two methods measured on the same units (questions, pooled over seeds) and its
    standard error. Per unit q: ``d_q = a_q - b_q`` (e.g. 1 - 0 when only a answers q right); with weights
    ``n_q`` (pairs per question, for assessment accuracy) the difference is the ratio ``sum d / sum n`` and
    the SE the usual one of a ratio over clusters::

        diff = sum_q d_q / sum_q n_q,    SE = sqrt(Q / (Q - 1) * sum_q (d_q - diff * n_q)^2) / sum_q n_q

    which for n_q = 1 is the standard deviation of the d_q over sqrt(Q)."""
    weights = weights or [1.0] * len(a)
    units = [(x - y, n) for x, y, n in zip(a, b, weights) if n]
    total = sum(n for _, n in units)
    if not units or not total:
        return {"difference": None, "se": None, "units": 0}
    diff = sum(d for d, _ in units) / total
    q = len(units)
    se = math.sqrt(q / (q - 1) * sum((d - diff * n) ** 2 for d, n in units)) / total if q > 1 else float("inf")
    return {"difference": diff, "se": se, "units": q}


def per_question(record: dict, name: str, metric: str) -> tuple[list[float], list[float]] | None:
    """One seed's per-question values of a metric for one method, and their weights; None if not measured."""
    m = record["methods"].get(name)
    if not m:
        return None
    if metric == "assessment_accuracy":
        return m["ordered"], m["pairs"] if "pairs" in m else record["test"]["pairs"]
    if metric == "ood_accuracy":
        return ([float(c) for c in m["ood_correct"]], [1.0] * len(m["ood_correct"])) if "ood_correct" in m else None
    correct = [float(c) for c in m["correct"]]
    if metric.startswith("accuracy:"):
        keep = [v == metric.split(":", 1)[1] for v in record["test"]["variant"]]
        return correct, [float(k) for k in keep]
    return correct, [1.0] * len(correct)


def compare(records: list[dict], a: str, b: str, metric: str = "accuracy") -> dict:
    """``paired_difference`` of a over b, pooled over the seeds that measured both; per-seed differences too."""
    xs, ys, ws, per_seed = [], [], [], {}
    for record in records:
        x = per_question(record, a, metric)
        # b a number: a fixed reference value (e.g. the paper's figure), c per question (c x pairs, weighted)
        y = ([b * w for w in x[1]], x[1]) if _fixed(b) and x else per_question(record, b, metric)
        if x is None or y is None:
            continue
        xs += x[0]
        ys += y[0]
        ws += x[1]
        per_seed[str(record["seed"])] = paired_difference(x[0], y[0], x[1])["difference"]
    return {**paired_difference(xs, ys, ws), "per_seed": per_seed}


def _fixed(b) -> bool:
    return isinstance(b, (int, float)) and not isinstance(b, bool)


def judge(claim: dict, records: list[dict], standard_errors: float = 2.0) -> dict:
    """A claim's verdict by the rule registered in the config: held if the pooled paired difference is beyond
    ``standard_errors`` SE in the claimed direction (``expect``: greater, less), not held if beyond it the other
    way, unclear otherwise. ``expect: equal`` (within ``tolerance``): held if the whole interval diff ± k SE
    lies within the tolerance, not held if it lies wholly outside, unclear otherwise."""
    found = compare(records, claim["a"], claim["b"], claim.get("metric", "accuracy"))
    out = {**claim, **found}
    d, se = found["difference"], found["se"]
    if d is None:
        return {**out, "verdict": "not run"}
    k, expect = standard_errors, claim.get("expect", "greater")
    if expect == "equal":
        tol = claim.get("tolerance", 0.015)
        verdict = "held" if abs(d) + k * se <= tol else "not held" if abs(d) - k * se > tol else "unclear"
    else:
        signed = d if expect == "greater" else -d
        verdict = "held" if signed > k * se else "not held" if signed < -k * se else "unclear"
    return {**out, "verdict": verdict}


def spread(values: list[float]) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def load_records(cfg: dict, seeds: list[int] | None = None) -> list[dict]:
    """The seed files of the study's seeds that exist (in the config's seed order)."""
    return [json.loads(seed_file(cfg, s).read_text()) for s in (seeds or cfg["seeds"]) if seed_file(cfg, s).exists()]


def summarize(cfg: dict, records: list[dict]) -> dict:
    """The study's summary from its seed files alone: per method, per seed and mean; claims; VFT per epoch."""
    k = cfg.get("rule", {}).get("standard_errors", 2.0)
    methods = {}
    for method in cfg["methods"]:
        name = method["name"]
        seen = [r for r in records if name in r["methods"]]
        entry = {"label": method.get("label", name), "seeds": [r["seed"] for r in seen]}
        for metric in METRICS + ("ood_accuracy", "train_tokens", "vote_accuracy"):
            entry[metric] = spread([r["methods"][name].get(metric) for r in seen])
        entry["cost"] = {key: spread([r["methods"][name].get("cost", {}).get(key) for r in seen])
                         for key in ("completions_sampled", "optimizer_steps", "seconds")}
        entry["cost"]["completion_tokens"] = entry["train_tokens"]  # one figure (seed_record writes it as both)
        variants = sorted({v for r in seen for v in r["methods"][name]["accuracy_by_variant"]})
        entry["accuracy_by_variant"] = {v: spread([r["methods"][name]["accuracy_by_variant"].get(v) for r in seen])
                                        for v in variants}
        # against the start: paired accuracy difference, and how far the negatives' and positives' mean scores moved
        entry["vs_vft"] = {key: value for key, value in compare(records, name, VFT).items() if key != "per_seed"}
        for side in ("negative", "positive"):
            moved = [r["methods"][name][f"score_{side}"] - r["methods"][VFT][f"score_{side}"] for r in seen
                     if VFT in r["methods"] and r["methods"][name][f"score_{side}"] is not None
                     and r["methods"][VFT][f"score_{side}"] is not None]
            entry[f"score_{side}_moved"] = spread(moved)
        entry["chosen"] = next((r["chosen"].get(name) for r in records if r.get("chosen", {}).get(name)), None)
        entry["per_seed"] = {str(r["seed"]): {key: r["methods"][name].get(key) for key in METRICS + ("ood_accuracy",)}
                             for r in seen}
        methods[name] = entry
    return {"config": cfg, "seeds": [r["seed"] for r in records], "rule": {"standard_errors": k},
            "sweep": [row for r in records for row in r.get("sweep", [])], "methods": methods,
            "sweep_unit": _sweep_unit(cfg),
            "vft": {str(r["seed"]): r["vft"] for r in records},
            "base_evaluations": {str(r["seed"]): r["base_evaluations"] for r in records if r.get("base_evaluations")},
            "seconds": {str(r["seed"]): r["seconds"] for r in records},
            "time_split": {str(r["seed"]): r.get("time_split") for r in records},
            "machines": {str(r["seed"]): r["machine"] for r in records},
            "claims": [judge(claim, records, k) for claim in cfg.get("claims", [])]}


def _sweep_unit(cfg: dict) -> dict | None:
    """Where the sweep ran, how long it took and its VFT's epochs, from the sweep file (None without one)."""
    path = sweep_file(cfg) if cfg.get("sweep") else None
    if not path or not path.exists():
        return None
    record = json.loads(path.read_text())
    return {k: record.get(k) for k in ("seed", "seconds", "machine", "vft")}


# ---- writing it up ---------------------------------------------------------------------------------------

def _pct(s: dict | None) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f}" if s["n"] > 1 else f"{100 * s['mean']:.1f}"


def _num(s: dict | None, digits: int = 3, signed: bool = False) -> str:
    if not s or s.get("mean") is None:
        return "-"
    return f"{s['mean']:+.{digits}f}" if signed else f"{s['mean']:.{digits}f}"


def _pct_of(value: float) -> str:
    return f"{100 * value:g}%"


def _count(s: dict | None) -> str:
    return "-" if not s or s.get("mean") is None else f"{s['mean']:,.0f}"


def _diff(c: dict) -> str:
    """A paired difference in points ± its SE."""
    if c.get("difference") is None:
        return "-"
    return f"{100 * c['difference']:+.1f} ± {100 * c['se']:.1f}"


def write_results(summary: dict, command: str) -> Path:
    cfg = summary["config"]
    out = cfg.get("outputs", {})
    md, js = Path(out.get("markdown", Path(cfg["run_dir"]) / "results.md")), out.get("json")
    figures = Path(out.get("figures", md.parent))
    figures.mkdir(parents=True, exist_ok=True)
    md.parent.mkdir(parents=True, exist_ok=True)
    if js:
        Path(js).parent.mkdir(parents=True, exist_ok=True)
        Path(js).write_text(json.dumps(summary, indent=1) + "\n")
    methods, k = summary["methods"], summary["rule"]["standard_errors"]
    images = plot_study(summary, figures)
    rel = lambda p: Path(p).resolve().relative_to(md.parent.resolve()).as_posix()  # noqa: E731
    seeds = summary["seeds"]
    minutes = ", ".join(f"seed {s}: {sec / 60:.0f} min" + (" (" + ", ".join(
        f"{kind} {v / 60:.0f}" for kind, v in summary["time_split"][s].items()) + ")"
        if summary.get("time_split", {}).get(s) else "") for s, sec in summary["seconds"].items() if sec)
    lines = [f"# {cfg.get('title', 'Study results')}", "",
             f"Written by `{command}` from the seed files in `{out.get('seeds')}` ({len(seeds)} seeds: {seeds}; "
             f"{minutes}; machines: " + "; ".join(f"seed {s}: {m['processor']}, {m['cpus']} CPUs"
                                                 + (f", {m['accelerator']}" if m.get("accelerator") else "")
                                                 for s, m in summary["machines"].items())
             + f"). The numbers are also in `{js}`.", ""]
    if cfg.get("description"):
        lines += [cfg["description"].strip(), ""]
    if summary["sweep"]:
        lines += ["## Hyper-parameters chosen on the validation split", "",
                  f"Each tuned method trained at every point of its own grid (the same number of points each) on seed "
                  f"{sweep_seed(cfg)}, greedy accuracy on validation questions; each is tested at its own best."
                  + (f" The sweep ran as a unit of its own: {unit['seconds'] / 60:.0f} minutes of stages on "
                     f"{unit['machine']['processor']}, {unit['machine']['cpus']} CPUs (`{sweep_file(cfg)}`)."
                     if (unit := summary.get("sweep_unit")) and unit.get("seconds") else ""), "",
                  "| method | point | validation accuracy |", "|---|---|---|"]
        for r in summary["sweep"]:
            point = ", ".join(f"{key} {r[key]}" for key in r if key not in ("method", "validation_accuracy", "chosen"))
            lines.append(f"| {methods[r['method']]['label']} | {point} | {100 * r['validation_accuracy']:.1f}"
                         + (" **(chosen)**" if r["chosen"] else "") + " |")
        lines.append("")
    if summary["vft"]:
        lines += ["## VFT, epoch by epoch", "",
                  "Mean training loss and validation accuracy (%) after each epoch, per seed (the model kept is the "
                  "last epoch's unless early stopping is configured):", "",
                  "| seed | " + " | ".join(f"epoch {e['epoch']}" for e in next(iter(summary["vft"].values()))["epochs"])
                  + " |", "|---" * (1 + len(next(iter(summary["vft"].values()))["epochs"])) + "|"]
        for s, v in summary["vft"].items():
            lines.append(f"| {s} | " + " | ".join(
                f"{e['train_loss']:.3f} / {100 * e['validation_accuracy']:.1f}" if e["validation_accuracy"] is not None
                and e["train_loss"] is not None else "-" for e in v["epochs"]) + " |")
        lines.append("")
    for s, found in summary.get("base_evaluations", {}).items():
        lines += [f"VFT's own evaluation `{name}` on seed {s} ({m['split']} split): greedy accuracy {100 * m['accuracy']:.1f}%"
                  + (f", assessment accuracy on its samples {100 * m['assessment_accuracy']:.1f}%"
                     if m.get("assessment_accuracy") is not None else "") + "." for name, m in found.items()]
        lines.append("")
    lines += ["## Test results", "",
              "Accuracy: greedy decoding on the test split, % (mean ± standard deviation over seeds). Δ VFT: paired "
              "difference from VFT on the same test questions, pooled over seeds, ± its standard error. A-accuracy: "
              "share of (right, wrong) pairs of the VFT model's own test samples that the model orders correctly. "
              "Score moved: change of the mean score (length-normalised log-likelihood) of the wrong (−) and right "
              "(+) test samples from VFT's. Tokens: completion tokens the method's loss read in training (mean over "
              "seeds; \"VFT + more SFT\" matches AFT's steps, not its tokens).", "",
              "| method | accuracy | Δ VFT | A-accuracy | score − moved | score + moved | tokens | values | "
              "accuracy per seed |", "|---|---|---|---|---|---|---|---|---|"]
    for name, m in methods.items():
        per_seed = ", ".join(f"{100 * v:.1f}" for v in m["accuracy"].get("values", []))
        tokens = _count(m["train_tokens"])
        chosen = ", ".join(f"{key} {v:g}" for key, v in (m["chosen"] or {}).items()) or "-"
        lines.append(f"| {m['label']} | {_pct(m['accuracy'])} | {'-' if name == VFT else _diff(m['vs_vft'])} | "
                     f"{_pct(m['assessment_accuracy'])} | {_num(m['score_negative_moved'], signed=True)} | "
                     f"{_num(m['score_positive_moved'], signed=True)} | {tokens} | {chosen} | {per_seed} |")
    costed = [n for n, m in methods.items() if m.get("cost", {}).get("completions_sampled", {}).get("n")]
    if costed:
        voted = any(methods[n]["vote_accuracy"]["n"] for n in costed)
        lines += ["", "## Cost", "",
                  "What each method cost (mean over seeds): completions sampled for it (the shared samples its groups "
                  "came from, its own rounds' samples, or what GRPO sampled), optimizer steps, and seconds of its own "
                  "stages (training, and an iterative method's own sampling; the shared samples' time is not in it). "
                  "Tokens trained: completion tokens its loss read (GRPO: completions sampled x TRL's logged mean "
                  "completion length)."
                  + (" maj@k: majority-vote accuracy over the evaluation's vote samples." if voted else ""), "",
                  "| method | completions sampled | tokens trained | optimizer steps | seconds | accuracy |"
                  + (" maj@k |" if voted else ""), "|---|---|---|---|---|---|" + ("---|" if voted else "")]
        for name in costed:
            m, c = methods[name], methods[name]["cost"]
            lines.append(f"| {m['label']} | {_num(c['completions_sampled'], 0)} | {_count(c['completion_tokens'])} | "
                         f"{_num(c['optimizer_steps'], 0)} | "
                         f"{_num(c['seconds'], 0)} | {_pct(m['accuracy'])} |"
                         + (f" {_pct(m['vote_accuracy'])} |" if voted else ""))
    variants = sorted({v for m in methods.values() for v in m.get("accuracy_by_variant", {})})
    with_ood = [n for n, m in methods.items() if m["ood_accuracy"]["n"]]
    if variants or with_ood:
        lines += ["", "## Multi-task and out-of-distribution", "",
                  "Trained on a mixture of task variants: accuracy per variant on the test split"
                  + (f"; out of distribution: `{cfg['ood']['task']}` (test split)." if with_ood else "."), "",
                  "| method | " + " | ".join(variants + (["out of distribution"] if with_ood else [])) + " |",
                  "|---" * (len(variants) + 1 + bool(with_ood)) + "|"]
        for name in (with_ood or methods):
            m = methods[name]
            cells = [_pct(m["accuracy_by_variant"].get(v)) for v in variants]
            lines.append(f"| {m['label']} | " + " | ".join(cells + ([_pct(m["ood_accuracy"])] if with_ood else []))
                         + " |")
    if summary["claims"]:
        lines += ["", "## The paper's claims, checked here", "",
                  f"Difference = first minus second, in points: paired on the same test questions, pooled over seeds, "
                  f"± its standard error (per seed in brackets). The rule, registered in the config before the run: "
                  f"held if the difference is beyond {k:g} SE in the claimed direction, not held if beyond {k:g} SE the "
                  f"other way, unclear otherwise (for \"about equal\": held if the difference ± {k:g} SE lies within "
                  "the tolerance, not held if wholly outside it).", "",
                  "| claim | paper | compared | difference ± SE | verdict |", "|---|---|---|---|---|"]
        for c in summary["claims"]:
            metric = c.get("metric", "accuracy")
            seeds_ = ", ".join(f"{100 * d:+.1f}" for d in c["per_seed"].values() if d is not None)
            lines.append(f"| {c['text']} | {c.get('paper', '')} | {methods.get(c['a'], {}).get('label', c['a'])} vs "
                         f"{_pct_of(c['b']) if _fixed(c['b']) else methods.get(c['b'], {}).get('label', c['b'])} "
                         f"({metric}) | {_diff(c)}"
                         + (f" ({seeds_})" if seeds_ else "") + f" | {c['verdict']} |")
    lines += ["", "## Figures", ""] + [f"![{title}]({rel(path)})\n\n{text}\n" for title, path, text in images]
    if cfg.get("discussion"):
        lines += ["## Discussion", "", cfg["discussion"].strip(), ""]
    md.write_text("\n".join(lines) + "\n")
    print(f"study: {md}" + (f", {js}" if js else ""))
    return md


def plot_study(summary: dict, figures: Path) -> list[tuple[str, Path, str]]:
    """The study's figures, drawn by ``aft report``'s plotting functions from the seed files' contents."""
    from aft.report import plot_accuracy, plot_scores, plot_training

    cfg, methods = summary["config"], summary["methods"]
    records = load_records(cfg, summary["seeds"])
    images = []
    measured = {m["label"]: m for m in methods.values() if m["accuracy"]["mean"] is not None}
    if measured:
        plot_accuracy({label: {key: m[key]["mean"] for key in ("accuracy", "assessment_accuracy")}
                       for label, m in measured.items()}, figures / "study_accuracy.png",
                      errors={label: {key: m[key]["std"] for key in ("accuracy", "assessment_accuracy")}
                              for label, m in measured.items()})
        images.append(("accuracy", figures / "study_accuracy.png",
                       "Test accuracy and assessment accuracy per method (mean over seeds, bars: standard deviation)."))
    first = records[0] if records else {}
    scores = {methods[n]["label"]: [{"score": s, "correct": side == "right"} for side in ("right", "wrong")
                                    for s in v[side]] for n, v in first.get("scores", {}).items()}
    if scores:
        plot_scores(scores, figures / "study_scores.png")
        images.append(("scores", figures / "study_scores.png",
                       f"Scores of right and wrong test COTs (sampled by the VFT model) under each model, seed "
                       f"{first['seed']}."))
    curves = next(({methods[n]["label"]: h for n, h in r["curves"].items()} for r in records if r.get("curves")), {})
    if curves:
        plot_training(curves, figures / "study_training.png")
        images.append(("training", figures / "study_training.png",
                       "Alignment with and without the constraint, first seed with curves: mean scores of positives "
                       "(solid) and negatives (dashed) in the training batches, training pair accuracy, loss, and "
                       "held-out accuracy and assessment accuracy against step (a collapse shows here)."))
    return images


# ---- command line ----------------------------------------------------------------------------------------

CLAIM_METRICS = ("accuracy", "assessment_accuracy", "ood_accuracy")


def load_study(path: str) -> dict:
    cfg = yaml.safe_load(Path(path).read_text())
    for key in ("run_dir", "seeds", "base", "methods", "evaluation", "outputs"):
        if key not in cfg:
            raise ValueError(f"{path}: a study config needs '{key}'")
    if "seeds" not in cfg["outputs"]:
        raise ValueError(f"{path}: outputs.seeds must name the folder of the seed files")
    names = [m["name"] for m in cfg["methods"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: method names must be unique")
    if VFT not in names:
        raise ValueError(f"{path}: the methods must include the base model {VFT!r} (every comparison's start)")
    sweep = cfg.get("sweep")
    if sweep:
        if "grids" not in sweep:
            raise ValueError(f"{path}: sweep needs 'grids' (one grid per set of knobs; methods name theirs in 'tune')")
        sizes = {name: math.prod(len(v) for v in grid.values()) for name, grid in sweep["grids"].items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"{path}: every sweep grid must have the same number of points (an equal budget); "
                             f"got {sizes}")
        if sweep_seed(cfg) not in cfg["seeds"]:
            raise ValueError(f"{path}: sweep.seed must be one of the seeds {cfg['seeds']}")
    tuned_methods = {m["name"] for m in cfg["methods"] if m.get("tune")}
    for method in cfg["methods"]:
        if method.get("tune_as") is not None and method["tune_as"] not in tuned_methods:
            raise ValueError(f"{path}: method {method['name']!r}: tune_as must name a tuned method; "
                             f"got {method['tune_as']!r}")
        if method.get("rounds") is not None and (_stage_of(cfg, method) != "align" or not isinstance(
                method["rounds"], int) or method["rounds"] < 1 or method.get("tune")):
            raise ValueError(f"{path}: method {method['name']!r}: rounds (a positive integer) is for an align method, "
                             "tuned as its one-round form (tune_as), not on its own grid")
        tuned = method.get("tune")
        if tuned is None:
            continue
        if tuned not in (sweep or {}).get("grids", {}):
            raise ValueError(f"{path}: method {method['name']!r} tunes {tuned!r}, not a grid of sweep.grids")
        unknown = set(sweep["grids"][tuned]) - _fields_of(_stage_of(cfg, method))
        if unknown:
            raise ValueError(f"{path}: method {method['name']!r} cannot tune {sorted(unknown)}: not fields of its stage")
    for claim in cfg.get("claims", []):
        if claim["a"] not in names or not (claim["b"] in names or _fixed(claim["b"]) and 0 <= claim["b"] <= 1):
            raise ValueError(f"{path}: claim {claim['text']!r} compares unknown methods (b: a method, or a fixed "
                             f"value in [0, 1] such as the paper's figure)")
        metric = claim.get("metric", "accuracy")
        if metric not in CLAIM_METRICS and not metric.startswith("accuracy:"):
            raise ValueError(f"{path}: claim {claim['text']!r}: metric must be one of {CLAIM_METRICS} or "
                             f"accuracy:VARIANT (measured question by question); got {metric!r}")
        if claim.get("expect", "greater") not in ("greater", "less", "equal"):
            raise ValueError(f"{path}: claim {claim['text']!r}: expect must be greater, less or equal")
    return cfg


def study(config_path: str, seeds: list[int] | None = None, report_only: bool = False,
          command: str | None = None, overwrite: bool = False, sweep_only: bool = False) -> dict:
    cfg = {**load_study(config_path), "overwrite": overwrite}  # rerun stages whose settings changed
    if sweep_only:
        if not cfg.get("sweep"):
            raise ValueError(f"{config_path}: the study has no sweep")
        record = run_sweep(cfg)
        print(f"study: chosen on seed {sweep_seed(cfg)}'s validation split: {record.get('chosen')}")
        return record
    unknown = set(seeds or []) - set(cfg["seeds"])
    if unknown:
        raise ValueError(f"{config_path}: seeds {sorted(unknown)} are not the study's seeds {cfg['seeds']}")
    if not report_only:
        for seed in seeds or cfg["seeds"]:
            run_seed(cfg, seed)
    records = load_records(cfg)
    if not records:
        raise FileNotFoundError(f"no seed file in {cfg['outputs']['seeds']}: run a seed first")
    summary = summarize(cfg, records)
    write_results(summary, command or f"aft study {config_path}")
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="aft study", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="Study config (YAML), e.g. configs/study.yaml.")
    parser.add_argument("--seeds", "--seed", type=int, nargs="+", default=None,
                        help="Run only these seeds of the config (each writes its seed file when it finishes).")
    parser.add_argument("--report", action="store_true",
                        help="Only rebuild the summary, claims, tables and plots from the seed files.")
    parser.add_argument("--sweep", action="store_true",
                        help="Only run the sweep (a unit of its own, resumable), writing the sweep file.")
    parser.add_argument("--overwrite", action="store_true", help="Run again the stages whose settings changed.")
    args = parser.parse_args(argv)
    if args.sweep and (args.report or args.seeds):
        parser.error("--sweep runs the sweep alone: not with --report or --seeds")
    # errors: one line from aft.cli.main
    study(args.config, args.seeds, args.report, command=f"aft study {args.config}"
          + (" --report" if args.report else ""), overwrite=args.overwrite, sweep_only=args.sweep)
    return 0
