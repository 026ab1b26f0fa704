#!/usr/bin/env bash
# The paper's comparison on one GPU: Dscint and the five baselines (AlexNet, ResNet-18, VGG-16,
# Inception-v4, DenseNet-121), 10 runs each on the same patient-level splits, Table 5 settings
# (Adam, lr 1e-3, weight decay 1e-4, batch 4), bf16 autocast, within 10 minutes on one H200.
#
# Phantom budget: 150 simulated patients (300 views), 5 epochs: 60 trainings of 53 steps per
# epoch. Not yet timed on a GPU (the session that wrote this had none); the script prints the
# wall time and the report's per-network seconds, so the first run on a device can resize
# PHANTOMS/EPOCHS. A model trained on phantoms is not a clinical device.
#
# Needs: a CUDA build of torch and the `baselines` extra (torchvision, timm) in $PY's
# environment. Usage: bench/gpu_compare.sh [OUT]   (env: PY, PHANTOMS, EPOCHS, RUNS, NPROC,
# LIMIT_S). NPROC > 1 trains each run across that many GPUs with torchrun (DDP, nccl).
# A smoke test of the script without a GPU: DEVICE=cpu COMPARE=dscint PHANTOMS=6 EPOCHS=1 RUNS=1
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${1:-${OUT:-/tmp/dscint-gpu-compare}}
PHANTOMS=${PHANTOMS:-150}
EPOCHS=${EPOCHS:-5}
RUNS=${RUNS:-10}
NPROC=${NPROC:-1}
LIMIT_S=${LIMIT_S:-600}
DEVICE=${DEVICE:-cuda}
COMPARE=${COMPARE:-all}

"$PY" - "$DEVICE" "$COMPARE" <<'EOF'
import importlib.util, sys
import torch
device, compare = sys.argv[1:]
problems = []
if device == "cuda" and not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA device")
if compare == "all":
    problems += [f"{m} is not installed (pip install -e '.[baselines]')"
                 for m in ("torchvision", "timm") if importlib.util.find_spec(m) is None]
if problems:
    sys.exit("gpu_compare: " + "; ".join(problems))
gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
print(f"torch {torch.__version__}, {gpu}, {torch.cuda.device_count()} GPU(s)")
EOF

rm -rf "$OUT"
mkdir -p "$OUT"
printf '[storage]\nroot = "%s/node"\n' "$OUT" > "$OUT/config.toml"
ARGS=(retrain --config "$OUT/config.toml" --phantoms "$PHANTOMS" --epochs "$EPOCHS"
      --runs "$RUNS" --compare "$COMPARE" --device "$DEVICE" --precision bf16 --no-register
      --out "$OUT/report" --version gpu-compare --quiet)
if [ "$NPROC" -gt 1 ]; then
  LAUNCH=("$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m node)
else
  LAUNCH=("$PY" -m node)
fi

start=$(date +%s)
status=0
timeout "$LIMIT_S" "${LAUNCH[@]}" "${ARGS[@]}" 2>&1 | tee "$OUT/retrain.log" || status=$?
elapsed=$(( $(date +%s) - start ))
echo "gpu_compare: exit ${status}, ${elapsed} s wall (limit ${LIMIT_S} s), ${PHANTOMS} phantom" \
     "patients, ${EPOCHS} epochs, ${RUNS} runs, networks: dscint + ${COMPARE}, ${NPROC} process(es)"
if [ -f "$OUT/report/metrics.json" ]; then
  "$PY" - "$OUT/report/metrics.json" <<'EOF'
import json, sys
doc = json.load(open(sys.argv[1]))
print(f"{'network':14} {'runs':>4} {'image acc':>16} {'study F1':>16} {'s/run':>8} {'img/s':>8}")
for key, s in doc["networks"].items():
    fmt = lambda m: f"{m['mean']:.4f}±{m['sd']:.4f}" if m["mean"] is not None else "-"
    ips = s["train_images_per_second"]["mean"]
    sec = s["seconds_per_run"]["mean"]
    print(f"{s['name']:14} {s['runs']:>4} {fmt(s['image']['accuracy']):>16} "
          f"{fmt(s['study']['f1']):>16} {sec or 0:8.1f} {ips or 0:8.1f}")
EOF
fi
exit "$status"
