"""``aft eval``: task accuracy (greedy), majority-vote accuracy, and assessment accuracy.

*Assessment accuracy* (A-accuracy, METHOD.md) asks whether the model ranks its own reasoning the right
way: over a labelled set of sampled COTs, the fraction of (better, worse) pairs of the same question whose
scores the model orders correctly, ``s_better > s_worse`` (a tie counts one half). The scores are the
length-normalised log-likelihoods of ``aft.scoring``, the same quantity AFT trains.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from aft.checks import check_config, require
from aft.data import SFTCollator, encode_completion, encode_prompt, load_groups, positives, write_jsonl
from aft.losses import pair_mask
from aft.generation import GenerationFields, dtype_name, for_generation, generation_dtype, plan_calls
from aft.generation import generate as generate_batch
from aft.models import ModelFields, load_model, load_tokenizer, usable_length
from aft.provenance import OutputFields, claim
from aft.scoring import completion_logprobs, sequence_scores
from aft.tasks import TaskFields


@dataclass
class EvalConfig(OutputFields, ModelFields, TaskFields, GenerationFields):
    """Evaluate a model on a task split (and, given labelled groups, its assessment accuracy)."""

    split: str = field(default="test", metadata={"help": "Split to evaluate on."})  # not train, as elsewhere
    output: str = field(default="eval.json", metadata={"help": "JSON file for the metrics."})
    max_new_tokens: int = field(default=256, metadata={"help": "Longest completion in tokens."})
    batch_size: int = field(default=0, metadata={
        "help": "Most questions per batch; 0: as many as --batch_tokens allows."})
    vote_samples: int = field(default=0, metadata={"help": "Samples per question for majority voting (0: off)."})
    vote_temperature: float = field(default=0.8, metadata={"help": "Temperature of the voting samples."})
    groups: str | None = field(default=None, metadata={
        "help": "Labelled groups JSONL on which to measure assessment accuracy (e.g. test-question samples)."})
    max_length: int = field(default=512, metadata={"help": "Longest sequence scored for assessment accuracy."})
    seed: int = field(default=0, metadata={"help": "Seed of the voting samples."})

    def __post_init__(self):
        check_config(self)


def generate_all(model, tokenizer, prompts, k=1, temperature=0.0, max_new_tokens=256, batch_size=32, seed=0,
                 desc="generate", batch_tokens=GenerationFields.batch_tokens):
    """``generate_batch`` over many prompts, in length-sorted calls sized by tokens, with a progress bar."""
    out = [None] * len(prompts)
    with tqdm(total=len(prompts), desc=desc, unit="q") as bar:
        for batch in plan_calls(tokenizer, prompts, batch_size, k, max_new_tokens, batch_tokens):
            texts = generate_batch(model, tokenizer, [prompts[i] for i in batch], k, temperature,
                                   max_new_tokens=max_new_tokens, seed=seed, batch_tokens=batch_tokens,
                                   progress=bar.update)
            for i, t in zip(batch, texts):
                out[i] = t
    return out


def majority(answers):
    """Most common extracted answer (ties: the first seen); None when nothing was extracted."""
    counts = Counter(a for a in answers if a is not None)
    return max(counts, key=lambda a: (counts[a], -answers.index(a))) if counts else None


@torch.no_grad()
def score_groups(model, tokenizer, groups, max_length=512, batch_size=16):
    """Every candidate's score s(c) under ``model``: a list of float lists, one per group (None: too long)."""
    model.eval()
    flat = [(g, k) for g, group in enumerate(groups) for k in range(len(group["completions"]))]
    scores = [[None] * len(group["completions"]) for group in groups]
    prompts = [encode_prompt(tokenizer, group["prompt"]) for group in groups]
    usable = []
    for g, k in flat:
        ids = encode_completion(tokenizer, groups[g]["completions"][k])
        if len(prompts[g]) + len(ids) <= max_length:
            usable.append((g, k, ids))
    device = next(model.parameters()).device
    collate = SFTCollator(tokenizer.pad_token_id)
    for start in tqdm(range(0, len(usable), batch_size), desc="score", unit="batch"):
        chunk = usable[start:start + batch_size]
        batch = collate([{"prompt_ids": prompts[g], "completion_ids": ids} for g, _, ids in chunk])
        sums, counts = completion_logprobs(model, **{k: v.to(device) for k, v in batch.items()})
        for (g, k, _), s in zip(chunk, sequence_scores(sums, counts).tolist()):
            scores[g][k] = s
    return scores


def assessment_accuracy(groups, scores) -> dict:
    """A-accuracy and mean scores of positives and negatives, from labelled groups and their scores."""
    ordered = ties = total = 0
    pos, neg = [], []
    for group, s in zip(groups, scores):
        keep = [k for k, v in enumerate(s) if v is not None]
        if not keep:
            continue
        sc = torch.tensor([[s[k] for k in keep]], dtype=torch.float64)
        lab = torch.tensor([[float(group["labels"][k]) for k in keep]])
        pairs = pair_mask(lab)[0]
        diff = sc[0].unsqueeze(1) - sc[0].unsqueeze(0)
        ordered += int(((diff > 0) & pairs).sum())
        ties += int(((diff == 0) & pairs).sum())
        total += int(pairs.sum())
        is_pos = positives({**group, "labels": [group["labels"][k] for k in keep],
                            **({"correct": [group["correct"][k] for k in keep]} if "correct" in group else {})})
        pos += [s[k] for k, p in zip(keep, is_pos) if p]
        neg += [s[k] for k, p in zip(keep, is_pos) if not p]
    mean = lambda xs: sum(xs) / len(xs) if xs else None  # noqa: E731
    return {"assessment_accuracy": (ordered + 0.5 * ties) / total if total else None, "pairs": total,
            "score_positive": mean(pos), "score_negative": mean(neg)}


def answer_metrics(task, texts, examples):
    """Accuracy with answers read two ways, as lm-evaluation-harness reports GSM8K: ``accuracy_strict`` (only
    the task's own format, ``#### 18`` / "The answer is B") and ``accuracy_flexible`` (also "The answer is
    18.", "**18**", the last number, "(B)", the option's text; ``accuracy`` is this one), and
    ``no_answer_rate``, the share of texts with no answer even read flexibly.
    Returns ``(metrics, flexible correctness per text, strict correctness per text)``."""
    strict = [task.is_correct(t, e, "strict") for t, e in zip(texts, examples)]
    flexible = [task.is_correct(t, e, "flexible") for t, e in zip(texts, examples)]
    no_answer = sum(task.extract_answer(t, "flexible", e) is None for t, e in zip(texts, examples))
    share = (lambda n: n / len(texts)) if texts else (lambda n: None)
    metrics = {"questions": len(texts), "accuracy": share(sum(flexible)), "accuracy_strict": share(sum(strict)),
               "accuracy_flexible": share(sum(flexible)), "no_answer": no_answer, "no_answer_rate": share(no_answer)}
    return metrics, flexible, strict


def task_accuracy(model, tokenizer, task, examples, max_new_tokens=256, batch_size=32, desc="eval greedy",
                  batch_tokens=GenerationFields.batch_tokens):
    """Greedy-decoding accuracy on ``examples`` (strict and flexible, see ``answer_metrics``), and one record per
    question.

    Where the examples carry a ``variant`` or ``steps`` field with more than one value (a multi-task mixture,
    problems of several lengths), the accuracy per value is reported too (``accuracy_by_variant``, ...)."""
    prompts = [task.format_prompt(e) for e in examples]
    greedy = generate_all(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, desc=desc,
                          batch_tokens=batch_tokens)
    metrics, correct, strict = answer_metrics(task, [t[0] for t in greedy], examples)
    for key in ("variant", "steps"):
        values = sorted({e[key] for e in examples if key in e}, key=str)
        if len(values) > 1:
            metrics[f"accuracy_by_{key}"] = {
                str(v): sum(c for c, e in zip(correct, examples) if e.get(key) == v) / sum(e.get(key) == v for e in examples)
                for v in values}
    records = [{"id": e["id"], "answer": e["answer"], "greedy": t[0], "correct": c, "correct_strict": c_strict}
               for e, t, c, c_strict in zip(examples, greedy, correct, strict)]
    return metrics, records


def held_out_metrics(model, tokenizer, task, examples, groups=None, max_new_tokens=256, max_length=512,
                     batch_size=32) -> dict:
    """Accuracy on held-out questions and, given labelled groups, assessment accuracy: what the training
    stages log at each evaluation (early stopping, curves of accuracy against step)."""
    was_training = model.training
    model.eval()
    with torch.no_grad():
        metrics, _ = task_accuracy(model, tokenizer, task, examples, max_new_tokens, batch_size, desc="held-out")
        if groups:
            metrics.update(assessment_accuracy(groups, score_groups(model, tokenizer, groups, max_length)))
    model.train(was_training)
    return metrics


def evaluate(config: EvalConfig) -> dict:
    """Run the evaluation stage; writes ``config.output`` (metrics) and ``predictions.jsonl`` beside it."""
    require(config, "model")
    task, examples = config.load_examples()
    groups = load_groups(config.groups)[0] if config.groups else None
    out = Path(config.output)
    claim("eval", config, also=(out.with_name("predictions.jsonl"), out.with_name("scores.jsonl")))
    tokenizer = load_tokenizer(config.tokenizer or config.model, config.trust_remote_code)
    model = load_model(config.model, config.model_dtype, config.trust_remote_code).eval()
    # generation in its own dtype; a converted copy where the model's own dtype is still needed for scoring
    dtype = generation_dtype(config.gen_dtype)
    generator = for_generation(model, dtype, keep=bool(config.groups))
    accuracy, records = task_accuracy(generator, tokenizer, task, examples, config.max_new_tokens, config.batch_size,
                                      batch_tokens=config.batch_tokens)
    # what `auto` resolved to on this machine: the outputs depend on it, the settings say only "auto"
    metrics = {"model": config.model, "task": config.task, "split": config.split,
               "gen_dtype": dtype_name(dtype), **accuracy}
    if config.vote_samples > 0:
        prompts = [task.format_prompt(e) for e in examples]
        votes = generate_all(generator, tokenizer, prompts, k=config.vote_samples, temperature=config.vote_temperature,
                             max_new_tokens=config.max_new_tokens, batch_size=-(-config.batch_size //
                                                                                config.vote_samples),
                             seed=config.seed, desc="eval vote", batch_tokens=config.batch_tokens)
        answers = [[task.extract_answer(t, "flexible", e) for t in ts] for ts, e in zip(votes, examples)]
        # judge the majority answer through one of the COTs that gave it, so each task's own checker decides
        winners = [ts[a.index(majority(a))] if majority(a) is not None else "" for ts, a in zip(votes, answers)]
        metrics["vote_accuracy"] = sum(task.is_correct(t, e) for t, e in zip(winners, examples)) / len(examples)
        metrics["vote_samples"] = config.vote_samples
    del generator
    if groups:
        scores = score_groups(model, tokenizer, groups, usable_length(config.max_length, model))
        metrics.update(assessment_accuracy(groups, scores))
        _write_scores(out.with_name("scores.jsonl"), groups, scores)
    write_jsonl(out.with_name("predictions.jsonl"), records)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, out)
    print(json.dumps(metrics, indent=2))
    return metrics


def _write_scores(path: Path, groups, scores):
    """One line per candidate: its group, label, correctness and score (what `aft report` plots)."""
    with path.open("w", encoding="utf-8") as f:
        for group, s in zip(groups, scores):
            for k, v in enumerate(s):
                f.write(json.dumps({"id": group["id"], "label": group["labels"][k],
                                    "correct": bool(group.get("correct", group["labels"])[k]), "score": v}) + "\n")
