"""The built-in offline task: multi-step arithmetic word problems with GSM8K-style worked solutions.

Made for the demo and the tests: no download, any size, and a tiny model (a few million parameters,
minutes of training) can learn it. Every solution line is one checkable step ``a op b = c`` and the
last line is ``#### N``, so answers, extraction and step checks work exactly as for GSM8K::

    Question: Ava has 12 marbles. She finds 7 more. Then she gives 5 to a friend. How many marbles
    does Ava have now?
    Answer: 12 + 7 = 19
    19 - 5 = 14
    #### 14

Variants differ in story and operations so that multi-task training has two tasks to mix: ``"shop"``
(buy / find / give / sell: + and -) and ``"mixed"`` (+, -, * and exact division); ``"shop+mixed"`` draws
each question from either (its ``variant`` field says which, and ``aft eval`` reports accuracy per variant). Difficulty is the
number of steps (``min_steps`` .. ``max_steps``) and the operand size (``max_value``); every value along
the way is a non-negative integer below 1000. Splits "train", "validation" and "test" come from one
``random.Random(seed)`` stream, generated test first (so the test set does not change with
``n_train``). Each split holds the same mix of lengths: its i-th problem has ``min_steps + i % (max_steps -
min_steps + 1)`` steps, so every split is balanced over step counts (drawing the length at random and dropping
repeats would thin out the short problems, of which there are few, in the splits generated last). No problem
appears twice: problems are told apart by their worked solution (the
numbers and operations, ``canonical``), not their text, so a training question that differs from a test
question only in its name or objects does not count as unseen::

    task = load_task("arithmetic", variant="mixed", max_steps=3, seed=1)
    train = task.load("train")
"""

from __future__ import annotations

import random

from aft.tasks.gsm8k import GSM8KTask

CAP = 999  # largest value any step may produce
NAMES = [("Ava", "she"), ("Ben", "he"), ("Cleo", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he")]
PRONOUNS = {"she": {"he": "she", "him": "her", "his": "her"}, "he": {"he": "he", "him": "him", "his": "his"}}

# Per variant: its objects and, per operation, sentences that say it ({n} is the operand).
VARIANTS = {
    "shop": {
        "objects": ["apples", "marbles", "stickers", "coins"],
        "+": ["{he} buys {n} more.", "{he} finds {n} more.", "a friend gives {him} {n} more."],
        "-": ["{he} gives {n} to a friend.", "{he} sells {n}.", "{he} loses {n}."],
    },
    "mixed": {
        "objects": ["cookies", "cards", "pencils", "shells"],
        "+": ["{he} gets {n} more."],
        "-": ["{he} gives away {n}."],
        "*": ["{he} ends up with {n} times as many."],
        "/": ["{he} splits them into {n} equal groups and keeps one group."],
    },
}
SPLITS = {"train": "train", "validation": "validation", "val": "validation", "dev": "validation", "test": "test"}


def canonical(lines: list[str]) -> str:
    """A problem's identity: its worked solution (start value, operations, operands), whatever its story."""
    return "\n".join(lines)


class ArithmeticTask(GSM8KTask):
    name = "arithmetic"
    hub_name = ""  # generated, never downloaded

    def __init__(self, variant: str = "shop", min_steps: int = 2, max_steps: int = 3, max_value: int = 20,
                 seed: int = 0, n_train: int = 2000, n_val: int = 200, n_test: int = 200):
        super().__init__()
        self.variants = variant.split("+")  # "shop+mixed": a multi-task mixture, each question of either
        if not variant or any(v not in VARIANTS for v in self.variants):
            raise ValueError(f"unknown arithmetic variant {variant!r}; choose from {sorted(VARIANTS)} "
                             "or several joined by '+'")
        if not 1 <= min_steps <= max_steps:
            raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps}, {max_steps}")
        if not 2 <= max_value <= CAP:
            raise ValueError(f"max_value must be in [2, {CAP}], got {max_value}")
        self.variant, self.min_steps, self.max_steps, self.max_value = variant, min_steps, max_steps, max_value
        self.seed, self.sizes = seed, {"train": n_train, "validation": n_val, "test": n_test}
        self._splits: dict[str, list[dict]] | None = None

    def load(self, split: str, path=None, limit: int | None = None) -> list[dict]:
        if path is not None:  # a saved or hand-written file, read like GSM8K
            return super().load(split, path, limit)
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose from {sorted(SPLITS)}")
        if self._splits is None:
            self._splits = self._generate()
        examples = self._splits[SPLITS[split]]
        return [dict(example) for example in examples[:limit]]

    def make_example(self, row: dict, split: str, index: int) -> dict:
        example = super().make_example(row, split, index)
        steps = [line for line in example["solution"].rsplit("####", 1)[0].splitlines() if line.strip()]
        return {**example, "variant": row.get("variant", self.variant), "steps": len(steps)}

    def _generate(self) -> dict[str, list[dict]]:
        rng = random.Random(self.seed)
        seen: set[str] = set()
        splits = {}
        for split in ("test", "validation", "train"):
            examples, attempts = [], 0
            while len(examples) < self.sizes[split]:
                attempts += 1
                if attempts > 100 * self.sizes[split] + 1000:
                    raise ValueError(f"cannot make {self.sizes[split]} distinct {split} problems with "
                                     f"max_value={self.max_value}, steps {self.min_steps}..{self.max_steps} "
                                     "(each step count an equal share): raise max_value or min_steps")
                # one variant draws nothing extra, so single-variant splits stay as they were
                variant = rng.choice(self.variants) if len(self.variants) > 1 else self.variant
                steps = self.min_steps + len(examples) % (self.max_steps - self.min_steps + 1)
                question, lines, answer = self._problem(rng, variant, steps)
                if canonical(lines) in seen:
                    continue
                seen.add(canonical(lines))
                examples.append({"id": f"arithmetic-{self.variant}/{split}/{len(examples)}", "question": question,
                                 "answer": str(answer), "solution": "\n".join(lines + [f"#### {answer}"]),
                                 "variant": variant, "steps": len(lines)})
            splits[split] = examples
        return splits

    def _problem(self, rng: random.Random, variant: str, steps: int) -> tuple[str, list[str], int]:
        story = VARIANTS[variant]
        name, pronoun = rng.choice(NAMES)
        thing = rng.choice(story["objects"])
        value = rng.randint(2, self.max_value)
        sentences, lines = [f"{name} has {value} {thing}."], []
        for step in range(steps):
            op, operand = self._operation(rng, value, variant)
            result = {"+": value + operand, "-": value - operand, "*": value * operand, "/": value // operand}[op]
            lines.append(f"{value} {op} {operand} = {result}")
            sentence = rng.choice(story[op]).format(n=operand, **PRONOUNS[pronoun])
            sentences.append(f"Then {sentence}" if step else sentence[0].upper() + sentence[1:])
            value = result
        sentences.append(f"How many {thing} does {name} have now?")
        return " ".join(sentences), lines, value

    def _operation(self, rng: random.Random, value: int, variant: str) -> tuple[str, int]:
        # Only operations that keep the value a positive integer within CAP (so later steps stay possible).
        divisors = [d for d in range(2, 10) if value % d == 0 and value // d >= 1]
        feasible = {"+": value < CAP, "-": value >= 2, "*": value * 2 <= CAP, "/": bool(divisors)}
        op = rng.choice([op for op in "+-*/" if op in VARIANTS[variant] and feasible[op]])
        if op == "+":
            return op, rng.randint(1, min(self.max_value, CAP - value))
        if op == "-":
            return op, rng.randint(1, min(self.max_value, value - 1))
        if op == "*":
            return op, rng.randint(2, min(5, CAP // value))
        return op, rng.choice(divisors)
