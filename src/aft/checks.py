"""Input checks every stage config runs in ``__post_init__``, before any file is created, and the error
types the ``aft`` command turns into one line.

``check_config`` checks each field's type (a YAML file can hold ``beta: abc``; flags are converted by the
parser) and each field's range, from one table keyed by field name, since the same name means the same
thing in every stage (``k``, ``batch_size``, ``beta``, ...).
"""

from __future__ import annotations

import dataclasses
import math
import typing


class AftError(ValueError):
    """A bad input a user can fix; the message names the file, line, flag or field."""


class UsageError(AftError):
    """Bad command-line usage (unknown flag, a value of the wrong type): exit status 2."""


# field -> (test, what it must be). A field missing here takes any value of its type.
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_POSITIVE = (lambda v: v > 0, "greater than 0")
_NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
RANGES = {
    "k": _AT_LEAST_1, "batch_size": _NON_NEGATIVE, "batch_tokens": _NON_NEGATIVE, "max_new_tokens": _AT_LEAST_1, "limit": _AT_LEAST_1,
    "max_length": _AT_LEAST_1, "max_candidates": _AT_LEAST_1, "candidate_micro_batch": _AT_LEAST_1,
    "eval_limit": _AT_LEAST_1, "eval_max_new_tokens": _AT_LEAST_1, "vocab_size": _AT_LEAST_1,
    "temperature": _NON_NEGATIVE, "vote_temperature": _NON_NEGATIVE, "vote_samples": _NON_NEGATIVE,
    "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "beta": _NON_NEGATIVE, "dpo_beta": _POSITIVE, "dpo_boundary": _NON_NEGATIVE, "nll_weight": _NON_NEGATIVE,
    "align_weight": _NON_NEGATIVE, "offset": _NON_NEGATIVE, "early_stopping_min_epochs": _NON_NEGATIVE,
    "lora_r": _NON_NEGATIVE, "lora_alpha": _POSITIVE, "lora_dropout": (lambda v: 0 <= v < 1, "in [0, 1)"),
    "early_stopping_patience": _AT_LEAST_1, "per_device_train_batch_size": _AT_LEAST_1,
    "per_device_eval_batch_size": _AT_LEAST_1, "gradient_accumulation_steps": _AT_LEAST_1,
    "learning_rate": _NON_NEGATIVE, "warmup_steps": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
}
CHOICES = {"model_dtype": ("float32", "bfloat16", "float16", "auto"), "gen_dtype": ("auto", "float32", "bfloat16"),
           "save_dtype": ("float32", "bfloat16")}
_SIMPLE = {"int": int, "float": float, "str": str, "bool": bool}


def _allowed(annotation) -> set[str] | None:
    """{"int", "None"} for ``int | None`` / ``Optional[int]``; None for a type this check does not handle."""
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    text = text.replace("Optional[", "").replace("]", "").replace("typing.", "")
    names = {t.strip() for t in text.split("|")}
    return names if names <= set(_SIMPLE) | {"None"} else None


def _type_ok(value, names: set[str]) -> bool:
    if value is None:
        return "None" in names
    if isinstance(value, bool):
        return "bool" in names
    if isinstance(value, int):
        return bool(names & {"int", "float"})
    if isinstance(value, float):
        return "float" in names and math.isfinite(value)
    return isinstance(value, str) and "str" in names


def check_config(config) -> None:
    """Raise ``AftError`` naming the field for a value of the wrong type or out of its range."""
    hints = typing.get_type_hints(type(config))  # not field.type: HfArgumentParser rewrites it (drops "| None")
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_"):
            continue
        value, names = getattr(config, f.name), _allowed(hints.get(f.name, f.type))
        if names is not None and not _type_ok(value, names):
            kind = " or ".join(sorted(names - {"None"}))
            raise AftError(f"{f.name}: expected {'a finite ' if 'float' in names else ''}{kind}"
                           f"{' or null' if 'None' in names else ''}, got {value!r}")
        if f.name in CHOICES:
            check_choice(f.name, value, CHOICES[f.name])
        if f.name in ("task", "eval_task") and value:
            from aft.tasks import load_task

            try:
                load_task(value)
            except (TypeError, ValueError) as err:
                raise AftError(f"--{f.name} {value!r}: {err}") from None
        if f.name in RANGES and value is not None and not isinstance(value, bool) \
                and isinstance(value, (int, float)):
            test, what = RANGES[f.name]
            if not test(value):
                raise AftError(f"--{f.name} must be {what}; got {value!r}")


def require(config, *names: str) -> None:
    """Fields a stage cannot run without, and its model folder complete: checked when the stage starts, as
    its inputs may not exist yet when the config is built (``aft run`` builds a stage's config ahead of it;
    the configs are Trainer arguments in tests, without a model)."""
    for name in names:
        if not getattr(config, name):
            raise AftError(f"--{name} is required (see the stage's --help)")
    if "model" in names:
        check_model(config.model, "--model", tokenizer=not config.tokenizer)
        if config.tokenizer:
            check_model(config.tokenizer, "--tokenizer", weights=False)


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise AftError(f"--{name} must be one of {', '.join(map(str, choices))}; got {value!r}")


def hub_reachable(timeout: float = 3.0) -> bool:
    """False when HF_HUB_OFFLINE is set or the hub's host cannot be reached within ``timeout`` seconds."""
    import os
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co")).hostname
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _looks_like_a_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``) is meant as a folder."""
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def check_safetensors(path) -> str | None:
    """Why a safetensors file is damaged (a truncated copy, a kill while saving), or None if its header
    and size agree. Reads the header only."""
    import json
    import os

    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return f"{size} bytes, too short for a header"
        n = int.from_bytes(head, "little")
        if 8 + n > size:
            return f"header of {n} bytes in a file of {size}"
        try:
            header = json.loads(f.read(n))
        except ValueError:
            return "header is not valid JSON"
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    return None if 8 + n + end == size else f"holds {size} bytes, its header describes {8 + n + end}"


def check_model(name: str, flag: str, weights: bool = True, tokenizer: bool = True) -> None:
    """A local model folder has a config, whole safetensors weights and a tokenizer; a name that can only be a
    path names a folder that exists. (Hub names are left to the hub.)"""
    from pathlib import Path

    path = Path(name).expanduser()
    if not path.exists():
        if _looks_like_a_path(name):
            raise AftError(f"{flag} {name}: no such folder")
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json" if weights else "tokenizer_config.json"), str) \
                and not hub_reachable():
            raise AftError(f"{flag} {name}: no such folder, and no network to fetch it from the Hugging Face hub")
        return
    if not path.is_dir():
        raise AftError(f"{flag} {name}: is a file; give the model's folder")
    files = {p.name for p in path.iterdir()}
    if weights and not files & {"config.json", "adapter_config.json"}:
        raise AftError(f"{flag} {name}: no config.json, not a model folder")
    if weights:
        shards = sorted(path.glob("*.safetensors"))
        if not shards:
            found = " (it has .bin files: aft loads safetensors only, never pickles; convert them with " \
                    "save_pretrained(safe_serialization=True))" if any(f.endswith(".bin") for f in files) else ""
            raise AftError(f"{flag} {name}: no .safetensors weights{found}")
        for shard in shards:
            problem = check_safetensors(shard)
            if problem:
                raise AftError(f"{flag} {name}: {shard.name} is damaged ({problem})")
    if tokenizer and not files & {"tokenizer.json", "tokenizer_config.json", "tokenizer.model"}:
        raise AftError(f"{flag} {name}: no tokenizer files (tokenizer.json, tokenizer_config.json); pass --tokenizer")
