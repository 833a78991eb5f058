#!/usr/bin/env bash
# The checks that need a CUDA GPU: the GPU-only tests, the calibrated methods with --device cuda on a
# random-weight model of the demo's shape (its packed output then scored on the GPU, through the Triton
# kernels, and on the CPU, by torch), the kernel benchmark and end-to-end generation speed. Each step runs
# alone (concurrent steps slowed each other 3x on an H200 host), under a time limit, and the log says how
# it ended.
#
#   bash scripts/device_check.sh [STEP ...]    # tests quantize kernels generate (default: all four), large
#
# On an H200 (16 host cores) the tests need about 5 min (they compile every autotuner candidate), the
# other three about 6 min together: within a 10-minute call limit, run `tests`, then the rest.
# Needs: CUDA torch and triton; pytest-xdist and pytest-timeout for the tests step; the wheels of any
# missing dependency in .whl/ (installed with --no-index, for machines without a registry); in .dev/
# the demo's config.json, tokenizer.json and tokenizer_config.json, and the two wikitext2 files (no
# weights: the model is built at random there).
# `large` (not in the default) quantizes a random Llama-3-8B-shaped checkpoint (15 GB in bf16, written block by
# block first) with GPTQ W4 g128 on 128x512 samples and --device cuda: wall time, peak RSS, peak GPU memory.
# Writes log.txt, tests.log and the benchmarks' JSON under $OUT (default out/device).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/device}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TQDM_DISABLE=1
exec > >(tee -a "$OUT/log.txt") 2>&1
steps=" ${*:-tests quantize kernels generate} "

step() {  # step NAME SECONDS COMMAND...: run with a limit, say how it ended
  local name=$1 limit=$2 start rc
  shift 2
  start=$(date +%s)
  echo "=== $name (limit $limit s)"
  timeout --kill-after=10 "$limit" "$@"
  rc=$?
  echo "=== $name: rc=$rc in $(($(date +%s) - start)) s"
}

site=/tmp/llmquant-site
python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target "$site" .whl/*.whl . || exit 1
export PYTHONPATH=$site
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem,driver_version --format=csv,noheader
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__,
  'transformers', transformers.__version__)"

# -P: import the installed llmquant (with its llmquant.kernels), not the source tree in the working directory
if [[ $steps == *" tests "* ]]; then
  step tests 480 python3 -P -m pytest -m gpu -v -p no:cacheprovider -n 16 --timeout 240 \
    tests/test_kernels.py tests/test_gguf_quants.py \
    tests/test_streaming.py::test_activations_stay_on_the_host_and_each_batch_goes_to_the_work_device \
    > "$OUT/tests.log" 2>&1
  grep -E "FAILED|ERROR|passed|failed|^=== tests" "$OUT/tests.log" | tail -n 40
fi

if [[ $steps == *" quantize "* ]]; then
  model=/tmp/llmquant-random-demo
  step random-model 60 python3 -P - "$model" <<'PY'
import shutil
import sys

import torch
from transformers import AutoConfig, AutoModelForCausalLM

config = AutoConfig.from_pretrained(".dev")
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
model.save_pretrained(sys.argv[1])
for name in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(f".dev/{name}", sys.argv[1])
print(sum(p.numel() for p in model.parameters()), "parameters")
PY
  with_peak='import runpy, sys, torch
sys.argv[0] = "llmquant"
try:
    runpy.run_module("llmquant", run_name="__main__")
finally:
    print(f"peak CUDA memory allocated: {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")'
  for run in gptq awq+gptq gptq-tuned; do  # gptq-tuned: block-wise tuning (autograd on the GPU, in bf16)
    method=${run%-tuned}
    step "quantize-$run" 150 python3 -P -c "$with_peak" quantize "$model" --method "$method" --bits 4 \
      --group-size 128 --asym --calib .dev/valid.tokens.txt --n-samples 128 --seqlen 512 --device cuda --force \
      $([[ $run == *-tuned ]] && echo --tune-iters 20) --out "/tmp/q-$run"
  done
  for device in cuda cpu; do
    step "eval-$device" 120 python3 -P -m llmquant eval /tmp/q-gptq /tmp/q-awq+gptq /tmp/q-gptq-tuned --base "$model" \
      --data .dev/test.raw.txt --windows 16 --device "$device"
  done
fi

if [[ $steps == *" kernels "* ]]; then
  step kernels 150 python3 -P scripts/bench_kernels.py --replays 20 --out "$OUT"
  step kernels-w3-act 120 python3 -P scripts/bench_kernels.py --bits 3 --act-order --dtype bfloat16 --m 1 16 256 \
    --shapes 4096x14336 14336x4096 --replays 20 --out "$OUT"
fi

if [[ $steps == *" generate "* ]]; then
  step generate 120 python3 -P scripts/bench_generate.py --shape llama3-8b --new-tokens 128 --json "$OUT/generate.json"
fi

if [[ $steps == *" large "* ]]; then
  step make-8b 240 python3 -P scripts/make_random_model.py /tmp/rand-8b --shape 8b --tokenizer .dev --force
  PYTHONPATH=$site:scripts step quantize-8b 540 python3 -P scripts/bench_quantize.py --model /tmp/rand-8b -- \
    --method gptq --bits 4 --group-size 128 --calib .dev/valid.tokens.txt --n-samples 128 --seqlen 512 \
    --device cuda > "$OUT/quantize-8b.json"
  cat "$OUT/quantize-8b.json"
fi
