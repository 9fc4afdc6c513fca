#!/bin/bash
# Issue 21's measured outcome on one H200, in device calls of under 10 minutes each:
#
#   run(command="bash benchmarks/issue21_on_gpu.sh train", carry=[".whl"])     # ~6 min
#   run(command="bash benchmarks/issue21_on_gpu.sh cudnn tokenize", carry=[".whl"])  # ~8 min
#
# train:    `dsft train --data sft.jsonl` from the CLI (benchmarks/real_data.py: SFT-like lengths, GPU-sized
#           steps, packed rows, no overrides), then train_throughput.py at the seq_len x micro-batch it chose.
# cudnn:    the same CLI run with cuDNN attention allowed (DSFT_SDPA_CUDNN=1; dsft trains without it, see
#           dsft/kernels/attention.py): what leaving it out costs.
# tokenize: 1 GB of JSONL into the Arrow token cache: time, cached time, peak RSS.
# .whl holds the wheels the device image lacks (datasets, sqlalchemy, alembic and their deps; device README,
# "a Python package missing there"). Each step has its own time limit; results go to $OUT.
set -u
OUT=${OUT:-/tmp/issue21-out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>&1 | tail -2
export PYTHONPATH=/tmp/site:$PWD HF_HUB_OFFLINE=1 DSFT_HOME=${DSFT_HOME:-/tmp/dsfthome}
mkdir -p "$DSFT_HOME"
t() { echo "== $(date +%T) $*"; }
field() { python -c "import json,sys; d=[json.loads(l) for l in open(sys.argv[1]) if l.startswith('{\"train')][0]; print(d['train']['stages'][0][sys.argv[2]])" "$1" "$2" 2>/dev/null; }
shown() { grep -v "recompiles\]" "$1" | tail -"$2"; }
for part in "$@"; do
  case $part in
    train|cudnn)
      t build; python -c "from dsft.base.presets import build_preset; build_preset('deepseek-v2-lite-shape')"
      if [ "$part" = train ]; then
        t "dsft train --data (real_data.py, GPU-sized)"
        timeout 300 python benchmarks/real_data.py --home "$DSFT_HOME" --steps 20 --tokenize-gb 0 > "$OUT/real_data.txt" 2>&1
        echo "rc=$?" >> "$OUT/real_data.txt"; shown "$OUT/real_data.txt" 3
        [ -n "${SKIP_THROUGHPUT:-}" ] && continue
        SEQ=$(field "$OUT/real_data.txt" seq_len); MB=$(field "$OUT/real_data.txt" micro_batch_size)
        t "train_throughput.py at ${SEQ:-2048} x ${MB:-4}"
        timeout 150 python benchmarks/train_throughput.py --variant dsft_lora --compile --seq "${SEQ:-2048}" --bs "${MB:-4}" > "$OUT/throughput.txt" 2>&1
        tail -1 "$OUT/throughput.txt"
      else
        t "dsft train --data with cuDNN attention allowed"
        DSFT_SDPA_CUDNN=1 timeout 300 python benchmarks/real_data.py --home "$DSFT_HOME" --steps 20 --tokenize-gb 0 > "$OUT/real_data_cudnn.txt" 2>&1
        echo "rc=$?" >> "$OUT/real_data_cudnn.txt"; shown "$OUT/real_data_cudnn.txt" 3
      fi ;;
    tokenize)
      t "tokenise 1 GB of JSONL"
      timeout 280 python benchmarks/real_data.py --home "$DSFT_HOME" --tokenize-only --tokenize-gb 1 > "$OUT/tokenize.txt" 2>&1
      echo "rc=$?" >> "$OUT/tokenize.txt"; tail -2 "$OUT/tokenize.txt" ;;
    *) echo "unknown part $part: train, cudnn or tokenize"; exit 2 ;;
  esac
done
t done
