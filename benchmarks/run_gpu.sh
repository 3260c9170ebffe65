#!/usr/bin/env bash
# Every GPU measurement of docs/benchmarks.md in one go: writes JSON and logs under $OUT (or ./out).
set -u
OUT=${OUT:-out}; mkdir -p "$OUT"; export OUT PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c "import jax, optax, flax; print('jax', jax.__version__, 'optax', optax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
timeout 120 python3 benchmarks/quantization.py 2>&1 | grep -v -i warn | tee "$OUT/quantization.log"
timeout 500 python3 benchmarks/shampoo_step.py 2>&1 | grep -v -i warn | tee "$OUT/shampoo_step.log"
timeout 500 python3 benchmarks/adam_step.py --skip-slow-baselines --train-step 4096 2>&1 | grep -v -i warn | tee "$OUT/adam_step.log"
# Multi-GPU machine only: python3 benchmarks/scaling.py --model gpt2_small --bits 4
# Where the time goes: python3 benchmarks/profile.py --model gpt2_small --bits 4
