"""Which cluster a training process runs in, and `jax.distributed.initialize` for it (issue 17,
item 5). JAX's own multi-process runtime is the engine; this module only decides how to call it.

`launch/train.sh` is the one entry point; it sets MC_JAX_CLUSTER from its `--cluster` flag
(default auto). The modes:

- local: one process, all its local devices; nothing to initialise.
- manual: MC_JAX_COORDINATOR=host:port, MC_JAX_NUM_PROCESSES and MC_JAX_PROCESS_ID set by hand
  on every host (`launch/train_multihost.sh`); passed to `jax.distributed.initialize`.
- slurm: a task of `srun` (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and
  SLURM_LOCALID set) with SLURM_NTASKS > 1. `jax.distributed.initialize()` finds the
  coordinator (the step's first node, a port derived from the job id; JAX_COORDINATOR_PORT
  overrides it), the process count and id itself, and on GPUs makes GPU SLURM_LOCALID the
  process's only device: run one task per GPU (`--ntasks-per-node` = GPUs per node, GPUs
  requested per node, not per task).
- tpu: every worker of a Cloud TPU VM pod slice runs the same command; `jax.distributed.
  initialize()` reads the slice from the TPU metadata. Chosen by `--cluster tpu`, or in auto
  mode when TPU_WORKER_HOSTNAMES names more than one worker.

auto: manual if MC_JAX_COORDINATOR is set, else slurm if the srun variables say more than one
task, else tpu if TPU_WORKER_HOSTNAMES has more than one host, else local.
"""
from __future__ import annotations

import dataclasses
import os
import sys
from typing import Mapping

from mc_jax.errors import ConfigError

MODES = ("auto", "local", "manual", "slurm", "tpu")
SLURM_VARS = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID",
              "SLURM_LOCALID")


@dataclasses.dataclass(frozen=True)
class ClusterPlan:
    """How this process joins its job. kwargs: the arguments for `jax.distributed.initialize`
    (empty: JAX detects the cluster); None for a single process (nothing to initialise)."""

    mode: str
    kwargs: dict | None
    num_processes: int | None = None   # as far as the environment says before initialising
    process_id: int | None = None

    def describe(self) -> str:
        if self.kwargs is None:
            return f"distributed: {self.mode} (one process)"
        who = (f"process {self.process_id} of {self.num_processes}"
               if self.num_processes is not None else "processes from the TPU metadata")
        extra = f", coordinator {self.kwargs['coordinator_address']}" \
            if "coordinator_address" in self.kwargs else ""
        return f"distributed: {self.mode}, {who}{extra}"


def _int(env, name: str, mode: str) -> int:
    if name not in env:
        raise ConfigError(f"cluster mode {mode}: {name} is not set")
    try:
        return int(env[name])
    except ValueError:
        raise ConfigError(f"cluster mode {mode}: {name}={env[name]!r} is not an integer") \
            from None


def _slurm_present(env) -> bool:
    return all(v in env for v in SLURM_VARS)


def _tpu_hosts(env) -> int:
    return len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()])


def cluster_plan(env: Mapping[str, str] | None = None) -> ClusterPlan:
    """The plan for this process from its environment (default os.environ; see the module
    docstring). Raises ConfigError naming the variable when a mode's variables are missing or
    inconsistent."""
    env = os.environ if env is None else env
    mode = env.get("MC_JAX_CLUSTER", "auto") or "auto"
    if mode not in MODES:
        raise ConfigError(f"MC_JAX_CLUSTER={mode!r}: use one of {', '.join(MODES)}")
    if mode == "auto":
        if env.get("MC_JAX_COORDINATOR"):
            mode = "manual"
        elif _slurm_present(env) and _int(env, "SLURM_NTASKS", "slurm") > 1:
            mode = "slurm"
        elif _tpu_hosts(env) > 1:
            mode = "tpu"
        else:
            return ClusterPlan("local", None)
    if mode == "local":
        return ClusterPlan("local", None)
    if mode == "manual":
        coord = env.get("MC_JAX_COORDINATOR", "")
        if not coord or ":" not in coord:
            raise ConfigError(f"cluster mode manual: MC_JAX_COORDINATOR={coord!r} must be "
                              "host:port (process 0's address)")
        n = _int(env, "MC_JAX_NUM_PROCESSES", mode)
        i = _int(env, "MC_JAX_PROCESS_ID", mode)
        if not 0 <= i < n:
            raise ConfigError(f"cluster mode manual: MC_JAX_PROCESS_ID={i} is not in "
                              f"[0, MC_JAX_NUM_PROCESSES={n})")
        return ClusterPlan(mode, dict(coordinator_address=coord, num_processes=n,
                                      process_id=i), n, i)
    if mode == "slurm":
        missing = [v for v in SLURM_VARS if v not in env]
        if missing:
            raise ConfigError(f"cluster mode slurm: {', '.join(missing)} not set; start the "
                              "tasks with srun (sbatch alone sets no step variables)")
        n, i = _int(env, "SLURM_NTASKS", mode), _int(env, "SLURM_PROCID", mode)
        if n == 1:
            return ClusterPlan("slurm", None, 1, 0)
        return ClusterPlan(mode, {}, n, i)
    hosts = _tpu_hosts(env)  # tpu
    wid = env.get("TPU_WORKER_ID")
    return ClusterPlan(mode, {}, hosts or None, int(wid) if wid and wid.isdigit() else None)


def init_distributed(env: Mapping[str, str] | None = None, *, log=True) -> ClusterPlan:
    """Initialise JAX's multi-process runtime as `cluster_plan` says (before any other JAX
    call touches a device). Prints the plan to stderr unless it is local. -> the plan."""
    plan = cluster_plan(env)
    if plan.kwargs is not None:
        import jax

        jax.distributed.initialize(**plan.kwargs)
    if log and plan.mode != "local":
        print(plan.describe(), file=sys.stderr, flush=True)
    return plan
