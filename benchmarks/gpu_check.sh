#!/usr/bin/env bash
# The `gpu` profile's throughput on one GPU, in one script that finishes well inside 15 minutes on an
# H100/H200 (16 cores): results as JSON lines under $OUT (default runs/gpu_check).
#
#   benchmarks/gpu_check.sh            # on the GPU machine, from the repository root
#   TINY=1 benchmarks/gpu_check.sh     # the same steps at toy sizes on a CPU (checks the script itself)
#
# 1. prepare the 224 px cache from ../shared/data/chest_xray_224 (every image, patient-grouped split);
# 2. benchmarks/train_throughput.py: loader-only, step-only (resident batch) and end-to-end img/s at batch 64
#    and 256 in one run, current loop vs the loop as it was on main (--compare-main);
# 3. a real `pneumoscope train --profile gpu` for EPOCHS epochs: per-epoch img/s over the whole training
#    epoch (loading included, validation excluded) and the val AUC, from history.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${OUT:-runs/gpu_check}
DATA=${DATA:-../shared/data/chest_xray_224}
export NO_ALBUMENTATIONS_UPDATE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
if [ -n "${TINY:-}" ]; then
  DEVICE=cpu SIZE=32 STEPS=2 WARMUP=1 EPOCHS=1 LIMIT="--limit-per-class 24" BATCHES="16"
else
  DEVICE=cuda SIZE=224 STEPS=${STEPS:-40} WARMUP=5 EPOCHS=${EPOCHS:-4} LIMIT="" BATCHES="64 256"
fi
started=$(date +%s)
log() { echo "[gpu_check $(( $(date +%s) - started ))s] $*" >&2; }

"$PYTHON" - <<'EOF' > "$OUT/device.json"
import json, os, platform, torch
print(json.dumps({"torch": torch.__version__, "cuda": torch.cuda.is_available(),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                  "cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
                  "cpu_capability": torch.backends.cpu.get_cpu_capability()}))
EOF
log "device: $(cat "$OUT/device.json")"

log "prepare ${SIZE} px cache"
"$PYTHON" -m model.cli data prepare --data "$DATA" --image-size "$SIZE" --out "$OUT/cache" $LIMIT > "$OUT/prepare.json"

for batch in $BATCHES; do
  log "throughput at batch $batch"
  "$PYTHON" benchmarks/train_throughput.py --device "$DEVICE" --image-size "$SIZE" --batch-size "$batch" \
    --steps "$STEPS" --warmup "$WARMUP" --cache "$OUT/cache" --compare-main >> "$OUT/throughput.jsonl"
done

log "pneumoscope train --profile gpu for $EPOCHS epochs"
if [ -n "${TINY:-}" ]; then
  "$PYTHON" -m model.cli train --cache "$OUT/cache" --out "$OUT/train" --profile smoke --image-size "$SIZE" \
    --epochs "$EPOCHS" --device "$DEVICE" --no-resume > "$OUT/train.json"
else
  "$PYTHON" -m model.cli train --cache "$OUT/cache" --out "$OUT/train" --profile gpu --epochs "$EPOCHS" \
    --device "$DEVICE" --no-resume > "$OUT/train.json"
fi
"$PYTHON" - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
history = json.load(open(f"{out}/train/history.json"))
rows = [json.loads(line) for line in open(f"{out}/throughput.jsonl")]
summary = {"epochs": [{k: round(h[k], 4) for k in ("epoch", "train_images_per_second", "val_auc")} for h in history],
           "steady_end_to_end_img_s": max(h["train_images_per_second"] for h in history),
           "throughput": [{"batch": r["batch_size"], **{loop: {k: v[k] for k in ("loader", "step", "end_to_end",
                                                                                "overhead")}
                                                         for loop, v in r["rounds"][0].items()}} for r in rows]}
json.dump(summary, open(f"{out}/summary.json", "w"), indent=2)
print(json.dumps(summary))
EOF
log "done"
