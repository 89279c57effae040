#!/bin/bash
set -euo pipefail
<venv>/bin/torchrun \
  --standalone \
  --nnodes=1 \
  --nproc-per-node=2 \
  --no-python \
  <venv>/bin/ldm-train \
  experiment=tiny \
  'data.urls='"'"'/shared/data/{00000..00009}.tar'"'"'' \
  batch.global_size=32 \
  trainer.num_nodes=1 \
  trainer.devices=2 \
  trainer.accelerator=cpu \
  paths.root=/shared/outputs \
  run_name=golden \
  ckpt_path=last
