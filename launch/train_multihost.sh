#!/usr/bin/env bash
# Multi-host data-parallel training: run this on every host with the same arguments.
#   COORDINATOR=host0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     bash launch/train_multihost.sh --config gpu_poc --workdir /shared/runs/poc [--resume]
# Each process feeds its own slice of every global batch (the Grain pipeline shards by
# jax.process_index()); the step is one jit over the global 'data' mesh; Orbax writes one
# checkpoint from all processes. The workdir must be on storage every host can see.
set -euo pipefail
cd "$(dirname "$0")/.."
: "${COORDINATOR:?set COORDINATOR=host:port (process 0's address)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"
export MC_JAX_COORDINATOR="$COORDINATOR" MC_JAX_NUM_PROCESSES="$NUM_PROCESSES" \
       MC_JAX_PROCESS_ID="$PROCESS_ID"
bash run.sh setup
exec .venv/bin/mc-jax train "$@"
