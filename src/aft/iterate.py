"""``aft iterate CONFIG.yaml``: R rounds of sample -> label -> align, each round sampling from the model the
previous round trained (iterative AFT; with ``align: {loss: rft}``, iterated rejection-sampling fine-tuning).

The config is an ``aft run`` config (run_dir, defaults, optional ``stages`` that run first, e.g. VFT) plus the
rounds. It expands into plain pipeline stages, one folder per round (``run_dir/round2/samples``, ...), so a
stopped run continues from the first stage that did not finish, as ``aft run`` does::

    run_dir: runs/iterate
    defaults: {task: gsm8k, seed: 0}
    stages: [{name: vft, stage: sft, model: meta-llama/Llama-2-7b-hf, num_train_epochs: 3}]
    start: vft                  # the model round 1 samples from (a stage name or a folder)
    rounds: 3
    questions_per_round: 1000   # training questions sampled each round
    fresh_questions: true       # round r takes questions [(r-1)N, rN); false: the same N every round
    restart: previous           # previous: round r trains round r-1's model on round r's groups;
                                # start: round r trains the start model on the union of rounds 1..r's groups
    sample: {k: 8, temperature: 0.8}
    label: {feedback: binary}
    align: {loss: aft, constraint: boundary, beta: 0.05}
    eval: {split: test}         # optional: evaluate every round's model

``run_dir/budget.json`` counts what each round cost: completions sampled, optimizer steps, seconds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from aft.checks import AftError, UsageError
from aft.provenance import OutputFields, claim

RESTART = ("previous", "start")
ROUND_KEYS = ("start", "rounds", "questions_per_round", "fresh_questions", "restart", "sample", "label", "align",
              "eval")


@dataclass
class MergeConfig(OutputFields):
    """Union of labelled group files: a question's groups from several rounds become one group."""

    inputs: list[str] = field(default_factory=list, metadata={"help": "Labelled groups JSONL files."})
    output: str = field(default="groups.jsonl", metadata={"help": "Merged groups JSONL to write."})

    def __post_init__(self):
        if not self.inputs or not all(isinstance(path, str) and path for path in self.inputs):
            raise AftError(f"inputs: a list of one or more groups files; got {self.inputs!r}")


def merge(config: MergeConfig) -> str:
    """Merge groups by id in first-seen order: completions (de-duplicated as `aft sample` does) with their
    labels and correctness concatenated; the other fields come from the first group of that id."""
    from aft.data import load_groups, write_jsonl

    read = [load_groups(path)[0] for path in config.inputs]
    claim("merge", config)
    merged: dict[str, dict] = {}
    for groups in read:
        for group in groups:
            into = merged.setdefault(group["id"], {**group, "completions": [], "labels": [], "correct": []})
            seen = {" ".join(t.split()) for t in into["completions"]}
            for i, text in enumerate(group["completions"]):
                if " ".join(text.split()) in seen:
                    continue
                into["completions"].append(text)
                into["labels"].append(group["labels"][i])
                into["correct"].append(group.get("correct", group["labels"])[i])
    write_jsonl(config.output, list(merged.values()))
    print(f"merge: {len(merged)} groups from {len(config.inputs)} files")
    return config.output


def round_stages(start: str, rounds: int, per_round: int | None, fresh_questions: bool, restart: str, sample: dict,
                 label: dict, align: dict, evaluation: dict | None = None, seed: int = 0, prefix: str = "",
                 first_groups: str | None = None) -> list[dict]:
    """The pipeline stages of ``rounds`` rounds, named ``{prefix}round{r}/samples`` (``labeled``, ``union``,
    ``align``, ``eval``); the last round's model is ``{prefix}round{rounds}/align``. ``first_groups``: labelled
    groups (a stage name) that round 1 trains on instead of sampling its own (a study's shared samples)."""
    stages, model, labeled = [], start, []
    for r in range(1, rounds + 1):
        name = f"{prefix}round{r}"
        if r == 1 and first_groups:
            labeled.append(first_groups)
        else:
            questions = {"split": "train"}
            if per_round is not None:
                offset = (r - 1) * per_round if fresh_questions else 0
                questions.update(limit=per_round, offset=offset)
            # each round its own sampling seed, so a round that samples the same questions does not redraw
            # the same noise
            stages.append({**sample, **questions, "name": f"{name}/samples", "stage": "sample", "model": model,
                           "seed": seed + r - 1})
            stages.append({**label, "name": f"{name}/labeled", "stage": "label", "groups": f"{name}/samples"})
            labeled.append(f"{name}/labeled")
        groups = labeled[-1]
        if restart == "start" and r > 1:
            stages.append({"name": f"{name}/union", "stage": "merge", "inputs": list(labeled)})
            groups = f"{name}/union"
        stages.append({**align, "name": f"{name}/align", "stage": "align",
                       "model": model if restart == "previous" else start, "groups": groups})
        model = f"{name}/align"
        if evaluation is not None:
            stages.append({**evaluation, "name": f"{name}/eval", "stage": "eval", "model": model})
    return stages


def expand(cfg: dict) -> dict:
    """The ``aft run`` config of an iterate config: its own stages, then each round's stages."""
    unknown = set(cfg) - set(ROUND_KEYS) - {"run_dir", "defaults", "stages"}
    if unknown:
        raise AftError(f"unknown key(s) {sorted(unknown)}; an iterate config has run_dir, defaults, stages and "
                       f"{', '.join(ROUND_KEYS)}")
    rounds, per_round = cfg.get("rounds"), cfg.get("questions_per_round")
    if not isinstance(rounds, int) or rounds < 1:
        raise AftError(f"rounds must be a positive integer; got {rounds!r}")
    if per_round is not None and (not isinstance(per_round, int) or per_round < 1):
        raise AftError(f"questions_per_round must be a positive integer; got {per_round!r}")
    restart = cfg.get("restart", "previous")
    if restart not in RESTART:
        raise AftError(f"restart must be one of {RESTART}; got {restart!r}")
    if not cfg.get("start"):
        raise AftError("start: the model round 1 samples from (a stage name or a model folder)")
    seed = int(cfg.get("defaults", {}).get("seed", 0))
    stages = list(cfg.get("stages") or []) + round_stages(
        cfg["start"], rounds, per_round, cfg.get("fresh_questions", True), restart, cfg.get("sample") or {},
        cfg.get("label") or {}, cfg.get("align") or {}, cfg.get("eval"), seed)
    return {"run_dir": cfg.get("run_dir", "runs/iterate"), "defaults": cfg.get("defaults", {}), "stages": stages}


def budget(run_dir: Path, rounds: int) -> dict:
    """What each round cost, read from its files: completions sampled, optimizer steps, seconds per stage."""
    from aft.pipeline import stage_seconds
    from aft.sample import completions_sampled

    seconds, out = stage_seconds(run_dir), {}
    for r in range(1, rounds + 1):
        folder = run_dir / f"round{r}"
        state = json.loads((folder / "align" / "trainer_state.json").read_text())
        out[f"round{r}"] = {"questions": sum(1 for _ in (folder / "samples" / "groups.jsonl").open()),
                            "completions_sampled": completions_sampled(folder / "samples" / "groups.jsonl"),
                            "optimizer_steps": state["global_step"],
                            "seconds": {k.split("/", 1)[1]: v for k, v in seconds.items()
                                        if k.startswith(f"round{r}/")}}
    out["total"] = {key: sum(v[key] for v in out.values()) for key in ("completions_sampled", "optimizer_steps")}
    return out


def iterate(config_path: str, overwrite: bool = False) -> Path:
    """Run (or continue) the rounds of an iterate config; returns the run directory. A finished stage whose
    settings changed stops the run, naming them; ``overwrite`` runs it (and what it feeds) again."""
    from aft.cli import _read_config_file
    from aft.pipeline import run_config

    cfg = _read_config_file(config_path)
    run_dir = run_config(expand(cfg), overwrite)
    spent = budget(run_dir, cfg["rounds"])
    (run_dir / "budget.json").write_text(json.dumps(spent, indent=2) + "\n")
    print(f"[aft iterate] {cfg['rounds']} rounds: {spent['total']['completions_sampled']} completions sampled, "
          f"{spent['total']['optimizer_steps']} optimizer steps; {run_dir / 'budget.json'}")
    return run_dir


def main(argv) -> int:
    overwrite = "--overwrite" in argv
    argv = [a for a in argv if a != "--overwrite"]
    if argv and argv[0] in ("-h", "--help"):
        print("usage: aft iterate CONFIG.yaml [--overwrite]\n\n" + (__doc__ or ""))
        return 0
    if len(argv) != 1:
        raise UsageError("usage: aft iterate CONFIG.yaml [--overwrite]")
    iterate(argv[0], overwrite)
    return 0
