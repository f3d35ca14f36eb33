"""Strict and flexible answer matching on outputs written the way models write them (not only on the
reference solutions): GSM8K's `#### N` against "The answer is 18.", "**18**", "$18.00", "3/4", LaTeX boxes;
AQuA/ECQA's "The answer is B" against "(B)", "B)", "answer is b", the option's own text. Then the metrics
`aft eval` reports from them, and `aft label --answer_match`."""

import json

import pytest

from aft.evaluate import answer_metrics
from aft.label import LabelConfig, label
from aft.tasks import load_task
from aft.tasks.base import answers_equal, extract_number, normalize_number

# (model output, gold, right when read strictly, right when read flexibly)
GSM8K_OUTPUTS = [
    # the format the references end with: both accept it
    (" Janet's ducks lay 16 eggs. She eats 3 and bakes with 4: 16 - 3 - 4 = 9.\nShe sells 9 * $2 = $18.\n#### 18",
     "18", True, True),
    (" 9 * 2 = 18\n#### $18.00", "18", True, True),
    (" The total is 1,000 + 250 = 1,250 dollars.\n#### 1,250", "1250", True, True),
    # right answers in other formats: only the flexible reading counts them
    (" She sells 16 - 3 - 4 = 9 eggs at $2 each, so she makes 9 * 2 = 18 dollars.\nThe answer is 18.", "18",
     False, True),
    (" Let's think step by step. 16 - 3 - 4 = 9 eggs. 9 x $2 = $18.\nA: 18", "18", False, True),
    ("Step 1: 16 - 3 - 4 = 9\nStep 2: 9 * 2 = 18\n\n**18**", "18", False, True),
    (" She makes $18 every day.", "18", False, True),                       # units: the last number
    (" The temperature drops from 5 to 5 - 8 = -3 degrees.\nFinal answer: -3", "-3", False, True),
    (" 3 of the 4 slices are eaten, so 3/4 of the pizza is gone.\nThe answer is 3/4", "0.75", False, True),
    (" So the discount is 18%.", "18", False, True),
    (" Therefore the answer is $\\boxed{\\frac{1}{2}}$.", "0.5", False, True),   # LaTeX, judged by math-verify
    (" 18.00 dollars in all", "18", False, True),
    (" 2 + 3 = 5. The answer is 5.\n\nQuestion: Tom has 7 pens. How many pens?\nAnswer: 7", "5", False, True),
    # what follows a new "Question:" is the model inventing the next example: neither reading looks there
    (" 2 + 3 = 5. The answer is 5.\nQuestion: Tom has 7 pens. How many pens?\nAnswer: 7\n#### 7", "5", False, True),
    (" 2 + 3 = 5.\nQuestion: Tom has 7 pens. How many pens?\nAnswer: 7\n#### 7", "7", False, False),
    # wrong, or no answer at all: neither counts them
    (" She sells 16 - 3 = 13 eggs, 13 * 2 = 26.\n#### 26", "18", False, False),
    (" The answer is 17, not 18? No: the answer is 17.", "18", False, False),  # the first answer phrase wins
    (" I am not sure how to solve this problem.", "18", False, False),
    (" #### eighteen", "18", False, False),
]


@pytest.mark.parametrize("text, gold, strict, flexible", GSM8K_OUTPUTS)
def test_gsm8k_strict_and_flexible(text, gold, strict, flexible):
    task = load_task("gsm8k")
    assert task.is_correct(text, {"answer": gold}, "strict") is strict
    assert task.is_correct(text, {"answer": gold}, "flexible") is flexible
    assert task.is_correct(text, {"answer": gold}) is flexible  # flexible is the default


def test_arithmetic_reads_answers_as_gsm8k_does():
    task = load_task("arithmetic")
    example = task.load("test", limit=1)[0]
    answer = example["answer"]
    assert task.is_correct(task.reference_cot(example), example, "strict")
    assert not task.is_correct(f" So the result is {answer}.", example, "strict")
    assert task.is_correct(f" So the result is {answer}.", example, "flexible")


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"), ("The answer is 3/4.", "0.75"), ("The answer is 1/3", "1/3"), ("**42** apples", "42"),
    ("\\boxed{$1,200$}", "1200"), ("Answer: 12 \nQuestion: what is 2 + 2?\nAnswer: 4", "12"),
    ("on 3/4/2020 she paid 7", "7"),                                            # a date is not a fraction
])
def test_extract_number_formats(text, expected):
    assert extract_number(text) == expected


def test_answers_equal_compares_values_not_strings():
    assert answers_equal("1250", "1250.0") and answers_equal("0.75", "0.75")
    assert answers_equal("1/2", "0.5") and answers_equal("\\frac{3}{4}", "0.75")
    assert not answers_equal("1/3", "0.33") and not answers_equal("19", "18")
    assert answers_equal("b", "B") and not answers_equal("A", "B")
    assert normalize_number("3/4") == "0.75" and normalize_number("-6/4") == "-1.5" and normalize_number("1/0") is None


AQUA = {"answer": "C", "options": ["400", "500", "600", "700", "800"]}
ECQA = {"answer": "B", "options": ["bank", "church", "new york", "new york city", "library"]}

# (model output, example, right when read strictly, right when read flexibly)
CHOICE_OUTPUTS = [
    (" 20% of 3000 is 600.\nThe answer is C", AQUA, True, True),
    (" 20% of 3000 is 600.\nThe answer is (C).", AQUA, True, True),
    (" 20% of 3000 = 600, which is option (C)\n(C)", AQUA, False, True),
    (" 3000 * 0.2 = 600\nC) 600", AQUA, False, True),
    (" so the answer is c.", AQUA, False, True),           # strict wants the letter as written: upper case
    (" Answer: C", AQUA, False, True),
    (" 3000 * 0.2 = 600. The answer is 600.", AQUA, False, True),      # the option's text instead of its letter
    (" The answer is $600", AQUA, False, True),
    (" Hence the required value is 600", AQUA, False, True),          # the last line names the option's number
    (" 3000 * 0.2 = 500. The answer is B", AQUA, False, False),
    (" 3000 * 0.2 = 600\n(C)\nQuestion: 2 + 2?\nThe answer is B", AQUA, False, True),
    (" The answer is 650.", AQUA, False, False),                       # a number no option has
    (" People pray in a church.\nThe answer is B", ECQA, True, True),
    (" People go to a church to pray. So the answer is church.", ECQA, False, True),
    (" The answer is church, since people pray there.", ECQA, False, True),
    (" the answer is a bank", ECQA, False, False),                     # "a" the article, then a wrong option
    (" The answer is New York City", dict(ECQA, answer="D"), False, True),  # the longest option that fits
    (" The answer is new york", dict(ECQA, answer="C"), False, True),
]


@pytest.mark.parametrize("text, example, strict, flexible", CHOICE_OUTPUTS)
@pytest.mark.parametrize("name", ["aqua", "ecqa"])
def test_multiple_choice_strict_and_flexible(name, text, example, strict, flexible):
    task = load_task(name)
    assert task.is_correct(text, example, "strict") is strict
    assert task.is_correct(text, example, "flexible") is flexible


def test_answer_match_is_checked():
    with pytest.raises(ValueError, match="strict"):
        load_task("gsm8k").is_correct("#### 1", {"answer": "1"}, "loose")


def test_answer_metrics_counts_strict_flexible_and_no_answer():
    task = load_task("gsm8k")
    texts = [" 9 * 2 = 18\n#### 18", " The answer is 18.", " #### 17", " no idea"]
    metrics, flexible, strict = answer_metrics(task, texts, [{"answer": "18"}] * 4)
    assert strict == [True, False, False, False] and flexible == [True, True, False, False]
    assert metrics["accuracy_strict"] == 0.25 and metrics["accuracy_flexible"] == metrics["accuracy"] == 0.5
    assert metrics["no_answer"] == 1 and metrics["no_answer_rate"] == 0.25


@pytest.mark.parametrize("match, labels", [("flexible", [1.0, 1.0, 0.0]), ("strict", [1.0, 0.0, 0.0])])
def test_label_answer_match(tmp_path, match, labels):
    groups = tmp_path / "samples.jsonl"
    groups.write_text(json.dumps({"id": "q", "prompt": "Question: ...\nAnswer:", "answer": "18", "question": "...",
                                  "completions": [" 9 * 2 = 18\n#### 18", " 9 * 2 = 18. The answer is 18.",
                                                  " 9 * 2 = 19\n#### 19"]}) + "\n")
    out = label(LabelConfig(task="gsm8k", groups=str(groups), output=str(tmp_path / "out.jsonl"), answer_match=match))
    row = json.loads(open(out).readline())
    assert row["labels"] == labels
    assert row["predictions"] == (["18", "18", "19"] if match == "flexible" else ["18", None, "19"])
    with pytest.raises(ValueError, match="answer_match"):
        label(LabelConfig(task="gsm8k", groups=str(groups), output=str(tmp_path / "x.jsonl"), answer_match="exact"))


def test_label_reads_option_text_through_the_sampled_groups_options(tmp_path):
    groups = tmp_path / "samples.jsonl"
    groups.write_text(json.dumps({"id": "q", "prompt": "p", "question": "?", **AQUA,
                                  "completions": [" The answer is 600.", " The answer is 500."]}) + "\n")
    out = label(LabelConfig(task="aqua", groups=str(groups), output=str(tmp_path / "out.jsonl")))
    assert json.loads(open(out).readline())["labels"] == [1.0, 0.0]
