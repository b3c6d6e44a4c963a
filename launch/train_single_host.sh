#!/usr/bin/env bash
# All local devices of one machine (GPUs, or N fake CPU devices for a dry run):
#   bash launch/train_single_host.sh --config gpu_poc --workdir runs/poc
#   FAKE_CPU_DEVICES=8 bash launch/train_single_host.sh --config tiny --workdir runs/tiny8
# The global batch is split over a 'data' mesh of every device; resume with --resume.
# (launch/train.sh --cluster local, kept for its short form.)
set -euo pipefail
exec bash "$(dirname "$0")/train.sh" --cluster local \
  ${FAKE_CPU_DEVICES:+--fake-cpu-devices "$FAKE_CPU_DEVICES"} -- "$@"
