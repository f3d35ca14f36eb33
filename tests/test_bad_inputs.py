"""Every bad input of issue 15, through the `aft` command as a process: exit status, one line on stderr that
names the file or flag (no traceback), and the working folder unchanged (checksums before and after: no
existing file changed, no partial output left). Then real SIGKILLs during `aft sample` and `aft align` and a
partial checkpoint, each rerun ending identical to an uninterrupted run, and reruns with other settings.

The commands run as children forked from one process that imported aft once (tests/aft_forks.py), so each
costs its own work, not 5-10 s of imports. ``python tests/test_bad_inputs.py`` prints the catalogue as a
markdown table for whichever aft is on PYTHONPATH (how the before/after table of issue 15 was measured).
"""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

TASK = "arithmetic:min_steps=1,max_steps=2,n_train=24,n_val=4,n_test=6"
HERE = Path(__file__).resolve().parent


class Forks:
    """A client of tests/aft_forks.py: ``start`` an aft command (returns its pid), ``wait`` for its exit."""

    def __init__(self, logs: Path):
        self.logs, self.count = logs, 0
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parent / "src"), *sys.path]),
               "TOKENIZERS_PARALLELISM": "false"}
        if "AFT_SRC" in os.environ:  # the catalogue's "before" column: another checkout's code
            env["PYTHONPATH"] = os.environ["AFT_SRC"]
        self.proc = subprocess.Popen([sys.executable, str(HERE / "aft_forks.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)

    def _ask(self, request):
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def start(self, argv, cwd, env=None):
        self.count += 1
        out, err = self.logs / f"{self.count}.out", self.logs / f"{self.count}.err"
        pid = self._ask({"argv": [str(a) for a in argv], "cwd": str(cwd), "env": env or {}, "stdout": str(out),
                         "stderr": str(err)})["pid"]
        return pid, out, err

    def wait(self, pid):
        return self._ask({"wait": pid})["rc"]

    def run(self, argv, cwd, env=None):
        """(exit status, stdout, stderr) of one command."""
        pid, out, err = self.start(argv, cwd, env)
        rc = self.wait(pid)
        return rc, out.read_text(errors="replace"), err.read_text(errors="replace")

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def checksums(folder: Path, skip=("hf",)) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*")) if p.relative_to(folder).parts[0] not in skip}


def groups(rows) -> str:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def group(i, labels=(1, 0), completions=None, **extra):
    a, b = i % 5 + 1, i % 3 + 2
    right, wrong = f" {a} + {b} = {a + b}\n#### {a + b}", f" {a} + {b} = {a + b + 1}\n#### {a + b + 1}"
    return {"id": f"q{i}", "prompt": f"Question: {a} + {b}?\nAnswer:", "answer": str(a + b),
            "completions": completions if completions is not None else [right, wrong], "labels": list(labels)
            if isinstance(labels, tuple) else labels, "correct": [True, False], "reference": right, **extra}


def make_inputs(work: Path):
    """The files the cases read: models (good, broken in four ways, one with only 32 positions), groups files
    (good, and one per bad field), data files, configs, and a user's files that no stage may touch."""
    from aft.pipeline import InitConfig, init

    init(InitConfig(task=TASK, output_dir=str(work / "base"), size="test", vocab_size=300))
    init(InitConfig(task=TASK, output_dir=str(work / "short"), size="test", vocab_size=300, max_length=32))
    for name in ("base", "short"):
        (work / name / "aft-manifest.json").unlink(missing_ok=True)  # plain checkpoints, as a user's would be
    (work / "empty_model").mkdir()
    shutil.copytree(work / "base", work / "no_tokenizer")
    for p in (work / "no_tokenizer").glob("tokenizer*"):
        p.unlink()
    (work / "no_tokenizer" / "special_tokens_map.json").unlink(missing_ok=True)
    shutil.copytree(work / "base", work / "truncated")
    weights = work / "truncated" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    shutil.copytree(work / "base", work / "bin_only")
    (work / "bin_only" / "model.safetensors").rename(work / "bin_only" / "pytorch_model.bin")
    rows = [group(i) for i in range(8)]
    (work / "groups.jsonl").write_text(groups(rows))
    (work / "nopair.jsonl").write_text(groups(group(i, labels=(1, 1)) for i in range(4)))
    long_text = " " + " + ".join(["1"] * 40) + " = 40\n#### 40"
    (work / "long.jsonl").write_text(groups(group(i, completions=[long_text, " 1 + 1 = 3\n#### 3"]) for i in range(4)))
    for name, bad in {"labels_bad": '"bad"', "labels_null": "null", "labels_one": "1", "labels_str10": '"10"',
                      "labels_nan": "[NaN, 0]", "completions_numbers": None}.items():
        row = json.dumps(rows[0])
        row = row.replace('"labels": [1, 0]', f'"labels": {bad}') if bad else \
            row.replace(json.dumps(rows[0]["completions"]), "[1, 2]")
        (work / f"{name}.jsonl").write_text(groups([json.dumps(rows[1]), row]))
    (work / "bad_utf8.jsonl").write_bytes(b'{"question": "1 + 1?", "answer": "#### 2"}\n{"question": "caf\xe9"}\n')
    (work / "empty.jsonl").write_text("")
    (work / "notes.txt").write_text("my notes\nthe last line, with no newline")  # a user's file
    (work / "a_folder").mkdir()
    (work / "a_folder" / "keep.txt").write_text("keep me\n")
    (work / "user_eval").mkdir()
    (work / "user_eval" / "predictions.jsonl").write_text('{"mine": true}\n')
    (work / "syntax.yaml").write_text("model: base\ngroups: groups.jsonl\nbeta: [1\n")
    (work / "beta_abc.yaml").write_text("model: base\ngroups: groups.jsonl\noutput_dir: out_yaml\nbeta: abc\n")
    (work / "unknown_key.yaml").write_text("model: base\ngroups: groups.jsonl\nbta: 0.1\n")


S = ["sample", "--model", "base", "--task", TASK, "--limit", "2", "--max_new_tokens", "4", "--output", "s.jsonl"]
A = ["align", "--model", "base", "--groups", "groups.jsonl", "--output_dir", "out_align", "--max_steps", "1",
     "--report_to", "none"]
E = ["eval", "--model", "base", "--task", TASK, "--max_new_tokens", "4", "--output"]
NO_NET = {"HF_HUB_OFFLINE": "1", "HF_HOME": "hf", "HF_DATASETS_CACHE": "hf/datasets"}

# (case, argv, exit status, what stderr must name, extra environment)
CASES = [
    ("--model: no such path", [*S[:2], "no/such/model", *S[3:]], 1, "no/such/model", None),
    ("--model: a name that is no folder, no network", [*S[:2], "vft_typo", *S[3:]], 1, "vft_typo", NO_NET),
    ("--model: an empty folder", [*S[:2], "empty_model", *S[3:]], 1, "empty_model", None),
    ("--model: no tokenizer", [*S[:2], "no_tokenizer", *S[3:]], 1, "no_tokenizer", None),
    ("--model: truncated safetensors", [*S[:2], "truncated", *S[3:]], 1, "truncated", None),
    ("--model: only .bin weights", [*S[:2], "bin_only", *S[3:]], 1, "bin_only", None),
    ("hub task, no network", ["sample", "--model", "base", "--task", "gsm8k", "--output", "s.jsonl"], 1,
     "--data_path", NO_NET),
    ("--task arithmetic:max_steps=x", [*S[:4], "arithmetic:max_steps=x", *S[5:]], 1, "max_steps", None),
    ("--task unknown option", [*S[:4], "arithmetic:colour=red", *S[5:]], 1, "colour", None),
    ("invalid UTF-8 in a data file", [*S, "--task", "gsm8k", "--data_path", "bad_utf8.jsonl"], 1, "bad_utf8.jsonl:2",
     None),
    ('labels "bad"', [*A[:4], "labels_bad.jsonl", *A[5:]], 1, "labels_bad.jsonl:2", None),
    ("labels null", [*A[:4], "labels_null.jsonl", *A[5:]], 1, "labels_null.jsonl:2", None),
    ("labels 1 (not a list)", [*A[:4], "labels_one.jsonl", *A[5:]], 1, "labels_one.jsonl:2", None),
    ('labels "10"', [*A[:4], "labels_str10.jsonl", *A[5:]], 1, "labels_str10.jsonl:2", None),
    ("labels NaN", [*A[:4], "labels_nan.jsonl", *A[5:]], 1, "labels_nan.jsonl:2", None),
    ("completions are numbers", [*A[:4], "completions_numbers.jsonl", *A[5:]], 1, "completions_numbers.jsonl:2",
     None),
    ("YAML syntax error", ["align", "syntax.yaml"], 1, "syntax.yaml", None),
    ("beta: abc in YAML", ["align", "beta_abc.yaml"], 1, "beta", None),
    ("unknown key in YAML", ["align", "unknown_key.yaml"], 2, "bta", None),
    ("--beta abc", [*A, "--beta", "abc"], 2, "--beta", None),
    ("unknown flag", [*S, "--temprature", "1"], 2, "--temprature", None),
    ("sample --output an existing folder", [*S[:-1], "a_folder"], 1, "a_folder", None),
    ("label --output an existing folder", ["label", "--task", TASK, "--groups", "groups.jsonl", "--output",
                                           "a_folder"], 1, "a_folder", None),
    ("eval --output an existing folder", [*E, "a_folder"], 1, "a_folder", None),
    ("sample --output a user's file", [*S[:-1], "notes.txt"], 1, "notes.txt", None),
    ("label --output a user's file", ["label", "--task", TASK, "--groups", "groups.jsonl", "--output",
                                      "notes.txt"], 1, "notes.txt", None),
    ("eval beside a user's predictions.jsonl", [*E, "user_eval/eval.json"], 1, "predictions.jsonl", None),
    ("--k 0", [*S, "--k", "0"], 1, "--k", None),
    ("--k -2", [*S, "--k", "-2"], 1, "--k", None),
    ("--top_p 2", [*S, "--top_p", "2"], 1, "--top_p", None),
    ("--batch_size -1", [*S, "--batch_size", "-1"], 1, "--batch_size", None),
    ("--temperature -1", [*S, "--temperature", "-1"], 1, "--temperature", None),
    ("--temperature 0 --k 2", [*S, "--temperature", "0", "--k", "2"], 1, "--k", None),
    ("--beta -1", [*A, "--beta", "-1"], 1, "--beta", None),
    ("--nll_weight -5", [*A, "--nll_weight", "-5"], 1, "--nll_weight", None),
    ("--lora_r -4", [*A, "--lora_r", "-4"], 1, "--lora_r", None),
    ("sample: empty data file", [*S, "--data_path", "empty.jsonl"], 1, "empty.jsonl", None),
    ("eval: empty data file", [*E, "e.json", "--data_path", "empty.jsonl"], 1, "empty.jsonl", None),
]


@pytest.fixture(scope="module")
def forks(tmp_path_factory):
    logs = tmp_path_factory.mktemp("logs")
    server = Forks(logs)
    yield server
    server.close()


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    folder = tmp_path_factory.mktemp("work")
    make_inputs(folder)
    return folder


def test_every_bad_input_is_one_line_and_changes_nothing(forks, work):
    before, failures = checksums(work), []
    started = time.time()
    for case, argv, status, names, env in CASES:
        t0 = time.time()
        rc, _, err = forks.run(argv, work, env)
        lines = [line for line in err.splitlines() if line.strip()]
        after = checksums(work)
        problems = [p for p, ok in [
            (f"exit {rc}, not {status}", rc == status),
            (f"{len(lines)} stderr lines", len(lines) == 1),
            ("a traceback", "Traceback" not in err),
            (f"does not name {names!r}", names in err),
            (f"files changed or left: {sorted(set(after.items()) ^ set(before.items()))}", after == before),
        ] if not ok]
        if case == "hub task, no network" and time.time() - t0 > 15:
            problems.append(f"took {time.time() - t0:.0f} s")
        if problems:
            failures.append(f"{case}: {'; '.join(problems)}\n    {err.strip()[-300:]}")
            before = after
    assert not failures, "\n".join(failures)
    print(f"{len(CASES)} cases in {time.time() - started:.1f} s")


def test_warned_and_counted_not_silent(forks, work, tmp_path):
    """Groups with no pair at all: a warning (the run trains NLL only). Sequences longer than the model's
    positions (32 here) but under max_length (512): skipped and counted."""
    rc, _, err = forks.run(["align", "--model", work / "base", "--groups", work / "nopair.jsonl", "--output_dir",
                            "nopair", "--max_steps", "1", "--report_to", "none"], tmp_path)
    assert rc == 0 and "warning" in err and "no group has a better and a worse completion" in err
    rc, out, _ = forks.run(["align", "--model", str(work / "short"), "--groups", str(work / "long.jsonl"),
                            "--output_dir", "long", "--max_steps", "1", "--report_to", "none"], tmp_path)
    assert rc == 0 and "model's 32 positions" in out and "skipped: longer than max_length 4" in out


# ---- kills and reruns -----------------------------------------------------------------------------------

def _kill_when(forks, argv, cwd, ready, timeout=120):
    """Start ``argv``, SIGKILL it as soon as ``ready()`` holds; returns the killed child's status."""
    pid, _, err = forks.start(argv, cwd)
    deadline = time.time() + timeout
    while not ready():
        assert time.time() < deadline, err.read_text()
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    return forks.wait(pid)


def test_sample_killed_then_rerun_equals_uninterrupted_and_other_settings_are_refused(forks, work, tmp_path):
    argv = ["sample", "--model", str(work / "base"), "--task", TASK, "--k", "2", "--limit", "12", "--batch_size", "2",
            "--max_new_tokens", "16", "--temperature", "1.0"]
    assert forks.run([*argv, "--output", "whole.jsonl"], tmp_path)[0] == 0
    killed = tmp_path / "killed.jsonl"
    count = lambda: killed.read_bytes().count(b"\n") if killed.exists() else 0  # noqa: E731
    assert _kill_when(forks, [*argv, "--output", "killed.jsonl"], tmp_path, lambda: count() >= 2) == -signal.SIGKILL
    assert 2 <= count() < 12
    assert forks.run([*argv, "--output", "killed.jsonl"], tmp_path)[0] == 0
    assert killed.read_bytes() == (tmp_path / "whole.jsonl").read_bytes()

    finished = killed.read_bytes()
    rc, _, err = forks.run([*argv, "--output", "killed.jsonl", "--k", "3"], tmp_path)
    assert rc == 1 and "killed.jsonl" in err and "k (2 -> 3)" in err and len(err.strip().splitlines()) == 1
    assert killed.read_bytes() == finished
    rc, _, err = forks.run([*argv, "--output", "killed.jsonl", "--k", "3", "--overwrite"], tmp_path)
    assert rc == 0 and {json.loads(x)["n_sampled"] for x in killed.read_text().splitlines()} == {3}


def _weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_align_killed_between_checkpoints_and_in_a_save(forks, work, tmp_path):
    argv = ["align", "--model", str(work / "base"), "--groups", str(work / "groups.jsonl"), "--num_train_epochs", "3",
            "--per_device_train_batch_size", "2", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps",
            "1", "--learning_rate", "1e-2", "--seed", "5", "--report_to", "none"]
    assert forks.run([*argv, "--output_dir", "whole"], tmp_path)[0] == 0
    out = tmp_path / "killed"
    def ready():  # checkpoint-3 complete: its trainer_state.json, written last, whole
        try:
            return "global_step" in json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
        except (OSError, ValueError):
            return False

    assert _kill_when(forks, [*argv, "--output_dir", "killed"], tmp_path, ready) == -signal.SIGKILL
    assert not (out / "model.safetensors").exists()
    # a kill during the next save: a checkpoint-6 with half its weights and no trainer_state.json
    partial = out / "checkpoint-6"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    data = (out / "checkpoint-3" / "model.safetensors").read_bytes()
    (partial / "model.safetensors").write_bytes(data[: len(data) // 2])
    cut = out / "checkpoint-9"  # and one killed while writing its trainer_state.json, the last file of a save
    shutil.copytree(out / "checkpoint-3", cut)
    (cut / "trainer_state.json").write_text((cut / "trainer_state.json").read_text()[:40])
    rc, _, err = forks.run([*argv, "--output_dir", "killed"], tmp_path)
    assert rc == 0 and "skipping" in err and "checkpoint-6: no trainer_state.json" in err
    assert "checkpoint-9: trainer_state.json cut short" in err
    assert "missing keys" not in err  # the tied lm_head is not reported as missing on resume
    whole, resumed = _weights(tmp_path / "whole"), _weights(out)
    assert max((whole[k] - resumed[k]).abs().max().item() for k in whole) < 1e-6
    state = lambda d: json.loads((tmp_path / d / "trainer_state.json").read_text())["log_history"]  # noqa: E731
    losses = lambda d: [h["loss"] for h in state(d) if "loss" in h]  # noqa: E731
    assert losses("killed") == pytest.approx(losses("whole"), rel=1e-6) and len(losses("whole")) == 12
    train_loss = lambda d: next(h["train_loss"] for h in state(d) if "train_loss" in h)  # noqa: E731
    assert train_loss("killed") == pytest.approx(train_loss("whole"), rel=1e-3)  # the whole run's, not 7 steps'

    rc, _, err = forks.run([*argv, "--output_dir", "killed", "--beta", "0.1"], tmp_path)
    assert rc == 1 and "killed" in err and "beta (0.5 -> 0.1)" in err and len(err.strip().splitlines()) == 1


def test_run_refuses_a_changed_stage_and_overwrite_reruns_it(forks, work, tmp_path):
    import yaml

    cfg = {"run_dir": "run", "stages": [{"name": "labeled", "stage": "label", "task": TASK,
                                         "groups": str(work / "groups.jsonl")}]}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    assert forks.run(["run", "run.yaml"], tmp_path)[0] == 0
    cfg["stages"][0]["feedback"] = "steps"
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    rc, out, err = forks.run(["run", "run.yaml"], tmp_path)
    assert rc == 1 and "labeled" in err and "feedback ('binary' -> 'steps')" in err
    rc, out, err = forks.run(["run", "run.yaml", "--overwrite"], tmp_path)
    assert rc == 0 and "settings changed" in out
    labelled = [json.loads(x) for x in (tmp_path / "run" / "labeled" / "groups.jsonl").read_text().splitlines()]
    assert labelled[0]["labels"] == [3.0, 0.0]  # step-verified ranks, not binary labels
    assert "done already" in forks.run(["run", "run.yaml"], tmp_path)[1]


# ---- the catalogue (python tests/test_bad_inputs.py; AFT_SRC=other/src for another checkout) ---------------

def catalogue():
    import tempfile

    work = Path(tempfile.mkdtemp()) / "work"
    work.mkdir()
    make_inputs(work)
    server = Forks(Path(tempfile.mkdtemp()))
    print("| case | exit | stderr lines | files changed/left | first line of stderr (cut) |\n|---|---|---|---|---|")
    for case, argv, _, _, env in CASES:
        before = checksums(work)
        t0 = time.time()
        if env:  # measured without HF_HUB_OFFLINE: on a machine with no network, as a user meets it
            env = {k: v for k, v in env.items() if k != "HF_HUB_OFFLINE"}
        rc, _, err = server.run(argv, work, env)
        after = checksums(work)
        lines = [line for line in err.splitlines() if line.strip()]
        first = next((line for line in lines if "error" in line.lower()), lines[-1] if lines else "")
        changed = sorted({k for k, _ in set(after.items()) ^ set(before.items())})
        print(f"| {case} | {rc} | {len(lines)}{' (traceback)' if 'Traceback' in err else ''} | "
              f"{', '.join(changed) or '-'} | {first.strip()[:110].replace('|', '/')} ({time.time() - t0:.0f} s) |")
        for name in changed:  # start the next case from the same files
            path = work / name
            if name not in before and path.exists():
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        if changed:
            shutil.rmtree(work)
            work.mkdir()
            make_inputs(work)
    server.close()


if __name__ == "__main__":
    catalogue()
