#!/usr/bin/env bash
# On a CUDA machine: the GPU tests (and the chunk checkpoint tests, which run on the GPU there),
# then the capture-overhead and early-exit benchmarks on a ~1B-parameter-shaped random Llama in
# bf16 at 4k and 32k tokens, and the cost of a chunk checkpoint at 4k. Results are appended to
# benchmarks/RESULTS.md (and copied to $OUT when that is set).
#   bash benchmarks/gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
"$PY" -c 'import torch; assert torch.cuda.is_available(), "no CUDA device"; print(torch.__version__, torch.cuda.get_device_name(0))'
"$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_capture.py tests/test_resume.py -x
"$PY" -m benchmarks --device cuda --dtype bfloat16 --size 1b --seq 4096,32768 --tokens 32768 --reps 7 \
  --note "GPU run: ~1B-shaped Llama (16 layers, 32 q / 8 kv heads, hidden 2048), bf16, default sampler." \
  capture early "$@"
"$PY" -m benchmarks --device cuda --dtype bfloat16 --size 1b --seq 4096 --tokens 32768 --reps 3 \
  --note "GPU run: chunk checkpoint cost, ~1B-shaped Llama, bf16, 8 batches of 8 x 4096 tokens." checkpoint
if [ -n "${OUT:-}" ]; then cp benchmarks/RESULTS.md "$OUT/RESULTS.md"; fi
