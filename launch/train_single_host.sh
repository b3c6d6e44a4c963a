#!/usr/bin/env bash
# All local devices of one machine (GPUs, or N fake CPU devices for a dry run):
#   bash launch/train_single_host.sh --config gpu_poc --workdir runs/poc
#   FAKE_CPU_DEVICES=8 bash launch/train_single_host.sh --config tiny --workdir runs/tiny8
# The global batch is split over a 'data' mesh of every device; resume with --resume.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${FAKE_CPU_DEVICES:-}" ]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$FAKE_CPU_DEVICES"
fi
bash run.sh setup
exec .venv/bin/mc-jax train "$@"
