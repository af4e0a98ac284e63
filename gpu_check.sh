#!/usr/bin/env bash
# Everything that needs a GPU, in one run: what the machine is, the tests (the CUDA ones included),
# the default run, the speed benchmarks against transformers, compiled decoding, LoRA memory and
# batched answering. Each step has its own time limit; all output lands in one folder.
#
#     bash gpu_check.sh [OUT_DIR]          # default: $OUT if set, else gpu_check_out
#
# It needs torch with CUDA, the requirements, and transformers for the comparison. Read the
# summary at the end of OUT_DIR/gpu_check.log; every step's full output is OUT_DIR/<step>.log.
set -uo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-${OUT:-gpu_check_out}}")
mkdir -p "$out"
export PYTHONUNBUFFERED=1
summary=()

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its output, note how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  summary+=("$(printf '%-12s rc %-3s %4ss' "$name" "$rc" "$((SECONDS - t0))")")
}

{
  step machine 60 bash -c 'nvidia-smi; python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())"'
  step tests 240 python3 -m pytest -q -p no:warnings -rs tests
  step default 300 python3 train.py --out_dir="$out/mini"
  cp "$out/mini/timings.json" "$out/mini/results.json" "$out/" 2>/dev/null
  step bench 300 python3 bench.py --compare --grad_ckpt
  step compiled 300 python3 bench.py --compile
  echo "=== summary"
  printf '%s\n' "${summary[@]}"
} 2>&1 | tee "$out/gpu_check.log"
