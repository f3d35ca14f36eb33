"""What made an output, recorded beside it, so that no stage reuses a stale result or writes over a user's file.

Every stage calls ``claim`` before it writes anything. It writes a small manifest beside the output
(``FILE.manifest.json`` for a file, ``FOLDER/aft-manifest.json`` for a model folder) holding the stage, its
resolved settings, the identity of its inputs (a hash of a data file, of a model folder's files, or a
hub name) and the package version. Then, on a later run into the same output:

- same settings: the stage resumes (``aft sample``, ``aft sft``/``align`` from a checkpoint) or redoes
  its work, as it would have;
- other settings: it stops with one line naming the output and the changed keys; ``--overwrite``
  replaces the output;
- an output with no manifest (a user's file, a folder not written by aft) is never changed: the stage
  stops, and ``--overwrite`` removes only files, never a folder aft cannot show is its own.

Settings that do not change a result (where things are written, logging, progress bars, workers) are not
compared: ``IGNORED``.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import os
import shutil
from pathlib import Path

from aft.checks import AftError

FOLDER_MANIFEST = "aft-manifest.json"
INPUT_FIELDS = ("model", "tokenizer", "data_path", "groups", "eval_groups", "inputs")
IGNORED = {
    "output", "output_dir", "overwrite", "logging_dir", "logging_steps", "logging_strategy", "logging_first_step",
    "logging_nan_inf_filter", "log_level", "log_level_replica", "log_on_each_node", "report_to", "run_name",
    "disable_tqdm", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "save_steps", "save_strategy", "save_total_limit", "save_only_model",
    "save_safetensors", "save_on_each_node", "push_to_hub", "hub_model_id", "hub_strategy", "hub_token",
    "hub_private_repo", "hub_always_push", "hub_revision", "resume_from_checkpoint", "local_rank", "ddp_timeout",
    "trackio_space_id", "project", *INPUT_FIELDS,
}


@dataclasses.dataclass
class OutputFields:
    """The flag every stage that writes an output has."""

    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "Replace an output made with other settings (without it such a run stops and names the changes)."})


def output_of(config) -> tuple[Path, bool]:
    """(the output path, whether it is a folder) of a stage config."""
    if hasattr(config, "output"):
        return Path(config.output), False
    return Path(config.output_dir), True


def manifest_path(output: Path, folder: bool) -> Path:
    return output / FOLDER_MANIFEST if folder else output.with_name(output.name + ".manifest.json")


def _plain(value):
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)


def settings(config) -> dict:
    """The config's values that decide its result."""
    values = config.to_dict() if hasattr(config, "to_dict") else {
        f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    return {k: _plain(v) for k, v in sorted(values.items()) if k not in IGNORED and not k.startswith("_")}


def _file_hash(path: Path) -> str:
    h, size = hashlib.sha256(), path.stat().st_size
    with path.open("rb") as f:
        if size <= 256 << 20:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:  # a large weights file: its size, header and tail (hashing gigabytes on every run costs minutes)
            h.update(str(size).encode() + f.read(1 << 20))
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read())
    return h.hexdigest()[:16]


def identity(value: str | list[str] | None) -> str | list | None:
    """What an input is: a hash of a local file or folder (a model made by aft: what made it), else its name;
    for a list of inputs, each one's."""
    if isinstance(value, (list, tuple)):
        return [identity(v) for v in value]
    if not value:
        return value
    path = Path(value)
    if path.is_file():
        return "file:" + _file_hash(path)
    if path.is_dir():
        own = path / FOLDER_MANIFEST
        if own.is_file():
            record = json.loads(own.read_text())
            return "aft:" + _digest({k: record.get(k) for k in ("stage", "settings", "inputs")})
        h = hashlib.sha256()
        for child in sorted(path.iterdir()):
            if child.is_file() and child.name != "trainer_state.json":
                h.update(f"{child.name}:{_file_hash(child)};".encode())
        return "folder:" + h.hexdigest()[:16]
    return "name:" + value


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def record(stage: str, config) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    try:
        aft_version = version("aft")
    except PackageNotFoundError:
        aft_version = "unknown"
    inputs = {name: identity(getattr(config, name)) for name in INPUT_FIELDS if getattr(config, name, None)}
    return {"stage": stage, "settings": settings(config), "inputs": inputs, "aft_version": aft_version}


def changes(old: dict, new: dict) -> list[str]:
    """The keys whose values differ between two records (an input counts when its content differs)."""
    if old.get("stage") != new["stage"]:
        return [f"stage ({old.get('stage')} -> {new['stage']})"]
    out = []
    for part in ("settings", "inputs"):
        a, b = old.get(part, {}), new[part]
        for key in sorted(set(a) | set(b)):
            if a.get(key) != b.get(key):
                out.append(f"{key} ({a.get(key)!r} -> {b.get(key)!r})" if part == "settings" else f"{key} (content)")
    return out


def read_manifest(config) -> dict | None:
    output, folder = output_of(config)
    path = manifest_path(output, folder)
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise AftError(f"{path}: damaged manifest; remove {output} (or pass --overwrite) to start again") from None


def resolved(config, key: str):
    """What a setting (``gen_dtype=auto``) resolved to in the run that began this output, or None."""
    return ((read_manifest(config) or {}).get("resolved") or {}).get(key)


def note_resolved(config, key: str, value) -> None:
    """Record in the output's manifest what a setting resolved to (the main process; after ``claim``), so that
    a resumed run continues as the first did, on whatever machine it runs."""
    if not _main_process():
        return
    manifest = read_manifest(config)
    if manifest is None:
        return
    manifest.setdefault("resolved", {})[key] = value
    _write_manifest(manifest_path(*output_of(config)), manifest)


def stale(stage: str, config) -> list[str]:
    """The changed keys that stop a rerun into this config's output (empty: same settings or no output)."""
    output, folder = output_of(config)
    if not _occupied(output, folder):
        return []
    old = read_manifest(config)
    return ["(no manifest: not made by aft)"] if old is None else changes(old, record(stage, config))


def _occupied(output: Path, folder: bool) -> bool:
    if folder:
        return output.is_dir() and any(output.iterdir())
    return output.exists()


def _remove(path: Path):
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def claim(stage: str, config, also: tuple[Path, ...] = (), write: bool = True) -> None:
    """Make sure ``stage`` may write its output (and the files ``also`` beside it), then record what makes it.

    Raises ``AftError`` (nothing changed on disk) when the output is not this stage's own or was made with
    other settings and ``config.overwrite`` is off. Only the main process of a multi-process run writes;
    ``write=False`` only checks (a stage that loads a model first checks before it, claims after).

    The other processes of a multi-process run neither check nor write: the main process decides, and the
    launcher stops the others when it refuses. A second process looking at the output while the main one
    claims it can see it half-claimed (the manifest's ``.tmp`` beside no manifest) and refuse it as foreign,
    which failed a two-process CI run.
    """
    if not _main_process():
        return
    output, folder = output_of(config)
    if folder and output.exists() and not output.is_dir():
        raise AftError(f"--output_dir {output}: is a file, not a folder")
    if not folder and output.is_dir():
        raise AftError(f"--output {output}: is a folder; give a file name")
    if not folder:
        also = (*also, output.with_name(output.name + ".tmp"))
    new, old = record(stage, config), read_manifest(config)
    if old is not None and not any(_occupied(p, folder and p == output) for p in (output, *also)):
        old = None  # a manifest left by a run that stopped before writing anything
    if old is not None and old.get("resolved") and not changes(old, new):
        new["resolved"] = old["resolved"]  # a resumed run: what its first run resolved still holds
    overwrite = getattr(config, "overwrite", False)
    if old is None:
        foreign = [p for p in (output, *also) if _occupied(p, folder and p == output)]
        if foreign and (folder or not overwrite):
            raise AftError(f"{foreign[0]} exists and was not written by aft {stage} (no "
                           f"{manifest_path(output, folder).name}); choose another output or remove it"
                           + ("" if folder else " (--overwrite replaces it)"))
        stale_files = foreign
    else:
        changed = changes(old, new)
        if changed and not overwrite:
            raise AftError(f"{output} was made with other settings: {'; '.join(changed)}. Pass --overwrite to "
                           "replace it, or choose another output")
        stale_files = [output, *also] if overwrite else []
    if not write:
        return
    for path in stale_files:
        _remove(path)
    _write_manifest(manifest_path(output, folder), new)


def _main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _write_manifest(path: Path, manifest: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, path)
