#!/usr/bin/env bash
# Multi-host data-parallel training by hand: run this on every host with the same arguments.
#   COORDINATOR=host0:12345 NUM_PROCESSES=4 PROCESS_ID=<0..3> \
#     bash launch/train_multihost.sh --config gpu_poc --workdir /shared/runs/poc [--resume]
# Each process feeds its own slice of every global batch (the Grain pipeline shards by
# jax.process_index()); the step is one jit over the global 'data' mesh; Orbax writes one
# checkpoint from all processes. The workdir must be on storage every host can see.
# (launch/train.sh --cluster manual; under SLURM or on a TPU pod use launch/train.sh itself.)
set -euo pipefail
: "${COORDINATOR:?set COORDINATOR=host:port (process 0's address)}"
: "${NUM_PROCESSES:?set NUM_PROCESSES}"
: "${PROCESS_ID:?set PROCESS_ID}"
exec bash "$(dirname "$0")/train.sh" --cluster manual -- "$@"
