"""The benchmarks, one file each: GSM8K, AQuA-RAT, ECQA and the built-in offline arithmetic task.

``load_task(name, **kwargs)`` builds one; every task has the same small interface (see ``Task``)::

    from aft.tasks import load_task
    task = load_task("arithmetic", variant="mixed", seed=0)
    example = task.load("train", limit=1)[0]
    prompt, target = task.format_prompt(example), task.reference_cot(example)
    task.is_correct(target, example)  # True
"""

from dataclasses import dataclass, field

from aft.tasks.aqua import AQuATask
from aft.tasks.arithmetic import ArithmeticTask
from aft.tasks.base import Task
from aft.tasks.ecqa import ECQATask
from aft.tasks.gsm8k import GSM8KTask

TASKS = {"gsm8k": GSM8KTask, "aqua": AQuATask, "ecqa": ECQATask, "arithmetic": ArithmeticTask}


def _value(text: str):
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_task_spec(spec: str) -> tuple[str, dict]:
    """``"arithmetic:variant=mixed,max_steps=4"`` -> ``("arithmetic", {"variant": "mixed", "max_steps": 4})``.

    One string carries a task and its options, so a CLI flag or YAML key can name any task setting.
    """
    name, _, options = spec.partition(":")
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"task option {item!r} in {spec!r} is not key=value")
        kwargs[key.strip()] = _value(value.strip())
    return name.strip(), kwargs


def load_task(name: str, **kwargs) -> Task:
    """The task called ``name`` (options may follow a colon, see ``parse_task_spec``); ``kwargs`` go to its
    constructor (only "arithmetic" takes any)."""
    name, options = parse_task_spec(name)
    kwargs = {**options, **kwargs}
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    _check_options(name, kwargs)
    return TASKS[name](**kwargs)


def _check_options(name: str, kwargs: dict) -> None:
    """Unknown options, and values of another type than the option's default, named before use."""
    import inspect

    params = {p.name: p.default for p in list(inspect.signature(TASKS[name]).parameters.values())}
    for key, value in kwargs.items():
        if key not in params:
            raise ValueError(f"task {name!r} has no option {key!r}; its options: {', '.join(params) or 'none'}")
        default = params[key]
        if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ValueError(f"task option {key}={value!r} must be a number")


@dataclass
class TaskFields:
    """What every stage that reads a task's questions needs; shared by the stage configs (and CLI flags)."""

    task: str = field(default="arithmetic", metadata={"help": "Task name, options after a colon (see `aft.tasks`)."})
    data_path: str | None = field(default=None, metadata={
        "help": "Local JSONL file or folder of {split}.jsonl; default: the task's Hugging Face hub dataset."})
    split: str = field(default="train", metadata={"help": "Split to read."})
    limit: int | None = field(default=None, metadata={"help": "Only the first N questions (after offset)."})
    offset: int = field(default=0, metadata={"help": "Skip the first N questions (e.g. fresh questions per round)."})

    def load_examples(self):
        """The task object and the examples of ``split`` from ``offset``, at most ``limit`` of them."""
        from aft.data import DataError

        task = load_task(self.task)
        end = None if self.limit is None else self.offset + self.limit
        examples = task.load(self.split, path=self.data_path, limit=end)[self.offset:]
        if not examples:
            raise DataError(f"{self.data_path or self.task}: no questions in split {self.split!r}"
                            + (f" from offset {self.offset}" if self.offset else ""))
        return task, examples


__all__ = ["TaskFields", "TASKS", "Task", "load_task", "AQuATask", "ArithmeticTask", "ECQATask", "GSM8KTask"]
