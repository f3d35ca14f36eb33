"""Tests for aft.tasks: gold data round-trips, answer extraction, step checks, the safe evaluator,
the built-in arithmetic task, local JSONL errors and hub loading (faked: no network)."""

import collections
import json
import re
import time
from pathlib import Path

import pytest

from aft.tasks import TASKS, load_task
from aft.tasks.base import check_equations, extract_letter, extract_number, normalize_number, safe_eval

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
SAMPLE = Path(__file__).resolve().parent / "data"  # the first lines of each, shipped (tests/data/README.md)


def _needs(folder: str) -> Path:
    """The full reference files where present (../shared/data), else the samples shipped with the tests."""
    return DATA / folder if (DATA / folder).is_dir() else SAMPLE / folder


def _full(path: Path) -> bool:
    return path.parent == DATA


def test_load_task_knows_the_four_tasks_and_names_them_on_error():
    assert set(TASKS) == {"gsm8k", "aqua", "ecqa", "arithmetic"}
    for name in TASKS:
        assert load_task(name).name == name
    with pytest.raises(ValueError, match="aqua, arithmetic, ecqa, gsm8k"):
        load_task("mmlu")


# --- gold data --------------------------------------------------------------------------------------


@pytest.mark.parametrize("split", ["train", "test"])
def test_gsm8k_gold_solutions_are_correct(split):
    task = load_task("gsm8k")
    examples = task.load(split, path=_needs("gsm8k"))
    assert len(examples) > (1000 if _full(_needs("gsm8k")) else 10) and len({ex["id"] for ex in examples}) == len(examples)
    for ex in examples:
        target = task.reference_cot(ex)
        assert target.startswith(" ") and "<<" not in target
        assert target.splitlines()[-1] == f"#### {ex['answer']}"
        assert task.is_correct(target, ex), ex["id"]
        assert task.is_correct(ex["solution"], ex), ex["id"]
    assert task.stats["no_answer"] == 0 and task.stats["extracted"] == 2 * len(examples)


def test_gsm8k_reference_drops_annotations_but_keeps_lines():
    task = load_task("gsm8k")
    solution = "She sold 48/2 = <<48/2=24>>24.\nIn all 48+24 = <<48+24=72>>72.\n#### 72"
    ex = task.make_example({"question": "q", "answer": solution}, "train", 0)
    assert task.reference_cot(ex) == " She sold 48/2 = 24.\nIn all 48+24 = 72.\n#### 72"
    assert task.format_prompt(ex) == "Question: q\nAnswer:"


def test_gsm8k_annotations_verify_and_a_wrong_step_is_caught():
    task = load_task("gsm8k")
    examples = task.load("train", path=_needs("gsm8k")) + task.load("test", path=_needs("gsm8k"))
    steps = [task.check_steps(ex["solution"]) for ex in examples]
    with_wrong = sum(wrong > 0 for _, wrong in steps)
    # Real GSM8K has a few arithmetic slips in its written text (28 of 8,792 solutions when this was
    # written), while every one of its ~28,000 calculator annotations verifies.
    print(f"GSM8K gold solutions with a wrong step: {with_wrong} of {len(examples)}")
    assert with_wrong < 0.01 * len(examples)
    assert sum(checked for checked, _ in steps) > 3 * len(examples)  # most steps are checked
    annotations = ["\n".join(re.findall(r"<<[^<>]*>>", ex["solution"])) for ex in examples]
    annotation_steps = [task.check_steps(text) for text in annotations]
    assert sum(checked for checked, _ in annotation_steps) > (25_000 if _full(_needs("gsm8k")) else 2 * len(examples))
    assert sum(wrong for _, wrong in annotation_steps) == 0

    first = examples[0]["solution"]  # "Natalia sold 48/2 = <<48/2=24>>24 clips in May. ..."
    assert task.check_steps(first) == (2, 0)
    assert task.check_steps(first.replace("<<48/2=24>>", "<<48/2=25>>")) == (2, 1)
    edited = task.reference_cot(examples[0]).replace("48/2 = 24", "48/2 = 26")
    assert task.check_steps(edited) == (2, 1)


@pytest.mark.parametrize("split", ["dev", "test"])
def test_aqua_gold_rationales_are_correct(split):
    task = load_task("aqua")
    examples = task.load(split, path=_needs("aqua"))
    assert len(examples) == (254 if _full(_needs("aqua")) else 30)
    for ex in examples:
        target = task.reference_cot(ex)
        assert target.startswith(" ")
        assert re.fullmatch(rf"the answer is \(?{ex['answer']}\)?\.?", target.splitlines()[-1], re.IGNORECASE)
        assert task.extract_answer(target) is not None
        assert task.is_correct(target, ex), ex["id"]
    assert task.check_steps(task.reference_cot(examples[0])) == (0, 0)


def test_aqua_prompt_lists_the_options():
    task = load_task("aqua")
    ex = task.make_example({"question": "2+2?", "options": ["A)3", "B)4", "C)5", "D)6", "E)7"],
                            "rationale": "2+2=4\nAnswer B", "correct": "B"}, "dev", 0)
    assert ex["options"] == ["3", "4", "5", "6", "7"] and ex["answer"] == "B"
    assert task.format_prompt(ex) == "Question: 2+2?\nOptions:\nA) 3\nB) 4\nC) 5\nD) 6\nE) 7\nAnswer:"
    assert task.reference_cot(ex) == " 2+2=4\nAnswer B\nThe answer is B"
    done = dict(ex, rationale="2+2=4. The answer is B.")
    assert task.reference_cot(done) == " 2+2=4. The answer is B.\nThe answer is B"  # last line must be canonical
    assert task.reference_cot(dict(ex, rationale="2+2=4\nThe answer is B.")) == " 2+2=4\nThe answer is B."


# --- answer extraction ------------------------------------------------------------------------------


@pytest.mark.parametrize("text, expected", [
    ("#### 1,234", "1234"),
    ("#### $1,234.50", "1234.5"),
    ("The answer is $12.50.", "12.5"),
    ("the answer is: 7", "7"),
    ("The answer is -3.", "-3"),
    ("so 9 - 12 = -3\n#### -3", "-3"),
    ("#### 1234.00", "1234"),
    ("answer is .5", "0.5"),
    ("She has 3 + 4 = 7 apples.\nThen 12 in all", "12"),         # fallback: last number
    ("12 - 5", "5"),                                                # a minus sign with a space is not a sign
    ("It costs 1,000,000 dollars", "1000000"),
    ("#### 72\nQuestion: Tom has 5 pens.\n#### 9", "72"),           # the first marker wins
    ("The answer is 8. Check: 2 * 4 = 8, 10 more is 18", "8"),      # "answer is" beats the last number
    ("There are 5 cats. The answer is unclear. 6", "6"),            # a marker with no number falls through
    ("no number here", None),
    ("", None),
])
def test_extract_number(text, expected):
    assert extract_number(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("The answer is C", "C"),
    ("Answer: (C)", "C"),
    ("so we get\nC)", "C"),
    ("answer is c", "C"),
    ("answer is c.", "C"),
    ("The answer is (b).", "B"),
    ("ANSWER:D", "D"),
    ("Answer: Option E", "E"),
    ("so x = 5\nCorrect option is A", "A"),
    ("Hence answer is a.\nAnswer:B\nThe answer is B", "B"),      # the canonical line wins
    ("the answer is a bit unclear", None),                         # "a" the article is not option A
    ("The answer is F", None),                                      # not an option
    ("nothing to see", None),
])
def test_extract_letter(text, expected):
    assert extract_letter(text) == expected


def test_stats_count_every_extraction():
    task = load_task("gsm8k")
    assert task.extract_answer("#### 5") == "5"
    assert task.extract_answer("I do not know") is None
    assert not task.is_correct("no idea", {"answer": "5"})
    assert task.stats == {"extracted": 1, "no_answer": 2}
    letters = load_task("aqua")
    letters.extract_answer("The answer is C")
    assert letters.stats["extracted"] == 1 and letters.stats["no_answer"] == 0


def test_numbers_are_compared_numerically():
    task = load_task("gsm8k")
    for text in ["#### 1,234", "#### 1234", "#### 1234.00", "The answer is $1,234."]:
        assert task.is_correct(text, {"answer": "1234"})
    assert task.is_correct("The answer is $12.50.", {"answer": "12.5"})
    assert not task.is_correct("#### 1235", {"answer": "1234"})
    assert normalize_number("-$7.") == "-7" and normalize_number("0.50") == "0.5" and normalize_number("x") is None
    assert load_task("aqua").is_correct("answer is c", {"answer": "C"})


# --- safe arithmetic and step checks ----------------------------------------------------------------


def test_safe_eval_computes_plain_arithmetic():
    assert safe_eval("2 + 3 * 4") == 14
    assert safe_eval("-(3 - 5)") == 2
    assert safe_eval("7 // 2 + 7 % 3") == 4
    assert safe_eval("2 ** 10") == 1024
    assert safe_eval("48/2") == 24


@pytest.mark.parametrize("expr", [
    "__import__('os').system('echo owned')", "a*b", "abs(-3)", "(1).real", "'a' * 3", "[1, 2]",
    "True + 1", "1 if 1 else 2", "lambda: 1", "1/0", "2 ** 10 ** 10", "9 ** 9 ** 9", "10 ** 200",
    "(10 ** 60) * (10 ** 60)", "1e308 * 10", "1" + "0" * 150, "1 +", "3 = 4", "9" * 300,
])
def test_safe_eval_refuses_without_evaluating(expr):
    start = time.perf_counter()
    with pytest.raises(ValueError):
        safe_eval(expr)
    assert time.perf_counter() - start < 0.1  # huge powers are refused before they are computed


@pytest.mark.parametrize("text, expected", [
    ("12 + 7 = 19\n19 - 5 = 14\n#### 14", (2, 0)),
    ("12 + 7 = 20", (1, 1)),
    ("She pays 3 x $4 = $12.", (1, 0)),
    ("Total: 1,200 + 300 = 1,500", (1, 0)),
    ("48/2 = 24/2 = 12", (1, 0)),              # a chain checks its last link only
    ("so 5+5 = 11 = 11", (1, 1)),
    ("2x + 3 = 7", (0, 0)),                    # algebra is not arithmetic
    ("60 students x 2/3 = 40 students", (0, 0)),  # the left side is cut by a word: not counted
    ("It took 3 / 2 = 1 1/2 hours", (0, 0)),   # a mixed number is not a checkable value
    ("<<__import__('os')=1>> and <<2*3=7>>", (1, 1)),
    ("no equations", (0, 0)),
])
def test_check_equations(text, expected):
    assert check_equations(text) == expected


def test_tasks_without_steps_return_zero():
    assert load_task("aqua").check_steps("3 + 4 = 8") == (0, 0)
    assert load_task("ecqa").check_steps("3 + 4 = 8") == (0, 0)


# --- the built-in arithmetic task -------------------------------------------------------------------


def test_arithmetic_is_deterministic_and_splits_are_disjoint():
    task = load_task("arithmetic", seed=3, n_train=300, n_val=50, n_test=50)
    splits = {split: task.load(split) for split in ("train", "validation", "test")}
    again = load_task("arithmetic", seed=3, n_train=300, n_val=50, n_test=50)
    assert splits["train"] == again.load("train") and splits["test"] == again.load("test")
    assert load_task("arithmetic", seed=4, n_train=300).load("train") != splits["train"]
    questions = {split: {ex["question"] for ex in examples} for split, examples in splits.items()}
    assert [len(questions[split]) for split in ("train", "validation", "test")] == [300, 50, 50]
    assert not questions["train"] & questions["validation"]
    assert not questions["train"] & questions["test"] and not questions["validation"] & questions["test"]
    # The test set is generated first, so it does not move when the training set grows.
    assert load_task("arithmetic", seed=3, n_train=900, n_test=50).load("test") == splits["test"]
    assert len(task.load("train", limit=7)) == 7


def test_arithmetic_splits_share_no_problem_whatever_its_story():
    # Two questions with the same numbers and operations are one problem, told differently: with few distinct
    # problems (values up to 5, two or three steps) a text-only check would let them cross between splits.
    task = load_task("arithmetic", variant="shop+mixed", min_steps=2, max_steps=3, max_value=5, n_train=400,
                     n_val=60, n_test=60)
    problems = {split: [ex["solution"].rsplit("####", 1)[0] for ex in task.load(split)]
                for split in ("train", "validation", "test")}
    for split, solutions in problems.items():
        assert len(set(solutions)) == len(solutions), split
    assert not set(problems["train"]) & set(problems["test"])
    assert not set(problems["train"]) & set(problems["validation"])
    assert not set(problems["validation"]) & set(problems["test"])


def test_arithmetic_splits_hold_the_same_mix_of_lengths():
    # Short problems are few (values up to 9: about 3,000 distinct two-step problems against 40,000 three-step):
    # drawing lengths at random and dropping repeats left the demo's training set 16% two-step against a test set
    # of 49%. Each split is balanced over step counts instead, whichever split is generated last.
    task = load_task("arithmetic", variant="shop+mixed", min_steps=2, max_steps=3, max_value=9, n_train=2000,
                     n_val=100, n_test=300)
    for split, size in (("train", 2000), ("validation", 100), ("test", 300)):
        counts = collections.Counter(ex["steps"] for ex in task.load(split))
        assert counts == {2: size // 2, 3: size // 2}, (split, counts)
    with pytest.raises(ValueError, match="raise max_value"):  # more short problems than exist: a clear error
        load_task("arithmetic", variant="shop", min_steps=1, max_steps=2, max_value=3, n_train=200).load("train")


@pytest.mark.parametrize("variant", ["shop", "mixed"])
def test_arithmetic_gold_is_correct_and_every_step_verifies(variant):
    task = load_task("arithmetic", variant=variant, max_steps=5, n_train=500)
    for ex in task.load("train"):
        target = task.reference_cot(ex)
        assert target.startswith(" ") and target.splitlines()[-1] == f"#### {ex['answer']}"
        assert task.is_correct(target, ex)
        assert task.check_steps(target) == (ex["steps"], 0)
        values = [int(token) for token in target.replace("####", "").split() if token.isdigit()]
        assert min(values) >= 0 and max(values) < 1000
    sample = task.load("train", limit=1)[0]
    assert task.format_prompt(sample).startswith("Question: ") and sample["question"].endswith("have now?")


def test_arithmetic_difficulty_and_variants():
    easy = load_task("arithmetic", min_steps=1, max_steps=1, n_train=100).load("train")
    hard = load_task("arithmetic", min_steps=5, max_steps=5, n_train=100).load("train")
    task = load_task("arithmetic")
    assert {task.check_steps(task.reference_cot(ex))[0] for ex in easy} == {1}
    assert {task.check_steps(task.reference_cot(ex))[0] for ex in hard} == {5}
    shop = load_task("arithmetic", variant="shop", n_train=300).load("train")
    mixed = load_task("arithmetic", variant="mixed", n_train=300).load("train")
    ops = lambda examples: {line.split()[1] for ex in examples for line in ex["solution"].splitlines()[:-1]}
    assert ops(shop) == {"+", "-"} and ops(mixed) == {"+", "-", "*", "/"}
    assert not {ex["question"] for ex in shop} & {ex["question"] for ex in mixed}
    assert not {ex["id"] for ex in shop} & {ex["id"] for ex in mixed}  # safe to mix in one run
    with pytest.raises(ValueError, match="variant"):
        load_task("arithmetic", variant="algebra")
    with pytest.raises(ValueError, match="distinct"):
        load_task("arithmetic", max_value=2, min_steps=1, max_steps=1, n_train=500).load("train")


def test_arithmetic_round_trips_through_jsonl(tmp_path):
    task = load_task("arithmetic", n_train=20)
    examples = task.load("train")
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(ex) + "\n" for ex in examples))
    assert task.load("train", path=tmp_path) == examples


# --- local files and the hub ------------------------------------------------------------------------


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "test.jsonl"
    path.write_text('{"question": "q", "answer": "1 + 1 = 2\\n#### 2"}\n\n{"question": oops}\n')
    with pytest.raises(ValueError, match=r"test\.jsonl:3: not valid JSON"):
        load_task("gsm8k").load("test", path=path)


def test_missing_field_names_file_and_line(tmp_path):
    path = tmp_path / "dev.jsonl"
    row = {"question": "q", "options": ["A)1", "B)2"], "rationale": "r", "correct": "A"}
    path.write_text(json.dumps(row) + "\n" + json.dumps({k: v for k, v in row.items() if k != "correct"}) + "\n")
    with pytest.raises(ValueError, match=r"dev\.jsonl:2: missing field 'correct'"):
        load_task("aqua").load("validation", path=tmp_path)  # "validation" finds dev.jsonl
    assert len(load_task("aqua").load("dev", path=path, limit=1)) == 1
    no_final = tmp_path / "gsm.jsonl"
    no_final.write_text(json.dumps({"question": "q", "answer": "no final line"}) + "\n")
    with pytest.raises(ValueError, match=r"gsm\.jsonl:1: .*####"):
        load_task("gsm8k").load("train", path=no_final)


ECQA_ROWS = [
    {"q_no": "e1", "q_concept": "bird", "q_text": "Where would you find a nest?", "q_op1": "tree",
     "q_op2": "ocean", "q_op3": "desert", "q_op4": "car", "q_op5": "oven", "q_ans": "tree",
     "taskA_pos": "Birds build nests in trees.", "taskA_neg": "Oceans are water.",
     "taskB": "Birds build nests in trees, so a nest is found in a tree."},
    {"q_no": "e2", "q_concept": "ice", "q_text": "What does ice do when warm?", "q_op1": "grow",
     "q_op2": "sing", "q_op3": "melt", "q_op4": "freeze", "q_op5": "fly", "q_ans": "melt",
     "taskA_pos": "Warm ice melts.", "taskA_neg": "Ice cannot sing.", "taskB": ""},
]


def test_ecqa_from_local_jsonl(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ECQA_ROWS))
    task = load_task("ecqa")
    first, second = task.load("train", path=tmp_path)
    assert (first["id"], first["answer"], second["answer"]) == ("e1", "A", "C")
    assert task.format_prompt(first) == ("Question: Where would you find a nest?\nOptions:\nA) tree\nB) ocean\n"
                                         "C) desert\nD) car\nE) oven\nAnswer:")
    explanation = "Birds build nests in trees, so a nest is found in a tree."
    assert task.reference_cot(first) == f" {explanation}\nThe answer is A"
    assert task.reference_cot(second) == " Warm ice melts.\nThe answer is C"  # no free-flow text: properties
    assert all(task.is_correct(task.reference_cot(ex), ex) for ex in (first, second))
    assert not task.is_correct("The answer is B", first)
    path.write_text(json.dumps(dict(ECQA_ROWS[0], q_ans="lake")) + "\n")
    with pytest.raises(ValueError, match=r"train\.jsonl:1: .*not one of the options"):
        task.load("train", path=path)


@pytest.mark.parametrize("name, split, expected, row", [
    ("gsm8k", "test", ("openai/gsm8k", "main", "test"), {"question": "q", "answer": "2+2=<<2+2=4>>4\n#### 4"}),
    ("aqua", "dev", ("deepmind/aqua_rat", "raw", "validation"),
     {"question": "q", "options": ["A)1", "B)2", "C)3", "D)4", "E)5"], "rationale": "so B", "correct": "B"}),
    ("ecqa", "validation", ("yangdong/ecqa", None, "validation"), ECQA_ROWS[0]),
])
def test_hub_loading_asks_for_the_right_dataset(monkeypatch, name, split, expected, row):
    datasets = pytest.importorskip("datasets")
    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([row, row, row])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    task = load_task(name)
    examples = task.load(split, limit=2)
    assert calls == [expected]
    assert len(examples) == 2
    assert task.is_correct(task.reference_cot(examples[0]), examples[0])


def test_hub_rows_with_bad_fields_name_the_row(monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: [{"question": "q"}])
    with pytest.raises(ValueError, match=r"openai/gsm8k\[train\] row 0: missing field 'answer'"):
        load_task("gsm8k").load("train")
