"""GSM8K: grade-school math word problems with worked solutions (Cobbe et al. 2021, MIT licence).

Hub: ``openai/gsm8k``, config ``main``, splits train / test. Local JSONL rows are the hub's
``{"question", "answer"}``, the answer a worked solution with ``<<48/2=24>>`` calculator annotations
and a last line ``#### 72``. The SFT target drops the annotations (a model should write "48/2 = 24",
not the calculator call) and ``check_steps`` re-verifies every step the model writes::

    from aft.tasks import load_task
    task = load_task("gsm8k")
    examples = task.load("test", path="../shared/data/gsm8k")
"""

from __future__ import annotations

import re

from aft.tasks.base import Task, check_equations, extract_number, normalize_number, strict_number

_ANNOTATION_RE = re.compile(r"<<[^<>]*>>")


class GSM8KTask(Task):
    name = "gsm8k"
    hub_name = "openai/gsm8k"
    hub_config = "main"

    def make_example(self, row: dict, split: str, index: int) -> dict:
        # "solution" is what ``load`` writes; the hub and the reference files call it "answer".
        solution = row["solution"] if "solution" in row else row["answer"]
        if not isinstance(solution, str) or "####" not in solution:
            raise ValueError("the solution has no final '#### N' line")
        answer = normalize_number(solution.rsplit("####", 1)[1])
        if answer is None:
            raise ValueError(f"no number after '####' in {solution[-40:]!r}")
        return {"id": self.example_id(row, split, index), "question": str(row["question"]).strip(),
                "answer": answer, "solution": solution}

    def reference_cot(self, example: dict) -> str:
        body = _ANNOTATION_RE.sub("", example["solution"].rsplit("####", 1)[0])
        lines = [line.rstrip() for line in body.strip().splitlines() if line.strip()]
        return " " + "\n".join(lines + [f"#### {example['answer']}"])

    def parse_answer(self, text: str, match: str = "flexible", example: dict | None = None) -> str | None:
        return strict_number(text) if match == "strict" else extract_number(text)

    def check_steps(self, text: str) -> tuple[int, int]:
        return check_equations(text)
