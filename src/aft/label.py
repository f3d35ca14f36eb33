"""``aft label``: feedback on sampled chains of thought, written back into the groups.

- ``binary``: label 1 when the final answer is right, else 0 (the paper's main setting).
- ``steps``: step-verified ranking for math. Each COT gets a rank from its answer and its checkable steps
  (the built-in task's ``a op b = c`` lines, GSM8K's ``<<a*b=c>>`` annotations)::

      3  right answer, every checked step holds
      2  right answer, a wrong step            (outcome-only labels would count it as good as 3)
      1  wrong answer, every checked step holds
      0  wrong answer and a wrong step, or no answer at all

- ``field``: graded scores the user supplies per completion in ``score_field`` (a judge or reward model).

Every labelled group also gets ``correct`` (answer right: the positives the NLL term may train on) and
``predictions`` (the extracted answers). Answers are read ``flexible``-ly by default (``answer_match``): a
right answer in another format ("The answer is 18.", "**18**", "(B)", the option's text) still marks a right
chain of thought; ``strict`` accepts only the task's own format (``#### 18``, "The answer is B"). Groups with
no positive or no negative are kept (they still feed the NLL term) and counted.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from aft.checks import check_choice, check_config
from aft.data import DataError, load_groups, write_jsonl
from aft.tasks.base import ANSWER_MATCHES
from aft.provenance import OutputFields, claim

FEEDBACK = ("binary", "steps", "field")


@dataclass
class LabelConfig(OutputFields):
    """Label the groups written by ``aft sample``."""

    task: str = field(default="arithmetic", metadata={"help": "Task whose answer checker labels the COTs."})
    groups: str = field(default="samples.jsonl", metadata={"help": "Groups JSONL from `aft sample`."})
    output: str = field(default="labeled.jsonl", metadata={"help": "Labelled groups JSONL to write."})
    feedback: str = field(default="binary", metadata={"help": f"One of {', '.join(FEEDBACK)}."})
    score_field: str = field(default="scores", metadata={"help": "With --feedback field: the per-completion "
                                                                   "score list in each group."})
    answer_match: str = field(default="flexible", metadata={
        "help": "How answers are read: flexible (also 'The answer is 18.', '**18**', '(B)', the option's text) or "
                "strict (only the task's own format: '#### 18', 'The answer is B')."})

    def __post_init__(self):
        check_config(self)
        check_choice("feedback", self.feedback, FEEDBACK)
        check_choice("answer_match", self.answer_match, ANSWER_MATCHES)


def step_rank(task, text: str, example, match: str = "flexible") -> int:
    """The step-verified rank (0 to 3) of one COT; see the module docstring."""
    right = task.is_correct(text, example, match)
    _, wrong_steps = task.check_steps(text)
    return 2 * int(right) + int(wrong_steps == 0 and (right or task.extract_answer(text, match, example) is not None))


def label_group(task, group: dict, feedback: str, score_field: str = "scores", match: str = "flexible") -> dict:
    texts = group["completions"]  # the group carries the example's fields ("answer", "question", "options")
    correct = [task.is_correct(t, group, match) for t in texts]
    if feedback == "binary":
        labels = [float(c) for c in correct]
    elif feedback == "steps":
        labels = [float(step_rank(task, t, group, match)) for t in texts]
    else:
        labels = [float(x) for x in group[score_field]]
    return {**group, "labels": labels, "correct": correct,
            "predictions": [task.extract_answer(t, match, group) for t in texts]}


def label(config: LabelConfig) -> str:
    """Run the labelling stage; returns the path of the labelled groups file."""
    from aft.tasks import load_task

    task = load_task(config.task)
    groups, _ = load_groups(config.groups, require_labels=False)
    for g in groups:
        if "answer" not in g:
            raise DataError(f"{config.groups}: group {g['id']!r} has no 'answer' to check against")
        if config.feedback == "field" and len(g.get(config.score_field, [])) != len(g["completions"]):
            raise DataError(f"{config.groups}: group {g['id']!r} needs one '{config.score_field}' per completion")
    claim("label", config)
    out, report = [], Counter()
    for g in groups:
        g = label_group(task, g, config.feedback, config.score_field, config.answer_match)
        out.append(g)
        report["groups"] += 1
        report["completions"] += len(g["completions"])
        report["positives"] += sum(g["correct"])
        if not any(g["correct"]):
            report["groups with no positive"] += 1
        elif all(g["correct"]):
            report["groups with no negative"] += 1
        else:
            report["mixed groups"] += 1
    write_jsonl(config.output, out)
    report["no answer extracted"] = sum(p is None for g in out for p in g["predictions"])
    print("label: " + ", ".join(f"{k} {v}" for k, v in report.items()))
    return config.output
