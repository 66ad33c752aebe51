#!/usr/bin/env bash
# Reproduce results/image.md: VQ tokenizer -> AR model -> samples -> metrics on Fashion-MNIST.
# Needs the Debian package dataset-fashion-mnist (IDX files in /usr/share/datasets/fashion-mnist).
# Runs from any directory; CPU-sized (one thread each, as measured).
set -euo pipefail
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
armodal-train experiment=image_fmnist_vq overwrite=true       # -> runs/image_fmnist_vq/ (pinned folder, replaced)
armodal-eval ckpt=runs/image_fmnist_vq/checkpoints/last.ckpt   # PSNR, codebook usage, FD(recon) -> eval_metrics.json
armodal-train experiment=image_fmnist_ar                      # -> runs/image_fmnist_ar/<time>/
AR=$(ls -td runs/image_fmnist_ar/*/ | head -1)
armodal-generate ckpt="$AR/checkpoints/last.ckpt" num_samples=10 out_dir="$AR/samples/final" cfg_scale=3.0
armodal-eval ckpt="$AR/checkpoints/last.ckpt" 'evaluator.extra_cfg_scales=[1.0,2.0,4.0]'  # all metrics, 10k samples + cfg sweep
