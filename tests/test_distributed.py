"""How a training process joins its job (issue 17, item 5; `mc_jax.training.distributed`):
the plan for each cluster mode from the environment, clear errors for a broken one, and the
arguments `jax.distributed.initialize` gets (recorded, not run: the real two-process run is
tests/test_multiprocess.py, through the SLURM mode)."""
import os
import subprocess

import jax
import pytest

from mc_jax.errors import ConfigError
from mc_jax.training import distributed as dist

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch",
                      "train.sh")
SRUN = dict(SLURM_JOB_ID="123", SLURM_STEP_NODELIST="node[001-004]", SLURM_NTASKS="16",
            SLURM_PROCID="5", SLURM_LOCALID="1")


def test_auto_mode_picks_the_cluster_from_the_environment():
    assert dist.cluster_plan({}) == dist.ClusterPlan("local", None)
    p = dist.cluster_plan(dict(MC_JAX_COORDINATOR="h0:1234", MC_JAX_NUM_PROCESSES="4",
                               MC_JAX_PROCESS_ID="3"))
    assert p.mode == "manual" and p.kwargs == dict(coordinator_address="h0:1234",
                                                   num_processes=4, process_id=3)
    p = dist.cluster_plan(SRUN)
    assert (p.mode, p.kwargs, p.num_processes, p.process_id) == ("slurm", {}, 16, 5)
    assert "process 5 of 16" in p.describe()
    # one srun task, or sbatch without srun (no step variables): a single process
    assert dist.cluster_plan(dict(SRUN, SLURM_NTASKS="1")).kwargs is None
    assert dist.cluster_plan({k: v for k, v in SRUN.items()
                              if k != "SLURM_STEP_NODELIST"}).mode == "local"
    p = dist.cluster_plan(dict(TPU_WORKER_HOSTNAMES="t0,t1,t2,t3", TPU_WORKER_ID="2"))
    assert (p.mode, p.kwargs, p.num_processes, p.process_id) == ("tpu", {}, 4, 2)
    assert dist.cluster_plan(dict(TPU_WORKER_HOSTNAMES="t0")).mode == "local"  # one host
    # the manual variables win over a surrounding SLURM allocation
    assert dist.cluster_plan(dict(SRUN, MC_JAX_COORDINATOR="h0:1", MC_JAX_NUM_PROCESSES="2",
                                  MC_JAX_PROCESS_ID="0")).mode == "manual"


def test_explicit_modes_and_their_errors_name_the_variable():
    assert dist.cluster_plan(dict(SRUN, MC_JAX_CLUSTER="local")).kwargs is None
    assert dist.cluster_plan(dict(MC_JAX_CLUSTER="tpu")).kwargs == {}  # from TPU metadata
    with pytest.raises(ConfigError, match="SLURM_STEP_NODELIST.*srun"):
        dist.cluster_plan(dict(MC_JAX_CLUSTER="slurm", SLURM_JOB_ID="1", SLURM_NTASKS="2",
                               SLURM_PROCID="0", SLURM_LOCALID="0"))
    with pytest.raises(ConfigError, match="MC_JAX_NUM_PROCESSES is not set"):
        dist.cluster_plan(dict(MC_JAX_COORDINATOR="h:1", MC_JAX_PROCESS_ID="0"))
    with pytest.raises(ConfigError, match="MC_JAX_PROCESS_ID=2 is not in"):
        dist.cluster_plan(dict(MC_JAX_COORDINATOR="h:1", MC_JAX_NUM_PROCESSES="2",
                               MC_JAX_PROCESS_ID="2"))
    with pytest.raises(ConfigError, match="host:port"):
        dist.cluster_plan(dict(MC_JAX_CLUSTER="manual", MC_JAX_COORDINATOR="h0"))
    with pytest.raises(ConfigError, match="SLURM_PROCID='x' is not an integer"):
        dist.cluster_plan(dict(SRUN, SLURM_PROCID="x"))
    with pytest.raises(ConfigError, match="MC_JAX_CLUSTER='k8s'"):
        dist.cluster_plan(dict(MC_JAX_CLUSTER="k8s"))


def test_init_distributed_passes_the_plan_to_jax(monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    dist.init_distributed({})
    dist.init_distributed(SRUN)
    dist.init_distributed(dict(MC_JAX_COORDINATOR="h0:9", MC_JAX_NUM_PROCESSES="2",
                               MC_JAX_PROCESS_ID="1"))
    assert calls == [{}, dict(coordinator_address="h0:9", num_processes=2, process_id=1)]
    err = capsys.readouterr().err
    assert "distributed: slurm, process 5 of 16" in err and "coordinator h0:9" in err
    assert "local" not in err  # a single process says nothing


def test_launch_script_refuses_bad_flags_before_doing_anything():
    r = subprocess.run(["bash", SCRIPT, "--cluster", "k8s", "--", "--config", "tiny"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "use auto, local, manual, slurm or tpu" in r.stderr
    r = subprocess.run(["bash", SCRIPT, "--config", "tiny"], capture_output=True,
                       text=True)
    assert r.returncode == 2 and "after --" in r.stderr
    r = subprocess.run(["bash", SCRIPT, "--cluster", "slurm", "--"], capture_output=True,
                       text=True, env={"PATH": "/usr/bin:/bin", "MC_JAX_PYTHON": "/nonexistent"})
    assert r.returncode == 2 and "run 'bash run.sh setup' once" in r.stderr
