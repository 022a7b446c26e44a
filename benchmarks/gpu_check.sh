#!/usr/bin/env bash
# GPU check: on a machine with a CUDA device, run (1) the tests marked `gpu`, (2) a 2-process DDP
# run of `medcl run --nproc 2` on a small synthetic stream, (3) the throughput benchmarks on CUDA,
# and write what they found into OUTDIR (at most 7 small files):
#
#   gpu_check.log          every step's output, then a one-line-per-step summary
#   pytest_gpu.xml         JUnit report of `pytest -m gpu`
#   ddp_run.json           the DDP run's metrics.json summary, world size and backend
#   trainer_overhead.json  medcl loop vs plain PyTorch loop on CUDA (needs PneumoniaMNIST)
#   data_throughput.json   the data pipeline's throughput (benchmarks/data_throughput.py)
#   ddp_scaling.json       1 vs 2 processes on the GPU
#   inference-cuda.json    deployable-model inference rates on CUDA (benchmarks/inference.py)
#
# Usage (from the repository root; medcl importable, e.g. PYTHONPATH=.):
#   benchmarks/gpu_check.sh OUTDIR
#
# Never hangs: every step has a time limit (`timeout`, then SIGKILL), a failed step is recorded
# and the next one runs. At most 10 minutes of limits in all. Measured 2026-11-30 on one H200
# (16 CPUs) while another benchmark shared it: environment to trainer-overhead took 101 s; the
# last three steps ran past their earlier 30/60/60 s limits (results in benchmarks/results/gpu-h200/).
#
# Two ranks on ONE GPU: NCCL refuses two ranks on the same device, so the DDP steps use gloo
# with CUDA tensors (MEDCL_DIST_BACKEND=gloo); on a machine with >= 2 GPUs set
# GPU_CHECK_BACKEND=nccl to test NCCL instead.
set -u

OUT=${1:?usage: benchmarks/gpu_check.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOG="$OUT/gpu_check.log"
: >"$LOG"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
export MEDCL_DATA_ROOT=${MEDCL_DATA_ROOT:-$PWD/shared/data/medmnist}
PY=${PYTHON:-python}
GPUS=$($PY -c "import torch; print(torch.cuda.device_count())" 2>/dev/null)
GPUS=${GPUS:-0}
BACKEND=${GPU_CHECK_BACKEND:-$([ "$GPUS" -ge 2 ] && echo nccl || echo gloo)}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SUMMARY=()

step() {  # step NAME LIMIT_S COMMAND...: run with a time limit, log, record the outcome
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS rc
  echo "=== $name (limit ${limit}s): $*" >>"$LOG"
  timeout --kill-after=10 "$limit" "$@" >>"$LOG" 2>&1
  rc=$?
  local status=ok
  if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then status="TIMEOUT"; elif [ $rc -ne 0 ]; then status="FAILED"; fi
  SUMMARY+=("$(printf '%-18s %-8s rc=%-3s %4ss' "$name" "$status" "$rc" "$((SECONDS - t0))")")
  echo "=== $name: $status (rc=$rc, $((SECONDS - t0))s)" >>"$LOG"
}

# 0. the machine
step environment 20 $PY -c "
import torch, platform
print('python', platform.python_version(), 'torch', torch.__version__, 'cuda', torch.version.cuda)
print('devices', [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())])
print('bf16', torch.cuda.is_available() and torch.cuda.is_bf16_supported())
"

# 1. the tests marked gpu (they skip without CUDA)
# only the modules that hold gpu-marked tests: collecting the others needs the docs/notebook extras
GPU_TESTS=$(grep -l "mark.gpu" tests/test_*.py)
step pytest-gpu 150 $PY -m pytest -q -m gpu -p no:cacheprovider --junitxml="$OUT/pytest_gpu.xml" $GPU_TESTS

# 2. a 2-process DDP run through the CLI (medcl run --nproc 2 execs torchrun)
cat >"$WORK/ddp.yaml" <<EOF
seed: 0
name: ddp-gpu
output_dir: $WORK/runs
scenario: {name: synthetic-ci, num_classes: 4, classes_per_experience: 2, n_train: 256, n_test: 64, image_size: 28}
strategy: {name: replay}
model: {backbone: resnet18, small_input: true}
train: {epochs: 2, batch_size: 64, lr: 0.05, augment: light, eval_every: 4, device: cuda}
memory: {size: 64}
EOF
step ddp-run 60 env MEDCL_DIST_BACKEND=$BACKEND $PY -m medcl run "$WORK/ddp.yaml" --nproc 2 --no-report --quiet
step ddp-summary 15 $PY -c "
import json, pathlib, sys
run = pathlib.Path(sys.argv[1])
m, env = json.loads((run / 'metrics.json').read_text()), json.loads((run / 'environment.json').read_text())
tb = sorted(p.name for p in (run / 'tensorboard').iterdir())
out = {'world_size': env.get('world_size'), 'dist_backend': env.get('dist_backend'), 'cuda': env.get('cuda'),
       'summary': m['summary'], 'accuracy_matrix': m['accuracy_matrix'], 'fit': m['fit'], 'tensorboard_files': tb}
T = len(m['accuracy_matrix'])
out['targets'] = [
    {'name': 'DDP world size', 'value': out['world_size'], 'goal': '== 2', 'met': out['world_size'] == 2},
    {'name': 'experiences completed', 'value': T, 'goal': '== 2', 'met': T == 2},
    {'name': 'TensorBoard event files (rank 0 only)', 'value': len(tb), 'goal': '== 1', 'met': len(tb) == 1},
]
pathlib.Path(sys.argv[2]).write_text(json.dumps(out, indent=1))
print(json.dumps(out['summary']), out['world_size'], out['dist_backend'])
" "$WORK/runs/ddp-gpu" "$OUT/ddp_run.json"

# 3. throughput benchmarks on CUDA
step trainer-overhead 30 $PY benchmarks/trainer_overhead.py --device cuda --updates 40 --repeats 3 --out "$WORK/bench" --quiet
cp "$WORK/bench/trainer_overhead.json" "$OUT/" 2>>"$LOG"
step data-throughput 60 $PY benchmarks/data_throughput.py --out "$WORK/bench" --quiet
cp "$WORK/bench/data_throughput.json" "$OUT/" 2>>"$LOG"
step ddp-scaling 120 env MEDCL_DIST_BACKEND=$BACKEND $PY benchmarks/ddp_scaling.py --device cuda --rounds 2 --updates 40 --batch-size 256 --threads 4 --out "$WORK/bench" --quiet
cp "$WORK/bench/ddp_scaling.json" "$OUT/" 2>>"$LOG"
step inference-cuda 120 $PY benchmarks/inference.py --device cuda --repeats 2 --min-seconds 0.2 --quiet
cp benchmarks/results/inference-cuda.json "$OUT/" 2>>"$LOG"

{
  echo
  echo "=== summary (DDP backend: $BACKEND, GPUs: $GPUS)"
  printf '%s\n' "${SUMMARY[@]}"
} | tee -a "$LOG"
exit 0
