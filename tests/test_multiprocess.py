"""`accelerate launch` with two CPU processes (gloo): sampling is sharded, training is data-parallel.

Each test launches the real CLI (`accelerate launch --config_file configs/accelerate/ddp.yaml
--num_processes 2 -m aft.cli ...`) on a tiny Llama and compares with one process:
- `aft sample`: the merged file of two processes is byte-identical to the one-process file (each batch of
  questions has its own seed, so where it runs does not matter), every question exactly once.
- `aft sft` / `aft align`: two processes x batch 2 against one process x batch 2 x 2 accumulation steps.
  Both average the same two micro-batch gradients per step, so with plain SGD the final weights agree to
  float rounding only if DDP really all-reduced the gradients (rank 0 alone would follow half the data).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from aft.tiny import build_model

pytestmark = pytest.mark.slow
DDP = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "ddp.yaml"
TASK = "arithmetic:min_steps=1,max_steps=2,n_train=32,n_val=4,n_test=8"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, processes: int, timeout: int = 300, script=None):
    """Run `aft ARGS` under `accelerate launch` with the shipped DDP config: on this GPU-less machine,
    `processes` CPU processes over gloo (`--cpu` would not do: it starts one process unless MPI is set up)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DDP),
           "--num_processes", str(processes), "--main_process_port", str(_free_port()), *([script] if script else ["-m", "aft.cli"]), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    # each rank's own error first: the tail alone can be another rank's report that its peer went away.
    # A user-class error is one line `aft STAGE: error: ...` with no rank prefix.
    errors = [line for line in out.stderr.splitlines()
              if ("Error" in line and "[rank" in line) or line.startswith("aft ")][:20]
    assert out.returncode == 0, "\n".join(errors) + "\n...\n" + out.stdout[-3000:] + out.stderr[-3000:]
    return out


# `aft sample` with a count of the questions each process generates for.
COUNTING_SAMPLER = """
import sys
from accelerate import PartialState
import aft.sample
from aft.cli import main

done = []
generate = aft.sample.generate_batch
aft.sample.generate_batch = lambda model, tok, prompts, *a, **k: done.extend(prompts) or generate(model, tok, prompts, *a, **k)
code = main(sys.argv[1:])
state = PartialState()
print(f"rank {state.process_index} of {state.num_processes} ({state.distributed_type}): {len(done)} questions", flush=True)
sys.exit(code)
"""


def test_sample_sharded_across_two_processes_equals_one(checkpoint, tmp_path):
    script = tmp_path / "counting_sample.py"
    script.write_text(COUNTING_SAMPLER)
    common = ["sample", "--model", checkpoint, "--task", TASK, "--split", "train", "--limit", "10", "--k", "3",
              "--batch_size", "3", "--max_new_tokens", "12", "--temperature", "1.0", "--seed", "7"]
    one = launch([*common, "--output", str(tmp_path / "one.jsonl")], processes=1, script=str(script))
    two = launch([*common, "--output", str(tmp_path / "two.jsonl")], processes=2, script=str(script))
    assert "rank 0 of 1 (DistributedType.MULTI_CPU): 10 questions" in one.stdout
    # 4 batches of 3, 3, 3, 1 questions dealt out batch i -> process i mod 2
    assert "rank 0 of 2 (DistributedType.MULTI_CPU): 6 questions" in two.stdout
    assert "rank 1 of 2 (DistributedType.MULTI_CPU): 4 questions" in two.stdout
    one_text, two_text = (tmp_path / "one.jsonl").read_text(), (tmp_path / "two.jsonl").read_text()
    ids = [json.loads(line)["id"] for line in two_text.splitlines()]
    assert len(ids) == 10 and len(set(ids)) == 10          # no question lost, none done twice
    assert two_text == one_text                           # same samples, same order
    assert not list(tmp_path.glob("*.shard*"))            # shards merged and removed


def _scorer_goes_through_forward() -> bool:
    """DDP all-reduces gradients only for a forward it sees: the scorer must call the model it is given."""
    from aft.tiny import build_tokenizer
    from aft.scoring import completion_logprobs

    tok = build_tokenizer(["1 + 2 = 3"] * 4, vocab_size=270)
    model, seen = build_model(tok, size="test"), []
    model.register_forward_pre_hook(lambda *_: seen.append(1))
    ids = torch.tensor([[1, 5, 6, 7]])
    completion_logprobs(model, ids, torch.ones_like(ids), torch.tensor([[0, 0, 1, 1]]).bool())
    return bool(seen)


needs_scorer_fix = pytest.mark.xfail(
    not _scorer_goes_through_forward(), strict=True,
    reason="aft.scoring calls the decoder under the DDP wrapper (hidden_states and the prefix-sharing path), so "
           "DDP never all-reduces the gradients: each process trains on its own half of the data (fix: call "
           "the model it is given)")


def _weights(folder):
    return load_file(str(Path(folder) / "model.safetensors"))


def _losses(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _assert_same_run(one, two):
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-5, worst
    la, lb = _losses(one), _losses(two)
    assert len(la) == len(lb) == 3
    assert la == pytest.approx(lb, rel=1e-5)
    return worst, la


TRAIN = ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--max_steps", "3",
         "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "3", "--report_to", "none"]


@needs_scorer_fix
def test_sft_data_parallel_matches_gradient_accumulation(checkpoint, tmp_path):
    common = ["--model", checkpoint, "--task", TASK, "--limit", "12", *TRAIN]
    launch(["sft", *common, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"], 1)
    launch(["sft", *common, "--output_dir", str(tmp_path / "two")], 2)
    _assert_same_run(tmp_path / "one", tmp_path / "two")
    start = load_file(str(Path(checkpoint) / "model.safetensors"))
    moved = max((w - start[k]).abs().max().item() for k, w in _weights(tmp_path / "two").items())
    assert moved > 1e-3  # it did train


def _groups(path):
    rows = []
    for i in range(12):
        a, b = i % 5 + 1, i % 3 + 2
        rows.append({"id": f"q{i}", "prompt": f"Question: {a} + {b}?\nAnswer:",
                     "completions": [f" {a} + {b} = {a + b}\n#### {a + b}", f" {a} + {b} = {a + b + 1}\n#### {a + b + 1}",
                                     f" {a} * {b} = {a * b}\n#### {a * b}"],
                     "labels": [1, 0, 0], "correct": [True, False, False],
                     "reference": f" {a} + {b} = {a + b}\n#### {a + b}"})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@needs_scorer_fix
def test_align_data_parallel_matches_gradient_accumulation(checkpoint, tmp_path):
    common = ["--model", checkpoint, "--groups", _groups(tmp_path / "groups.jsonl"), "--loss", "aft",
              "--constraint", "boundary", "--beta", "0.5", *TRAIN]
    launch(["align", *common, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"], 1)
    launch(["align", *common, "--output_dir", str(tmp_path / "two")], 2)
    _assert_same_run(tmp_path / "one", tmp_path / "two")


def test_aft_run_under_two_processes_writes_each_file_once(tmp_path):
    """`aft run` launched on 2 processes: training and sampling use both, init / label / eval run on the main
    process alone (the other waits for DONE), and the result is the same set of files a single process writes."""
    import yaml

    config = {"run_dir": str(tmp_path / "run"),
              "defaults": {"task": TASK, "per_device_train_batch_size": 4, "max_length": 96, "max_new_tokens": 12},
              "stages": [{"name": "init", "stage": "init", "size": "test", "vocab_size": 300},
                         {"name": "vft", "stage": "sft", "model": "init", "num_train_epochs": 1},
                         {"name": "samples", "stage": "sample", "model": "vft", "limit": 6, "k": 2},
                         {"name": "labeled", "stage": "label", "groups": "samples"},
                         {"name": "eval_vft", "stage": "eval", "model": "vft", "groups": "labeled"}]}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    out = launch(["run", str(path)], processes=2)
    for stage in ("init", "labeled", "eval_vft"):  # announced once: only the main process ran it
        assert out.stdout.count(f"[aft run] {stage} (") == 1, out.stdout
    assert out.stdout.count("[aft run] vft (") == 2  # both processes train
    run = tmp_path / "run"
    assert all((run / s / "DONE").exists() for s in ("init", "vft", "samples", "labeled", "eval_vft"))
    assert len((run / "labeled" / "groups.jsonl").read_text().splitlines()) == 6
    assert json.loads((run / "eval_vft" / "eval.json").read_text())["questions"] == 8


def test_only_the_main_process_judges_an_output(tmp_path, monkeypatch):
    """A second process used to check the output folder while the main one claimed it: seeing only the
    manifest's .tmp it refused the folder as foreign, and a two-process CI run failed so."""
    from aft.checks import AftError
    from aft.provenance import claim
    from aft.train import SFTConfig

    out = tmp_path / "sft"
    out.mkdir()
    (out / "aft-manifest.json.tmp").write_text("{}")  # the main process between writing and renaming it
    config = SFTConfig(model="tiny", task=TASK, output_dir=str(out))
    monkeypatch.setenv("RANK", "1")
    claim("sft", config)
    assert [p.name for p in out.iterdir()] == ["aft-manifest.json.tmp"]  # nor did it write
    monkeypatch.setenv("RANK", "0")  # the main process still refuses a folder it did not make
    with pytest.raises(AftError, match="was not written by aft sft"):
        claim("sft", config)
