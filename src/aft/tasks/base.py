"""The Task base class and the answer-extraction and step-checking helpers every task shares.

A task turns a data set (Hugging Face hub, or local JSONL) into plain-dict examples with a stable
``id``, a ``question`` and a gold ``answer`` (a normalised string: ``"1234"``, ``"12.5"``, ``"C"``), and
knows how to prompt for it, what its reference chain of thought (COT) is, how to read the final answer
out of a model's text, and how many arithmetic steps of a COT are checkably wrong (the step check the
AFT reviews asked for: outcome-only labels count a right answer reached by a wrong step as positive).

Everything here is deterministic and never calls ``eval``: arithmetic goes through ``safe_eval``, which
walks the ``ast`` of the expression and allows only numbers and a handful of operators.
"""

from __future__ import annotations

import ast
import collections
import math
import operator
import re
from decimal import Decimal, InvalidOperation
from fractions import Fraction
from pathlib import Path

from aft import data
from aft.checks import hub_reachable

# ---------------------------------------------------------------------------------------------------
# Numbers

# A number as models and GSM8K write it: optional minus and dollar sign (either order), thousands
# commas only in groups of three (so "3,4 and 5" is not read as 345), optional decimals.
NUMBER = r"-?\$?-?(?:\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|\.\d+)%?"
# An answer may also be a fraction ("3/4", not a date "3/4/2020").
_ANSWER_NUMBER_RE = re.compile(r"(?<![\w./])(?:-?\d+/\d+(?![\d/])|" + NUMBER + ")")
ANSWER_MATCHES = ("strict", "flexible")


def normalize_number(text: str) -> str | None:
    """``"$1,234.50"`` -> ``"1234.5"``, ``"1234.00"`` -> ``"1234"``, ``"-7."`` -> ``"-7"``, ``"3/4"`` ->
    ``"0.75"`` (``"1/3"`` stays ``"1/3"``); None if no number."""
    cleaned = re.sub(r"[\s$,%]", "", text).rstrip(".")
    if re.fullmatch(r"-?\d+/\d+", cleaned):
        numerator, denominator = (int(part) for part in cleaned.split("/"))
        if denominator == 0:
            return None
        value = Fraction(numerator, denominator)
        while denominator % 2 == 0:
            denominator //= 2
        while denominator % 5 == 0:
            denominator //= 5
        if denominator != 1:  # no finite decimal: keep the fraction, answers_equal compares it
            return f"{value.numerator}/{value.denominator}"
        cleaned = str(Decimal(value.numerator) / Decimal(value.denominator))
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return None
    if not value.is_finite():
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def _first_number(text: str) -> str | None:
    match = _ANSWER_NUMBER_RE.search(text)
    return normalize_number(match.group()) if match else None


# Where a model says its answer, in order of preference: GSM8K's "#### N" (the strict format), a LaTeX
# \boxed{...}, an answer phrase ("the answer is: 7", "The final answer is $12.50.", a line "Answer: 7" or
# "A: 7"; read to the end of its line), a bold number (**18**).
_HASH_RE = re.compile(r"####\s*(" + NUMBER + ")")
_BOXED_RE = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")
_ANSWER_IS_RE = re.compile(r"answer\s+is\s*:?([^\n]*)|^\s*(?:final\s+)?(?:answer|A)\s*:([^\n]*)",
                           re.IGNORECASE | re.MULTILINE)
_BOLD_RE = re.compile(r"\*\*([^*\n]+)\*\*")


def strict_number(text: str) -> str | None:
    """The number right after the first ``####`` (GSM8K's own format; lm-evaluation-harness's strict-match)."""
    match = _HASH_RE.search(text)
    return normalize_number(match.group(1)) if match else None


def extract_number(text: str) -> str | None:
    r"""The final answer of a COT read flexibly (lm-evaluation-harness's flexible-extract is the last number;
    the markers come first so "The answer is 8. Check: 10 more is 18" reads 8): the first ``####``, else the
    last ``\boxed{}``, else the first answer phrase, else the
    last bold number, else the last number. Normalised with ``normalize_number``; a boxed expression that is
    not a plain number (``\frac{3}{4}``) is returned as written, for ``answers_equal``."""
    number = strict_number(text)
    if number is not None:
        return number
    boxed = _BOXED_RE.findall(text)
    if boxed:
        inside = boxed[-1].replace("\\$", "$").replace("\\%", "%").replace("\\!", "").strip()
        if normalize_number(inside) is not None or not re.search(r"\\d?frac|\\sqrt", inside):
            return normalize_number(inside) or _first_number(inside)
        return inside
    for match in _ANSWER_IS_RE.finditer(text):
        number = _first_number(match.group(1) if match.group(1) is not None else match.group(2))
        if number is not None:
            return number
    for inside in reversed(_BOLD_RE.findall(text)):
        number = _first_number(inside)
        if number is not None:
            return number
    numbers = _ANSWER_NUMBER_RE.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


def numbers_equal(a: str, b: str) -> bool:
    try:
        return Decimal(a) == Decimal(b)
    except InvalidOperation:
        return False


def _is_decimal(text: str) -> bool:
    try:
        return Decimal(text).is_finite()
    except InvalidOperation:
        return False


def answers_equal(predicted: str, gold: str) -> bool:
    """Whether an extracted answer equals the gold one: the same letter or number (``"1234"`` = ``"1234.0"``),
    else, for a fraction or LaTeX expression, mathematically equal as ``math-verify`` judges it (``"1/2"`` =
    ``"0.5"``, ``"\\frac{3}{4}"`` = ``"0.75"``)."""
    if predicted.strip().upper() == gold.strip().upper() or numbers_equal(predicted, gold):
        return True
    if re.fullmatch(r"[A-Za-z]", predicted.strip()) or re.fullmatch(r"[A-Za-z]", gold.strip()):
        return False  # option letters: nothing more to compare
    if _is_decimal(predicted) and _is_decimal(gold):
        return False  # two plain numbers, and not equal
    if max(len(predicted), len(gold)) > 64:  # short answers only: sympy on long input can take very long
        return False
    import logging

    from math_verify import parse, verify  # lazy: loads sympy (a third of a second), needed only here

    logging.getLogger("math_verify").setLevel(logging.ERROR)  # its warning that we turned the timeout off
    # No timeout: math-verify's uses signal.alarm, which fails outside the main thread; the inputs are short.
    return verify(parse(gold, parsing_timeout=None), parse(predicted, parsing_timeout=None), timeout_seconds=None)


# ---------------------------------------------------------------------------------------------------
# Option letters

# The canonical line our reference COTs end with; preferred wherever it is, like GSM8K's "####",
# so that a rationale's own stray "answer is a." earlier on does not override it.
_CANONICAL_LETTER_RE = re.compile(r"(?i:\bthe\s+answer\s+is)\s*:?\s*\(?([A-E])\)?(?![A-Za-z])")
# Other markers: "Answer: (C)", "ANSWER:C", "Ans: B", "answer is c", "Answer: Option D", "answer - A".
_LETTER_MARKER_RE = re.compile(
    r"\bans(?:wer)?\b(?:\s+is)?\s*[:=\-]?\s*(?:option\s*)?(\()?([A-Ea-e])(\))?(?![A-Za-z])", re.IGNORECASE
)
# Fallbacks on the last non-empty line: "C)", "(C)", "C", "C) 600", "Option C", "correct option is: C",
# "Choice B", "C is the answer", "(A) is correct answer".
_LAST_LINE_LETTER_RES = [
    re.compile(r"^\(?([A-Ea-e])\)(?=.{0,40}$)|^([A-E])\.?$"),  # short: a long line opening "(A)" discusses A
    re.compile(r"\b(?:option|choice)\s*(?:is\s*)?:?\s*\(?([A-Ea-e])\)?[.!\s]*$", re.IGNORECASE),
    re.compile(r"(?:^|\(|\s)([A-E])\)?\s+is\s+(?:the\s+)?(?:correct|right)?\s*(?:answer|choice|option)",
               re.IGNORECASE),
]


def strict_letter(text: str, letters: str = "ABCDE") -> str | None:
    """The letter of the first "The answer is X" (or "(X)"): the format our multiple-choice references end with."""
    for match in _CANONICAL_LETTER_RE.finditer(text):
        if match.group(1) in letters:
            return match.group(1)
    return None


def extract_letter(text: str, letters: str = "ABCDE", options: list[str] | None = None) -> str | None:
    """The chosen option letter (upper case), read flexibly: the first "The answer is X", else the first
    other answer marker, else the option named on the last line, else (given the ``options``' texts) the
    option whose text the answer states ("The answer is 600" when C is 600)."""
    letter = strict_letter(text, letters)
    if letter is not None:
        return letter
    for match in _LETTER_MARKER_RE.finditer(text):
        open_paren, letter, close_paren = match.groups()
        # A bare lower-case letter after "answer" is usually the article ("the answer is a bit ...");
        # accept it only in parentheses or at the end of a sentence or the text.
        rest = text[match.end():]
        if letter.islower() and not (open_paren or close_paren) and not re.match(r"\s*(?:[.,;!]|$)", rest):
            continue
        if letter.upper() in letters:
            return letter.upper()
    lines = [line.strip().strip("*") for line in text.strip().splitlines() if line.strip()]
    if lines:
        for pattern in _LAST_LINE_LETTER_RES:
            match = pattern.search(lines[-1])
            if match:
                letter = next(group for group in match.groups() if group).upper()
                if letter in letters:
                    return letter
    return option_by_text(text, options, letters) if options else None


def _plain(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s.%$/-]", " ", text.lower()).split()).strip(" .")


def option_by_text(text: str, options: list[str], letters: str = "ABCDE") -> str | None:
    """The letter of the option whose text the answer gives instead of its letter: what follows the first
    answer phrase ("the answer is church."), else the last line; the option's text must be all of it or
    begin it ("bank, since ..."), or be the same number ("$600" for "600"). Longest option first, so
    "new york city" wins over "new york"."""
    match = _ANSWER_IS_RE.search(text)
    lines = [line for line in text.strip().splitlines() if line.strip()]
    said = (match.group(1) if match.group(1) is not None else match.group(2)) if match else (lines or [""])[-1]
    said = _plain(said)
    ranked = sorted(zip(letters, options), key=lambda pair: -len(pair[1]))
    for letter, option in ranked:
        plain = _plain(option)
        if plain and (said == plain or re.match(re.escape(plain) + r"(?![\w])", said)):
            return letter
    number = _first_number(said)
    if number is not None:
        for letter, option in zip(letters, options):
            value = _first_number(option)
            if value is not None and numbers_equal(number, value):
                return letter
    return None


# ---------------------------------------------------------------------------------------------------
# Safe arithmetic and step checks

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
MAX_MAGNITUDE = 1e100  # any intermediate beyond this is refused: no step in a word problem needs it
MAX_EXPRESSION_CHARS = 200


def safe_eval(expr: str) -> float:
    """Evaluate ``expr`` with numbers, + - * / // % **, unary minus and parentheses only.

    Raises ValueError for anything else (names, calls, attributes, strings, huge powers, division by
    zero) without evaluating any part of it beyond plain arithmetic on literals.
    """
    if len(expr) > MAX_EXPRESSION_CHARS:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except (SyntaxError, ValueError) as error:
        raise ValueError(f"not an arithmetic expression: {expr!r}") from error
    return float(_evaluate(tree.body))


def _evaluate(node: ast.AST) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):  # bool is not a number here
        if abs(node.value) > MAX_MAGNITUDE:
            raise ValueError("value out of range")
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            # Refuse before computing: 9**9**9 would otherwise run for minutes.
            if abs(right) > 100 or (abs(left) > 1 and right * math.log10(abs(left)) > 100):
                raise ValueError("exponent too large")
        try:
            value = _BINARY[type(node.op)](left, right)
        except (ZeroDivisionError, OverflowError) as error:
            raise ValueError(str(error)) from error
        if isinstance(value, complex) or not math.isfinite(value) or abs(value) > MAX_MAGNITUDE:
            raise ValueError("value out of range")
        return value
    raise ValueError(f"not allowed in arithmetic: {type(node).__name__}")


def step_is_wrong(computed: float, stated: float) -> bool:
    return abs(computed - stated) > 1e-6 * max(1.0, abs(stated))


_ANNOTATION_RE = re.compile(r"<<([^<>=]*)=([^<>]*)>>")
# Characters an inline equation's sides may hold. "x" and "×" are multiplication as people write it.
_ARITH_CHARS = set("0123456789.,+-*/()$ xX×÷–−")
# The stated result: one number, not the start of another expression ("= 24/2"), a mixed fraction
# ("= 1 1/2"), a percentage or a unit glued to it ("= 240g/5"); those are not counted.
_STATED_RE = re.compile(
    r"\s*\$?\s*(-?\$?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|-?\.\d+)"
    r"(?![.,]?\d|\s*[-+*/x×÷^(%–−]|\s+\d|[A-Za-z]|\s+(?:and|cents?|thousand|million|billion)\b)"
)


def _to_python(expr: str) -> str:
    expr = re.sub(r"(?<=\d),(?=\d{3}\b)", "", expr)  # thousands separators
    # "x" is multiplication only between numbers ("3 x 4"); "2x + 3" keeps its x and is refused.
    expr = re.sub(r"(?<=[\d)])\s*[xX×]\s*(?=[\d(.$])", "*", expr)
    return expr.replace("$", "").replace("÷", "/").replace("–", "-").replace("−", "-")


def _left_side(line: str, end: int) -> str | None:
    """The arithmetic run ending just before the '=' at ``end``, if it has an operator between numbers
    and is the whole left side (not the tail of "60 students x 2/3" or "X*6 + 9")."""
    start = end
    while start > 0 and line[start - 1] in _ARITH_CHARS:
        start -= 1
    run = line[start:end]
    first = re.search(r"[\d(.$-]", run)
    if first is None:
        return None
    prefix, run = run[: first.start()], run[first.start():].strip()
    # What precedes the expression may be spaces and commas, or the x of a word ("box 5 * 2").
    word_x = re.fullmatch(r"[xX]\s+", prefix) and start > 0 and line[start - 1].isalpha()
    if not (re.fullmatch(r"[\s,]*", prefix) or word_x):
        return None
    if start > 0 and not prefix and line[start - 1] not in "=\"'[{":
        return None  # glued to a word, variable or clock: "5A/5", "M+4", "6:00+48"
    if re.search(r"\band\s*$", line[:start]):
        return None  # the fraction of a mixed number: "1 and 1/4 = ..."
    if not re.search(r"[\d)]\s*[-+*/xX×÷–−]\s*[-\d(.$]", run):
        return None
    return _to_python(run)


def check_equations(text: str) -> tuple[int, int]:
    """(checkable steps, wrong steps) of a COT.

    Checks GSM8K calculator annotations ``<<48/2=24>>``, and, on lines without annotations, every
    inline ``expression = number`` ("12 + 7 = 19", "She pays 3 x $4 = $12."). A chained
    ``a = b = c`` checks ``b = c`` only; sides that do not parse are not counted.
    """
    checked = wrong = 0
    for line in text.splitlines():
        annotations = _ANNOTATION_RE.findall(line)
        if annotations:
            equations = [(_to_python(left), right) for left, right in annotations]
        else:
            equations = []
            for match in re.finditer("=", line):
                left = _left_side(line, match.start())
                stated = _STATED_RE.match(line, match.end())
                if left is not None and stated is not None:
                    equations.append((left, stated.group(1)))
        for left, right in equations:
            stated_value = normalize_number(right)
            try:
                computed = safe_eval(left)
            except ValueError:
                continue
            if stated_value is None:
                continue
            checked += 1
            wrong += step_is_wrong(computed, float(stated_value))
    return checked, wrong


# ---------------------------------------------------------------------------------------------------
# Loading


def read_jsonl(path: str | Path):
    """Yield (where, row) for each non-blank line; ``where`` is "file:line" for error messages."""
    for number, row in data.read_jsonl(path):  # the one JSONL reader: bad lines raise DataError (a ValueError)
        yield f"{path}:{number}", row


_NEXT_QUESTION_RE = re.compile(r"\n\s*Question\s*:")


class Task:
    """One benchmark: loading, prompting, reference COTs, answer extraction and step checks.

    Subclasses set ``name``, ``hub_name``/``hub_config`` and implement ``make_example``,
    ``reference_cot`` and ``parse_answer``.
    """

    name: str = ""
    hub_name: str = ""
    hub_config: str | None = None
    hub_splits: dict[str, str] = {}  # our split name -> the hub's, where they differ
    split_aliases: dict[str, str] = {"dev": "validation", "validation": "dev"}  # for local folders

    def __init__(self):
        self.stats = collections.Counter()

    # -- data ---------------------------------------------------------------------------------------

    def load(self, split: str, path: str | Path | None = None, limit: int | None = None) -> list[dict]:
        """Examples of ``split``: from the hub when ``path`` is None, else from a JSONL file or a
        folder holding ``{split}.jsonl``. Bad rows raise ValueError naming file and line."""
        rows = self._hub_rows(split) if path is None else read_jsonl(self._local_file(split, path))
        examples = []
        for index, (where, row) in enumerate(rows):
            if limit is not None and len(examples) >= limit:
                break
            try:
                example = self.make_example(row, split, index)
            except (KeyError, TypeError, ValueError, AttributeError) as error:
                problem = f"missing field {error}" if isinstance(error, KeyError) else str(error)
                raise ValueError(f"{where}: {problem}") from error
            examples.append(example)
        return examples

    def _local_file(self, split: str, path: str | Path) -> Path:
        path = Path(path)
        if path.is_dir():
            for name in (split, self.split_aliases.get(split)):
                if name and (path / f"{name}.jsonl").is_file():
                    return path / f"{name}.jsonl"
            raise FileNotFoundError(f"no {split}.jsonl in {path}")
        return path

    def _hub_rows(self, split: str):
        import datasets  # lazy: loading local files or the built-in task must not need it

        hub_split = self.hub_splits.get(split, split)
        if not hub_reachable():  # say so at once, not after a minute of retries; a cached copy still loads
            import huggingface_hub.constants

            datasets.config.HF_HUB_OFFLINE = huggingface_hub.constants.HF_HUB_OFFLINE = True
            try:
                rows = datasets.load_dataset(self.hub_name, self.hub_config, split=hub_split)
            except Exception:
                raise data.DataError(f"task {self.name!r}: no network to reach the Hugging Face hub and no cached "
                                     f"copy of {self.hub_name}: pass --data_path (a JSONL file or a folder of "
                                     "{split}.jsonl)") from None
        else:
            rows = datasets.load_dataset(self.hub_name, self.hub_config, split=hub_split)
        for index, row in enumerate(rows):
            yield f"{self.hub_name}[{hub_split}] row {index}", dict(row)

    def make_example(self, row: dict, split: str, index: int) -> dict:
        raise NotImplementedError

    def example_id(self, row: dict, split: str, index: int) -> str:
        # The source's own id where it has one; else the row's position, stable for a fixed file.
        return str(row["id"]) if row.get("id") is not None else f"{self.name}/{split}/{index}"

    # -- text ---------------------------------------------------------------------------------------

    def format_prompt(self, example: dict) -> str:
        return f"Question: {example['question']}\nAnswer:"

    def reference_cot(self, example: dict) -> str:
        raise NotImplementedError

    def parse_answer(self, text: str, match: str = "flexible", example: dict | None = None) -> str | None:
        """The answer ``text`` gives: ``match="strict"`` only in the task's own format (GSM8K's ``#### N``,
        "The answer is X"), ``"flexible"`` also as people write it (see ``extract_number``, ``extract_letter``;
        ``example`` gives the options' texts)."""
        raise NotImplementedError

    def extract_answer(self, text: str, match: str = "flexible", example: dict | None = None) -> str | None:
        """``parse_answer`` of the text before any new "Question:" (a continuation the model invented, the next
        few-shot example, is not its answer), counted in ``stats``."""
        if match not in ANSWER_MATCHES:
            raise ValueError(f"answer match must be one of {ANSWER_MATCHES}; got {match!r}")
        answer = self.parse_answer(_NEXT_QUESTION_RE.split(text, maxsplit=1)[0], match, example)
        self.stats["extracted" if answer is not None else "no_answer"] += 1
        return answer

    def is_correct(self, text: str, example: dict, match: str = "flexible") -> bool:
        """Whether the answer ``text`` gives (read ``strict``-ly or ``flexible``-ly) equals the example's."""
        predicted = self.extract_answer(text, match, example)
        return predicted is not None and answers_equal(predicted, str(example["answer"]))

    def check_steps(self, text: str) -> tuple[int, int]:
        return (0, 0)


def format_options(question: str, options: list[str], letters: str = "ABCDE") -> str:
    """The multiple-choice prompt: the question, one lettered option per line, then "Answer:"."""
    lines = [f"Question: {question}", "Options:"]
    lines += [f"{letter}) {option}" for letter, option in zip(letters, options)]
    return "\n".join(lines + ["Answer:"])


def answer_line_cot(explanation: str, letter: str) -> str:
    """A multiple-choice reference COT: the explanation, then "The answer is X" unless it ends so."""
    text = explanation.strip()
    last = text.splitlines()[-1].strip() if text else ""
    if not re.fullmatch(rf"the answer is \(?{letter}\)?\.?", last, re.IGNORECASE):
        text = f"{text}\nThe answer is {letter}" if text else f"The answer is {letter}"
    return " " + text
