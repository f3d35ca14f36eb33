"""ECQA: CommonsenseQA questions with human explanations (Aggarwal et al. 2021, "Explanations for
CommonsenseQA", ACL; CDLA-Sharing-1.0; https://github.com/dair-iitd/ECQA-Dataset).

Hub: ``yangdong/ecqa`` (default config; splits train / validation / test), the ECQA release's own
columns: ``q_no``, ``q_concept``, ``q_text``, ``q_op1`` .. ``q_op5``, ``q_ans`` (the answer *text*,
one of the options), ``taskA_pos`` / ``taskA_neg`` (positive / negative property sentences) and
``taskB`` (the free-flow explanation). Local JSONL rows use the same fields. The gold answer is the
letter of ``q_ans`` among the options; the SFT target is the free-flow explanation (the positive
properties where it is empty), then "The answer is X"::

    task = load_task("ecqa")
    examples = task.load("validation")          # needs network and `datasets`
"""

from __future__ import annotations

from aft.tasks.aqua import LETTERS, AQuATask


class ECQATask(AQuATask):
    """Same multiple-choice prompt, reference and letter extraction as AQuA; its own fields."""

    name = "ecqa"
    hub_name = "yangdong/ecqa"
    hub_config = None
    hub_splits = {"dev": "validation"}
    cot_field = "explanation"

    def make_example(self, row: dict, split: str, index: int) -> dict:
        options = [str(row[f"q_op{number}"]).strip() for number in range(1, 6)]
        gold = str(row["q_ans"]).strip()
        if gold in options:
            answer = LETTERS[options.index(gold)]
        elif gold.upper() in LETTERS and len(gold) == 1:  # some copies store the letter itself
            answer = gold.upper()
        else:
            raise ValueError(f"q_ans {gold!r} is not one of the options")
        explanation = (row.get("taskB") or "").strip() or (row.get("taskA_pos") or "").strip()
        if not explanation:
            raise ValueError("no explanation (taskB or taskA_pos)")
        example_id = str(row["q_no"]) if row.get("q_no") is not None else self.example_id(row, split, index)
        return {"id": example_id, "question": str(row["q_text"]).strip(), "answer": answer,
                "options": options, "explanation": explanation, "concept": row.get("q_concept")}
