#!/usr/bin/env bash
# The checks that need a GPU, in one run: the CUDA tests (every awkward model against the reference on CUDA,
# no host-device sync in a step, whole-step CUDA graphs against eager steps, the GPU bench) and
# `backforward bench --device cuda`. Writes into $OUT (default runs/cuda): cuda-machine.txt, cuda-tests.txt,
# bench-cuda.txt, bench-cuda-large.txt and bench-cuda.png (copy these to docs/results/), bench-cuda.log.
# Runs every part; exits non-zero if any failed.
set -uo pipefail
out=${OUT:-runs/cuda}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
failed=0
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  "$python" -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda)'; } |
    tee "$out/cuda-machine.txt" || failed=1
( "$python" -m pytest -p no:cacheprovider -rfEs tests/test_cuda_graphs.py; graphs=$?
  "$python" -m pytest -p no:cacheprovider -rfEs -k cuda tests/test_host_reads.py tests/test_bench.py \
      tests/test_awkward_models.py tests/test_step_semantics.py || exit
  exit $graphs ) 2>&1 | tee "$out/cuda-tests.txt" || failed=1
"$python" -m backforward.experiments bench --device cuda --out "$out" 2>"$out/bench-cuda.log" |
    tee "$out/bench-cuda.txt" || failed=1
# Where a graph stops paying: large layers, where the device is busy anyway.
"$python" -m backforward.experiments bench --device cuda --models mlp --depths 2 8 --width 2048 --batch-size 1024 \
    --steps 5 --no-plot 2>>"$out/bench-cuda.log" | tee "$out/bench-cuda-large.txt" || failed=1
exit $failed
