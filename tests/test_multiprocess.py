"""Two JAX processes on localhost (issue 17, items 1 and 5): `launch/train.sh --cluster slurm --
--config tiny` run as the two tasks of an emulated `srun` step (the SLURM_* variables srun sets;
JAX's own SLURM detection finds the coordinator on 127.0.0.1 and a port from the job id), 4 CPU
devices each, gloo collectives, gives the losses and parameters of one process with 8 devices,
logs each step once, and its checkpoint resumes in one process. Bounded in time; every process
it starts is stopped. (The manual and TPU modes: tests/test_distributed.py.)
(That each process reads its own shard of every global batch, none twice or skipped, is
tests/test_data.py::test_process_shards_are_disjoint_and_reassemble_the_global_batch.)"""
import dataclasses
import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from mc_jax.training import checkpoints, loop, models, step as train_step_mod
from mc_jax.training.config import load_config

STEPS, TIMEOUT_S = 4, 300
CFG = dataclasses.replace(load_config("tiny"), steps=STEPS)  # as `--set steps=4` (the schedule)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SLURM_PORTS = 65535 - 2 ** 12 + 1  # JAX's SLURM port: job id % 4096 + this


def _slurm_job_id() -> int:
    """A job id whose derived coordinator port is free on 127.0.0.1 now."""
    for job in np.random.default_rng(os.getpid()).permutation(2 ** 12):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", SLURM_PORTS + int(job)))
            except OSError:
                continue
        return 40000 + int(job) + 2 ** 12 * 7
    pytest.fail("no free port in JAX's SLURM range")


def _two_processes(workdir):
    job = _slurm_job_id()
    procs = []
    try:
        for i in range(2):
            env = {k: v for k, v in os.environ.items()
                   if not k.startswith(("SLURM_", "MC_JAX_COORDINATOR", "TPU_"))}
            env.update(SLURM_JOB_ID=str(job), SLURM_STEP_NODELIST="127.0.0.1", SLURM_NTASKS="2",
                       SLURM_PROCID=str(i), SLURM_LOCALID=str(i), MC_JAX_PYTHON=sys.executable,
                       JAX_PLATFORMS="cpu", JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",
                       PYTHONHASHSEED="0")
            procs.append(subprocess.Popen(
                ["bash", os.path.join(ROOT, "launch", "train.sh"), "--cluster", "slurm",
                 "--fake-cpu-devices", "4", "--", "--config", "tiny", "--workdir", str(workdir),
                 "--no-progress", "--set", f"steps={STEPS}"],
                env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        deadline = time.monotonic() + TIMEOUT_S
        outs = []
        for p in procs:
            try:
                outs.append(p.communicate(timeout=max(deadline - time.monotonic(), 1)))
            except subprocess.TimeoutExpired:
                pytest.fail(f"a training process ran past {TIMEOUT_S} s")
        for i, (p, (out, err)) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, err[-3000:]
            assert f"distributed: slurm, process {i} of 2" in err  # joined as srun's task i
        return [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _saved(workdir):
    """(state, data state) of the newest checkpoint of a run, restored in this process."""
    base_cfg, base_params, _ = models.load_frozen_base(CFG)
    m, g, l = models.build_models(CFG, base_cfg, base_params)
    state, data, _ = checkpoints.restore_checkpoint(checkpoints.manager(workdir, CFG),
                                                    train_step_mod.init_state(m, g, l))
    return state, data


def test_two_processes_equal_one_and_their_checkpoint_resumes_in_one(tmp_path):
    assert jax.device_count() == 8  # this process: the one-process, 8-device reference
    two = tmp_path / "two"
    summaries = _two_processes(two)
    assert [s["steps"] for s in summaries] == [STEPS, STEPS]
    one = tmp_path / "one"
    ref = loop.run(CFG, one, progress=False)
    rows2 = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    rows1 = [json.loads(x) for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows2] == list(range(1, STEPS + 1))  # process 0 logs, once
    np.testing.assert_allclose([r["loss"] for r in rows2], [r["loss"] for r in rows1],
                               rtol=1e-5)
    assert summaries[0]["last_loss"] == summaries[1]["last_loss"]
    np.testing.assert_allclose(summaries[0]["last_loss"], ref["last_loss"], rtol=1e-5)
    (s2, d2), (s1, d1) = _saved(two), _saved(one)
    assert int(s2.step) == int(s1.step) == STEPS and d2 == d1
    # the same parameters and optimizer moments, up to the order of the cross-device sums
    # (8 devices in one process vs 4 + 4 over gloo). GistNet's agree to 1e-4; for LensNet
    # parameters whose gradient is ~0 here, Adam turns that rounding noise into steps of up to
    # lr, so they agree to a tenth of one step (measured: 1.3e-4 with lr 3e-3)
    tol = {"gist": 1e-4, "lens": 0.1 * CFG.lr, "opt": 0.1 * CFG.lr}
    for name, t in tol.items():
        for x, y in zip(jax.tree.leaves(getattr(s2, name)), jax.tree.leaves(getattr(s1, name))):
            x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
            assert np.max(np.abs(x - y)) <= t * max(1.0, np.max(np.abs(y))), name
    # the two-process checkpoint resumes here, in one process on 8 devices, and continues as
    # the one-process run does from its own step-4 checkpoint
    for w in (two, one):
        (w / ".lock").unlink(missing_ok=True)
    cont2 = loop.run(CFG, two, steps=STEPS + 2, resume=True, progress=False)
    cont1 = loop.run(CFG, one, steps=STEPS + 2, resume=True, progress=False)
    assert cont2["steps"] == cont1["steps"] == STEPS + 2
    a = [json.loads(x)["loss"] for x in (two / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (one / "metrics.jsonl").read_text().splitlines()]
    assert len(a) == len(b) == STEPS + 2
    np.testing.assert_allclose(a, b, rtol=1e-5)
    shutil.rmtree(tmp_path, ignore_errors=True)
