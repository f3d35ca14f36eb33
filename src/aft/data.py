"""Group records: JSONL in and out, the accepted input formats, tokenisation and collation into tensors.

A *group* is one question with its candidate chains of thought, one JSON object per line::

    {"id": "q17", "prompt": "Question: ...\\nAnswer:", "completions": [" 3 + 4 = 7\\n#### 7", " ..."],
     "labels": [1, 0], "correct": [true, false], "answer": "7", "reference": " 3 + 4 = 7\\n#### 7"}

``labels`` higher is better (binary 1/0, or graded for ranking feedback); ``correct`` (optional) marks the
positives that the NLL term may train on; ``reference`` (optional) is the reference COT. ``aft sample``
writes groups without labels, ``aft label`` adds them. Two peer formats are accepted as input too:

- TRL preference pairs ``{"prompt", "chosen", "rejected"}``: lines with the same prompt merge into one
  group, chosen completions labelled 1 and rejected 0;
- RRHF ``{"query", "responses", "scores"}``: one group, the scores as labels.

Bad input never passes silently: a malformed line or a missing field raises ``DataError`` naming the file
and line; an empty completion or one longer than ``max_length`` is skipped and counted in a report.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path

import torch

from aft.checks import AftError


class DataError(AftError):
    """Bad input data; the message names the file and line."""


def read_jsonl(path):
    """Yield ``(line_number, object)`` for each non-blank line; a malformed line raises ``DataError``."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file")
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{path}:{number}: not valid UTF-8 (byte {err.start} of the line)") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as err:
                raise DataError(f"{path}:{number}: not valid JSON ({err.msg} at column {err.colno})") from None
            if not isinstance(obj, dict):
                raise DataError(f"{path}:{number}: expected a JSON object, got {type(obj).__name__}")
            yield number, obj


def write_jsonl(path, records) -> None:
    """Write records atomically (a temporary file renamed into place), so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _require(obj, fields, where):
    missing = [f for f in fields if f not in obj]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)} (has: {', '.join(sorted(obj))})")


def load_groups(path, require_labels: bool = True):
    """Read groups in any accepted format from ``path``, a JSONL file, or from rows already in memory (a
    ``datasets.Dataset`` or a list of dicts). Returns ``(groups, report)``.

    ``report`` counts what was read and what was skipped, by reason, so nothing disappears unseen.
    """
    groups: dict[str, dict] = {}
    report = Counter()
    in_memory = not isinstance(path, (str, os.PathLike))
    rows = ((number, dict(row)) for number, row in enumerate(path, start=1)) if in_memory else read_jsonl(path)
    for number, obj in rows:
        where = f"dataset row {number}" if in_memory else f"{path}:{number}"
        if "chosen" in obj or "rejected" in obj:            # TRL pairs: merge by prompt
            _require(obj, ["prompt", "chosen", "rejected"], where)
            if not all(isinstance(obj[key], str) for key in ("prompt", "chosen", "rejected")):
                raise DataError(f"{where}: prompt, chosen and rejected must be strings (TRL's conversational "
                                "format: apply the chat template first)")
            g = groups.setdefault(obj["prompt"], {"id": f"pair-{len(groups)}", "prompt": obj["prompt"],
                                                  "completions": [], "labels": []})
            for text, label in ((obj["chosen"], 1.0), (obj["rejected"], 0.0)):
                if text not in g["completions"]:
                    g["completions"].append(text)
                    g["labels"].append(label)
            report["pairs"] += 1
            continue
        if "query" in obj:                                    # RRHF
            _require(obj, ["query", "responses", "scores"], where)
            obj = {"id": obj.get("id", f"line-{number}"), "prompt": obj["query"],
                   "completions": obj["responses"], "labels": obj["scores"]}
        _require(obj, ["prompt", "completions"] + (["labels"] if require_labels else []), where)
        _check_group(obj, where)
        obj.setdefault("id", f"line-{number}")
        if obj["id"] in groups:
            raise DataError(f"{where}: duplicate group id {obj['id']!r}")
        groups[obj["id"]] = obj
    out = list(groups.values())
    for g in out:
        report["groups"] += 1
        report["candidates"] += len(g["completions"])
        if "labels" in g:
            labels = g["labels"]
            if not labels or max(labels) == min(labels):
                report["groups without a pair (NLL only)"] += 1
    return out, report


def _check_group(obj, where):
    """Types a group must have: a malformed one stops with its line named, never half-read."""
    if not isinstance(obj["prompt"], str):
        raise DataError(f"{where}: 'prompt' must be a string, got {obj['prompt']!r:.40}")
    texts = obj["completions"]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataError(f"{where}: 'completions' must be a list of strings, got {texts!r:.60}")
    for key, kind in (("labels", "numbers"), ("correct", "true/false values")):
        if key not in obj:
            continue
        values = obj[key]
        ok = isinstance(values, list) and all(
            isinstance(v, bool) if key == "correct" else
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
        if not ok:
            raise DataError(f"{where}: '{key}' must be a list of {kind}"
                            f"{' (finite)' if key == 'labels' else ''}, one per completion, got {values!r:.60}")
        if len(values) != len(texts):
            raise DataError(f"{where}: {len(values)} {key} for {len(texts)} completions")


def positives(group) -> list[bool]:
    """Which candidates the NLL term may train on: ``correct`` if given, else the best label when it beats another."""
    if "correct" in group:
        return [bool(c) for c in group["correct"]]
    labels = group["labels"]
    top = max(labels, default=0)
    return [lab == top and top > min(labels) for lab in labels]


# ---- tokenisation -------------------------------------------------------------------------------------

def encode_prompt(tokenizer, prompt: str) -> list[int]:
    """Prompt token ids with the tokenizer's own special tokens (BOS for Llama-style tokenizers)."""
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, completion: str) -> list[int]:
    """Completion token ids, ending in EOS so the model learns to stop."""
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def tokenize_group(tokenizer, group, max_length: int, report: Counter, nll_on: str = "reference"):
    """Token ids of one group's prompt, its candidates and its reference; drops what cannot be used, counted."""
    prompt_ids = encode_prompt(tokenizer, group["prompt"])
    room = max_length - len(prompt_ids)
    keep, completion_ids = [], []
    for i, text in enumerate(group["completions"]):
        if not text.strip():
            report["skipped: empty completion"] += 1
            continue
        ids = encode_completion(tokenizer, text)
        if len(ids) > room:
            report["skipped: longer than max_length"] += 1
            continue
        keep.append(i)
        completion_ids.append(ids)
    is_positive = positives(group)
    feature = {
        "prompt_ids": prompt_ids,
        "completion_ids": completion_ids,
        "labels": [float(group["labels"][i]) for i in keep],
        "positive": [is_positive[i] for i in keep],
    }
    if "ref_logps" in group:
        feature["ref_logps"] = [group["ref_logps"][i] for i in keep]
    reference = group.get("reference")
    if nll_on in ("reference", "both") and reference:
        ids = encode_completion(tokenizer, reference)
        if len(ids) <= room:
            feature["reference_ids"] = ids
        else:
            report["skipped: reference longer than max_length"] += 1
    return feature


def _pad(rows, value):
    width = max(len(r) for r in rows)
    return torch.tensor([r + [value] * (width - len(r)) for r in rows])


def sequences_batch(prompts, completions, pad_id: int):
    """Right-padded ``input_ids``, ``attention_mask`` and ``completion_mask`` for (prompt, completion) id lists."""
    ids = [p + c for p, c in zip(prompts, completions)]
    comp = [[0] * len(p) + [1] * len(c) for p, c in zip(prompts, completions)]
    return {
        "input_ids": _pad(ids, pad_id),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0),
        "completion_mask": _pad(comp, 0).bool(),
    }


class SFTCollator:
    """Batches ``{"prompt_ids", "completion_ids"}`` features (one completion each) for the NLL loss."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, features):
        return sequences_batch([f["prompt_ids"] for f in features], [f["completion_ids"] for f in features],
                               self.pad_id)


class GroupCollator:
    """Flattens a batch of groups into sequences, and keeps the (groups x candidates) layout to fold back.

    Output: the sequence tensors of ``sequences_batch`` plus ``group_index`` / ``candidate_index`` (-1 for
    a reference COT, which only feeds the NLL term), ``nll_weight`` per sequence, and the (G x K)
    ``labels``, ``candidate_mask`` and (for DPO) ``ref_logps``.
    """

    def __init__(self, pad_id: int, nll_on: str = "reference"):
        self.pad_id = pad_id
        self.nll_on = nll_on

    def nll_candidates(self, feature) -> set[int]:
        """The candidates the NLL term trains on: every positive (``positives``, ``both``), or under ``best``
        one, the positive of the highest label (the first of equals), as RRHF and PRO train their SFT term."""
        found = [k for k, p in enumerate(feature["positive"]) if p]
        if self.nll_on in ("positives", "both"):
            return set(found)
        if self.nll_on == "best" and found:
            return {max(found, key=lambda k: (feature["labels"][k], -k))}
        return set()

    def __call__(self, features):
        prompts, completions, group_index, candidate_index, nll_weight = [], [], [], [], []
        width = max(1, max(len(f["completion_ids"]) for f in features))
        labels = torch.zeros(len(features), width)
        mask = torch.zeros(len(features), width, dtype=torch.bool)
        ref_logps = torch.zeros(len(features), width)
        for g, f in enumerate(features):
            on = self.nll_candidates(f)
            for k, ids in enumerate(f["completion_ids"]):
                prompts.append(f["prompt_ids"])
                completions.append(ids)
                group_index.append(g)
                candidate_index.append(k)
                nll_weight.append(float(k in on))
            n = len(f["completion_ids"])
            labels[g, :n] = torch.tensor(f["labels"])
            mask[g, :n] = True
            if "ref_logps" in f:
                ref_logps[g, :n] = torch.tensor(f["ref_logps"])
            if "reference_ids" in f:
                prompts.append(f["prompt_ids"])
                completions.append(f["reference_ids"])
                group_index.append(g)
                candidate_index.append(-1)
                nll_weight.append(1.0)
        batch = sequences_batch(prompts, completions, self.pad_id)
        batch.update(group_index=torch.tensor(group_index), candidate_index=torch.tensor(candidate_index),
                     nll_weight=torch.tensor(nll_weight), labels=labels, candidate_mask=mask, ref_logps=ref_logps)
        return batch
