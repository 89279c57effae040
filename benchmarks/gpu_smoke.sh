#!/usr/bin/env bash
# GPU smoke run: one short bf16 training per strategy (DDP, FSDP2, ZeRO-2, ZeRO-3) on this
# machine's GPUs with torch.compile per block, each ending in an export, then the MFU benchmark.
# Prints each run's summary (steps, samples/s, wall time) and the MLflow throughput metrics
# (samples/s and MFU per device). Sized to finish in under 10 minutes on one H100.
#
#   bash benchmarks/gpu_smoke.sh                 # every strategy, 40 steps each
#   STRATEGIES="ddp fsdp" STEPS=20 bash benchmarks/gpu_smoke.sh   # fsdp: the FSDP1 wrapper
#   DEVICE=cpu bash benchmarks/gpu_smoke.sh      # the same script on CPU (fp32, no compile)
#
# The model is the SD-2-size UNet (model/backbone=unet_sd2, ~865 M parameters) over the tiny
# VAE and text encoder the tests use, at 64 px (latents 4x32x32, the SD-2 256 px latent size),
# on the shapes demo data: what is timed is the UNet, which is what trains.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
OUT=${OUT:-outputs/gpu_smoke}
STEPS=${STEPS:-40}
DEVICE=${DEVICE:-cuda}
STRATEGIES=${STRATEGIES:-ddp fsdp2 deepspeed_zero2 deepspeed_zero3}
mkdir -p "$OUT"
"$BIN/ldm-data" demo "$OUT/shards" --num-samples 256 --size 64 >/dev/null

if [ "$DEVICE" = cuda ]; then
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  DEVICE_ARGS=(trainer=gpu callbacks.speed.compile_blocks=true)
  # experiment=tiny narrows the UNet's widths: give back unet_sd2's.
  BACKBONE=(model/backbone=unet_sd2 "model.backbone.model.block_out_channels=[320,640,1280,1280]"
            model.backbone.model.cross_attention_dim=384 data.resolution=64 batch.global_size=32)
else  # a check of the script itself: the tiny UNet, two steps
  DEVICE_ARGS=(trainer.devices=1)
  BACKBONE=(data.resolution=16)
  STEPS=2
fi

for strategy in $STRATEGIES; do
  echo "=== strategy=$strategy"
  start=$(date +%s)
  LDM_OUTPUT_DIR="$OUT/$strategy" "$BIN/ldm-train" experiment=tiny "data.urls=$OUT/shards" \
    "${BACKBONE[@]}" "${DEVICE_ARGS[@]}" "strategy=$strategy" "trainer.max_steps=$STEPS" \
    trainer.log_every_n_steps=5 callbacks.checkpoint.every_n_train_steps=1000 \
    "run_name=$strategy" 2>"$OUT/$strategy.err" | grep -v "^$" | tail -12 \
    || { echo "strategy=$strategy FAILED:"; tail -30 "$OUT/$strategy.err"; continue; }
  echo "wall: $(( $(date +%s) - start )) s"
  "$BIN/python" - "$OUT/$strategy" <<'EOF'
import sys
import mlflow
client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}/mlflow.db")
(exp,) = [e for e in client.search_experiments() if e.name == "tiny"]
(run,) = client.search_runs([exp.experiment_id], max_results=1)
for key in ("train/device/samples_per_sec", "train/device/mfu"):
    history = client.get_metric_history(run.info.run_id, key)
    if history:
        print(f"{key}: {history[-1].value:.4g} (step {history[-1].step})")
EOF
done

if [ "$DEVICE" = cuda ]; then
  echo "=== benchmarks/mfu.py (SD-2 UNet, 256 px latents, bf16)"
  "$BIN/python" benchmarks/mfu.py --batch 64 --steps 20 --warmup 5
  "$BIN/python" benchmarks/mfu.py --batch 64 --steps 20 --warmup 5 --compile --channels-last
fi
