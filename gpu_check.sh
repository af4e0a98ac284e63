#!/usr/bin/env bash
# Everything that needs a GPU, in one run: what the machine is, the tests (the CUDA ones included),
# the default run, the speed benchmarks against transformers, compiled decoding, the one-GPU LoRA
# memory plan's step on the card, and batched answering. Each step has its own time limit; all
# output lands in one folder.
#
#     bash gpu_check.sh                        # every step, into $OUT if set, else gpu_check_out
#     bash gpu_check.sh DIR bench compiled     # only the steps named, into DIR
#
# Steps, in order: machine tests default bench compiled lora answers. It needs torch with CUDA, the
# requirements, and transformers for the comparison. The summary ends DIR/gpu_check.log; each step's
# whole output is DIR/<step>.log.
set -uo pipefail
cd "$(dirname "$0")"
out=$(realpath -m "${1:-${OUT:-gpu_check_out}}")
shift || true
steps=("${@:-machine tests default bench compiled lora answers}")
steps=(${steps[*]})
mkdir -p "$out"
export PYTHONUNBUFFERED=1

step() {  # step NAME SECONDS COMMAND...: run it with a time limit, keep its output, note how it ended
  local name=$1 limit=$2 t0=$SECONDS rc
  shift 2
  [[ " ${steps[*]} " == *" $name "* ]] || return 0
  echo "=== $name (limit ${limit}s): $*"
  timeout "$limit" "$@" >"$out/$name.log" 2>&1
  rc=$?
  tail -n 25 "$out/$name.log"
  printf '%-8s exit %-3s %4ss\n' "$name" "$rc" "$((SECONDS - t0))" >>"$out/summary.txt"
}

# 32 held-out scenes of the default run as a question file (paths relative to it), for `answers`
questions() {
  python3 - "$out" <<'PY'
import json, os, sys
from miniature import world
q = os.path.join(sys.argv[1], "questions")
os.makedirs(q, exist_ok=True)
_, scenes = world.make_world(0, 6000, 32)
with open(os.path.join(q, "questions.jsonl"), "w") as f:
    for i, scene in enumerate(scenes):
        world.render(scene, 48).save(os.path.join(q, f"{i}.png"))
        f.write(json.dumps({"question_id": i, "image": f"{i}.png", "question": "Describe the image in detail."}) + "\n")
PY
}

answers() {  # answers/s of the default run's DDPO model: greedy and 3 beams, batches of 16
  questions || return 1
  for beams in 1 3; do
    rm -f "$out/answers$beams.jsonl"
    local t0=$SECONDS
    python3 sample.py --ckpt="$out/mini/ddpo" --questions="$out/questions/questions.jsonl" \
      --out="$out/answers$beams.jsonl" --batch_size=16 --num_beams=$beams --max_new_tokens=96 || return 1
    echo "beams $beams: 32 answers in $((SECONDS - t0)) s (model loading included)"
  done
}

export -f questions answers
export out
{
  rm -f "$out/summary.txt"
  step machine 60 bash -c 'nvidia-smi; python3 -c "import torch; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.get_device_name())"'
  step tests 240 python3 -m pytest -q -p no:warnings -rs tests
  step default 300 python3 train.py --out_dir="$out/mini"
  cp "$out/mini/timings.json" "$out/mini/results.json" "$out/" 2>/dev/null
  step bench 300 python3 bench.py --compare --grad_ckpt
  step compiled 300 python3 bench.py --compile
  step lora 240 python3 bench.py --shape=muffin-13b-4 --lora_rank=64 --grad_ckpt --iters=3 --warmup=1
  step answers 180 bash -c answers
  echo "=== summary"
  cat "$out/summary.txt"
} 2>&1 | tee "$out/gpu_check.log"
