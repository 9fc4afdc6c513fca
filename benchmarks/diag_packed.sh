#!/bin/bash
# Where packed rows lose time against the benchmark's dense rows (one H200 call, ~7 min):
#   run(command="bash benchmarks/diag_packed.sh")
# profile_step.py at dsft train's GPU-sized shape (5 x 6144) with dense rows, packed SFT-like rows under SDPA
# (cuDNN allowed / not), and packed rows under flex attention. Results: benchmarks/results/2026-12-01-h200-issue21-packed.md
export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
for v in "" "--packed --probe" "--packed --probe --no-cudnn" "--packed --no-cudnn" "--packed --probe --attn flex_attention"; do
  echo "=== $v"
  # shellcheck disable=SC2086
  timeout 170 python benchmarks/profile_step.py dsft_lora --compile --bs 5 --seq 6144 --top 12 $v 2>&1 | grep -v "^W\|Warning\|warn" | tail -16
done
