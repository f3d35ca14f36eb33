"""AQuA-RAT: algebra word problems with five options and a written rationale (Ling et al. 2017, Apache-2.0).

Hub: ``deepmind/aqua_rat``, config ``raw``, splits train / validation / test (we also accept "dev",
the name the reference files use). Rows: ``{"question", "options": ["A)21", ...], "rationale",
"correct": "A"}``. The gold answer is the letter; the SFT target is the rationale ending in a line
"The answer is X". Rationales are free-form algebra, so there are no checkable steps::

    task = load_task("aqua")
    examples = task.load("dev", path="../shared/data/aqua")
"""

from __future__ import annotations

import re

from aft.tasks.base import Task, answer_line_cot, extract_letter, format_options, strict_letter

LETTERS = "ABCDE"


class AQuATask(Task):
    name = "aqua"
    hub_name = "deepmind/aqua_rat"
    hub_config = "raw"
    hub_splits = {"dev": "validation"}
    cot_field = "rationale"  # where the worked explanation sits (ECQA, a subclass, calls it "explanation")

    def make_example(self, row: dict, split: str, index: int) -> dict:
        options = [_strip_letter(option, letter) for option, letter in zip(row["options"], LETTERS)]
        if len(options) != len(row["options"]) or len(options) < 2:
            raise ValueError(f"expected 2 to 5 options, got {len(row['options'])}")
        answer = str(row["correct"]).strip().strip("()").upper()
        if answer not in LETTERS[: len(options)]:
            raise ValueError(f"'correct' is {row['correct']!r}, not one of the option letters")
        return {"id": self.example_id(row, split, index), "question": str(row["question"]).strip(),
                "answer": answer, "options": options, "rationale": str(row["rationale"])}

    def format_prompt(self, example: dict) -> str:
        return format_options(example["question"], example["options"])

    def reference_cot(self, example: dict) -> str:
        return answer_line_cot(example[self.cot_field], example["answer"])

    def parse_answer(self, text: str, match: str = "flexible", example: dict | None = None) -> str | None:
        if match == "strict":
            return strict_letter(text, LETTERS)
        return extract_letter(text, LETTERS, (example or {}).get("options"))


def _strip_letter(option: str, letter: str) -> str:
    # "A)21" -> "21"; an option already without its letter (our own output) is kept as it is.
    return re.sub(rf"^\(?{letter}\s*\)\s*", "", str(option).strip())
