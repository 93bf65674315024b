#!/usr/bin/env bash
# The GPU check of issue 31: on a CUDA machine with torch preinstalled and no network, run the CUDA /
# Triton tests and the benches on --device cuda, writing JSON to $OUT (default runs/device). < 8 min.
#
#   OUT=runs/device bash scripts/device_check.sh
#
# Each step is limited in time and its failure is recorded, not fatal: a partial result still comes back.
set -u
OUT=${OUT:-runs/device}
mkdir -p "$OUT"
PY=${PYTHON:-python}
log() { echo "$(date +%T) $*" | tee -a "$OUT/log.txt"; }
step() {  # step NAME SECONDS CMD...: stdout to $OUT/NAME.json (or .txt), stderr to $OUT/NAME.err
  local name=$1 secs=$2; shift 2
  log "start $name"
  timeout "$secs" "$@" > "$OUT/$name.out" 2> "$OUT/$name.err"
  local rc=$?
  log "end $name rc=$rc"
  echo "{\"step\": \"$name\", \"rc\": $rc}" >> "$OUT/steps.jsonl"
}
$PY - > "$OUT/device.json" <<'PYEOF'
import json, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "available": torch.cuda.is_available(),
                  "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}))
PYEOF
log "device: $(cat "$OUT/device.json")"
step tests 150 $PY -m pytest tests/test_kernels.py tests/test_routed_ffn.py -x -p no:cacheprovider
step bench_layer 120 $PY -m monoroute bench layer --device cuda --quick --json --out "$OUT"
step bench_layer_rn 90 $PY -m monoroute bench layer --device cuda --quick --n-units 16384,1048576 --k 32 --json --out "$OUT/rn"
step bench_train 90 $PY -m monoroute bench train --preset cpu-small --steps 20 --device cuda --json
step bench_train_profile 60 $PY -m monoroute bench train --preset cpu-small --steps 8 --device cuda --profile --json
step bench_generate 60 $PY -m monoroute bench generate --preset cpu-small --device cuda --json
log "done"
