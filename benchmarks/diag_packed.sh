export PYTHONPATH=$PWD HF_HUB_OFFLINE=1
for v in "" "--packed --probe" "--packed --probe --no-cudnn" "--packed --no-cudnn" "--packed --probe --attn flex_attention"; do
  echo "=== $v"; timeout 170 python benchmarks/profile_step.py dsft_lora --compile --bs 5 --seq 6144 --top 12 $v 2>&1 | grep -v "^W\|Warning\|warn" | tail -16
done
