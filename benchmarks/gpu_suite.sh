#!/usr/bin/env bash
# On a machine with one CUDA GPU: the CUDA paths and bf16 throughput, each part under its own time limit.
#
#   OUT=runs/gpu bash benchmarks/gpu_suite.sh
#
# 1. versions and the GPU's name;
# 2. benchmarks/gpu_check.sh: bf16 AFT steps (score, AFT boundary loss + NLL, backward, AdamW) on a random
#    ~1.1B Llama, tokens/s and peak memory;
# 3. the test suite with the GPU visible, 8 workers: every test that trains, samples or evaluates through a
#    stage (Trainer, aft sample / eval, the pipeline, the study) then runs on CUDA. The DDP and FSDP launches
#    (tests/test_multiprocess.py, tests/test_fsdp.py) start 2 processes, which need 2 GPUs: left out;
# 4. benchmarks/bench_align.py on CUDA: an AFT step against TRL's DPOTrainer and plain SFT.
# Logs go to $OUT (default runs/gpu). Exits 0 with a message where there is no GPU.
set -u
cd "$(dirname "$0")/.."
out="${OUT:-runs/gpu}"
mkdir -p "$out"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_suite: no CUDA GPU here; nothing to run"
    exit 0
fi
{ nvidia-smi -L; nproc
  "$PY" -c "import sys, torch, transformers, accelerate, peft, trl, datasets
print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))
print('transformers', transformers.__version__, 'accelerate', accelerate.__version__, 'peft', peft.__version__,
      'trl', trl.__version__, 'datasets', datasets.__version__)"; } 2>&1 | tee "$out/env.txt"
echo "== gpu_check"
timeout "${CHECK_S:-120}" env PYTHON="$PY" bash benchmarks/gpu_check.sh 2>&1 | tee "$out/gpu_check.txt"
echo "== tests on CUDA"
timeout "${TESTS_S:-240}" "$PY" -m pytest tests -q -n "${WORKERS:-8}" -p no:cacheprovider -o addopts= \
    --ignore tests/test_multiprocess.py --ignore tests/test_fsdp.py --junitxml "$out/junit.xml" \
    > "$out/pytest.txt" 2>&1
echo "pytest exit $?"; tail -40 "$out/pytest.txt"
echo "== bench_align"
timeout "${ALIGN_S:-60}" "$PY" benchmarks/bench_align.py 2>&1 | tee "$out/bench_align.txt"
exit 0
