"""Labels on the arithmetic task: binary correctness, step-verified ranks, and user-given scores."""

from aft.label import label_group
from aft.tasks import load_task

GROUP = {"id": "g", "prompt": "q", "answer": "26",
         "question": "Cleo has 2 marbles. She buys 19 more. Then she buys 5 more. How many marbles does Cleo have now?",
         "completions": ["2 + 19 = 21\n21 + 5 = 26\n#### 26",    # right answer, steps ok
                         "2 + 19 = 20\n20 + 5 = 26\n#### 26",    # right answer, a wrong step
                         "2 + 19 = 21\n21 + 4 = 25\n#### 25",    # wrong answer, steps ok
                         "2 + 19 = 22\n#### 22",                 # wrong answer, wrong step
                         "no idea"],                             # no answer
         "scores": [0.1, 0.2, 0.3, 0.4, 0.5]}


def test_binary_labels():
    labeled = label_group(load_task("arithmetic"), GROUP, "binary")
    assert labeled["labels"] == [1.0, 1.0, 0.0, 0.0, 0.0]


def test_step_verified_ranking_order():
    labeled = label_group(load_task("arithmetic"), GROUP, "steps")
    assert labeled["labels"] == [3.0, 2.0, 1.0, 0.0, 0.0]


def test_field_feedback_takes_user_scores():
    labeled = label_group(load_task("arithmetic"), GROUP, "field", score_field="scores")
    assert labeled["labels"] == [0.1, 0.2, 0.3, 0.4, 0.5]
