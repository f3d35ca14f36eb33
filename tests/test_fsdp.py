"""FSDP run for real: `aft sft` and `aft align` under `accelerate launch` with the shipped FSDP config, on two
CPU processes (gloo), against one process with 2 gradient-accumulation steps (as the DDP tests compare).

accelerate 1.15 never shards on CPU processes: it selects FSDP only for GPU-like process groups, and on CPU
it silently runs DDP instead (`AcceleratorState`: distributed_type MULTI_CPU, `is_fsdp_enabled` False, no
warning). PyTorch's FSDP2 itself runs over gloo, so the launched script below lets accelerate pick FSDP for
CPU processes too (one line: MULTI_CPU -> FSDP when the launcher asked for FSDP); everything else is the real
path: accelerate's `fully_shard` of each decoder layer, the sharded training step, and `aft`'s gathering of
the full weights for saving. The shipped config is used as is but for `mixed_precision` (bf16 on CPU would not
compare with the float32 single process) and the process count.
"""

import json
import os
import socket
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from aft.cli import main

pytestmark = pytest.mark.slow
FSDP = Path(__file__).resolve().parents[1] / "configs" / "accelerate" / "fsdp.yaml"
TASK = "arithmetic:min_steps=1,max_steps=2,n_train=32,n_val=4,n_test=8"
TRAIN = ["--optim", "sgd", "--learning_rate", "0.5", "--lr_scheduler_type", "constant", "--max_steps", "3",
         "--logging_steps", "1", "--per_device_train_batch_size", "2", "--seed", "3", "--report_to", "none"]

FSDP_ON_CPU = """
import sys
import accelerate.state
from accelerate.utils import DistributedType
import aft.train
from aft.cli import main

init = accelerate.state.AcceleratorState.__init__

def init_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin

accelerate.state.AcceleratorState.__init__ = init_fsdp_on_cpu
finish = aft.train.finish

def reporting_finish(trainer, tokenizer, config):
    layer = trainer.model.model.layers[0].self_attn.q_proj.weight
    print(f"rank {trainer.args.process_index}: fsdp={trainer.is_fsdp_enabled} {type(trainer.model).__name__} "
          f"q_proj local {tuple(layer.to_local().shape)} of {tuple(layer.shape)}", flush=True)
    return finish(trainer, tokenizer, config)

aft.train.finish = reporting_finish
sys.exit(main(sys.argv[1:]))
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_fsdp(args, tmp_path):
    config = yaml.safe_load(FSDP.read_text())
    assert config["distributed_type"] == "FSDP" and config["fsdp_config"]["fsdp_version"] == 2
    config.update(mixed_precision="no", num_processes=2)
    (tmp_path / "fsdp_cpu.yaml").write_text(yaml.safe_dump(config))
    (tmp_path / "fsdp_on_cpu.py").write_text(FSDP_ON_CPU)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(tmp_path / "fsdp_cpu.yaml"),
           "--num_processes", "2", "--main_process_port", str(_free_port()), str(tmp_path / "fsdp_on_cpu.py"), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    if out.returncode != 0 and "ChildFailedError" in out.stderr:
        # An intermittent crash of one gloo process on these CPUs (once in the last 4 clean-clone CI runs; not
        # reproduced in 6 launches by hand, cause not found): launch once more on a fresh output and port, and
        # warn with every rank's own lines, so the crash stays visible and diagnosable rather than hidden.
        failed = [line for line in out.stderr.splitlines() if "[rank" in line or "Error" in line][:60]
        warnings.warn("FSDP launch crashed once and was relaunched:\n" + "\n".join(failed))
        output = Path(args[args.index("--output_dir") + 1])
        shutil.rmtree(output, ignore_errors=True)
        cmd[cmd.index("--main_process_port") + 1] = str(_free_port())
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    for rank in (0, 1):  # really sharded: each process holds half of every weight
        sharded = f"rank {rank}: fsdp=True FSDPLlamaForCausalLM q_proj local (16, 32) of (32, 32)"
        assert sharded in out.stdout, out.stdout


def _weights(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder).state_dict()  # tied weights as loaded, whoever saved them


def _losses(folder):
    state = json.loads((Path(folder) / "trainer_state.json").read_text())
    return [h["loss"] for h in state["log_history"] if "loss" in h]


def _assert_same_run(one, two, checkpoint):
    assert (Path(two) / "model.safetensors").is_file() and (Path(two) / "tokenizer.json").is_file()
    a, b = _weights(one), _weights(two)
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    start = load_file(str(Path(checkpoint) / "model.safetensors"))
    assert max((b[k] - start[k]).abs().max().item() for k in start) > 1e-3  # it did train
    la, lb = _losses(one), _losses(two)
    assert len(la) == len(lb) == 3 and all(torch.isfinite(torch.tensor(lb)))
    assert la == pytest.approx(lb, rel=1e-5)


def test_sft_under_fsdp_matches_one_process(checkpoint, tmp_path):
    common = ["sft", "--model", checkpoint, "--task", TASK, "--limit", "12", *TRAIN]
    assert main([*common, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]) == 0
    launch_fsdp([*common, "--output_dir", str(tmp_path / "two")], tmp_path)
    _assert_same_run(tmp_path / "one", tmp_path / "two", checkpoint)


def test_align_under_fsdp_matches_one_process(checkpoint, tmp_path):
    from test_multiprocess import _groups

    common = ["align", "--model", checkpoint, "--groups", _groups(tmp_path / "groups.jsonl"), "--loss", "aft",
              "--constraint", "boundary", "--beta", "0.5", *TRAIN]
    assert main([*common, "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]) == 0
    launch_fsdp([*common, "--output_dir", str(tmp_path / "two")], tmp_path)
    _assert_same_run(tmp_path / "one", tmp_path / "two", checkpoint)
