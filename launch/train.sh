#!/usr/bin/env bash
# One entry point for training on one host, a SLURM cluster or a Cloud TPU VM pod slice; every
# process of a job runs this same command (mc_jax/training/distributed.py says how it joins).
#   bash launch/train.sh -- --config tiny --workdir runs/tiny                  # this host
#   bash launch/train.sh --fake-cpu-devices 8 -- --config tiny --workdir runs/t8  # CPU dry run
#   srun bash launch/train.sh --cluster slurm -- --config gpu_poc --workdir $SHARED/poc --resume
#   gcloud compute tpus tpu-vm ssh $TPU --worker=all --command \
#     "cd mc_jax && bash launch/train.sh --cluster tpu -- --config gpu_poc --workdir $BUCKET/poc"
#   COORDINATOR=host0:12345 NUM_PROCESSES=2 PROCESS_ID=0 bash launch/train.sh --cluster manual -- ...
# Flags: --cluster auto|local|manual|slurm|tpu (default auto: MC_JAX_COORDINATOR or COORDINATOR
# set -> manual; inside srun with more than one task -> slurm; TPU_WORKER_HOSTNAMES with more
# than one worker -> tpu; else local), --fake-cpu-devices N (N CPU devices, JAX_PLATFORMS=cpu).
# Everything after -- goes to `mc-jax train`. Setup (bash run.sh setup) runs here only for a
# local run; a job of many processes needs it done once beforehand on the shared filesystem
# (launch/slurm_train.sbatch does), because its tasks would otherwise install concurrently.
set -euo pipefail
cd "$(dirname "$0")/.."
cluster=auto fake=
while [ $# -gt 0 ]; do
  case "$1" in
    --cluster) cluster=${2:?--cluster needs a value}; shift 2 ;;
    --fake-cpu-devices) fake=${2:?--fake-cpu-devices needs a count}; shift 2 ;;
    --) shift; break ;;
    -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "launch/train.sh: unknown flag $1 (put mc-jax train's own flags after --)" >&2
       exit 2 ;;
  esac
done
case "$cluster" in
  auto|local|manual|slurm|tpu) ;;
  *) echo "launch/train.sh: --cluster $cluster: use auto, local, manual, slurm or tpu" >&2
     exit 2 ;;
esac
# the short names of train_multihost.sh
if [ -n "${COORDINATOR:-}" ]; then
  export MC_JAX_COORDINATOR="$COORDINATOR" MC_JAX_NUM_PROCESSES="${NUM_PROCESSES:-}" \
         MC_JAX_PROCESS_ID="${PROCESS_ID:-}"
fi
export MC_JAX_CLUSTER="$cluster"
if [ -n "$fake" ]; then
  export JAX_PLATFORMS=cpu XLA_FLAGS="--xla_force_host_platform_device_count=$fake"
fi
py=${MC_JAX_PYTHON:-.venv/bin/python}
if [ "$cluster" = local ] || { [ "$cluster" = auto ] && [ -z "${MC_JAX_COORDINATOR:-}" ] \
     && [ "${SLURM_NTASKS:-1}" -le 1 ] && [ -z "${TPU_WORKER_HOSTNAMES:-}" ]; }; then
  [ -n "${MC_JAX_PYTHON:-}" ] || bash run.sh setup
elif [ ! -x "$py" ]; then
  echo "launch/train.sh: $py not found; run 'bash run.sh setup' once on the shared filesystem" \
       "before starting the job's processes" >&2
  exit 2
fi
exec "$py" -m mc_jax.cli train "$@"
