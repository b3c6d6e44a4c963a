"""The training loop: data, the compiled step, metrics, checkpoints, export.

`run` trains a `TrainConfig` in a work directory: metrics.jsonl (one JSON row per step),
TensorBoard events under tb/ (when tensorboardX is installed), Orbax checkpoints for an exact
resume (the config must match the run's config.json), and optionally the exported networks.
The metrics of step i are read after step i + 1 is dispatched, so the host never waits on the
device between steps.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mc_jax.data import pipeline as data
from mc_jax.errors import ConfigError, McJaxError
from mc_jax.training.checkpoints import (export_networks, manager, restore_checkpoint,
                                         save_checkpoint, warm_start)
from mc_jax.training.config import TrainConfig
from mc_jax.training.models import Models, build_models, load_frozen_base
from mc_jax.training.step import compile_train_step, init_state, make_mesh


class TrainingDivergedError(McJaxError):
    """A NaN or inf loss: the run stops and keeps its last good checkpoint."""


class SyntheticBatches:
    """Deterministic random token windows (for the tiny base): batch i depends on (seed, i) only.

    Documents repeat short phrases so the far history carries information about the horizon.
    """

    def __init__(self, cfg: TrainConfig, vocab: int, mesh: Mesh | None):
        self.cfg, self.vocab, self.mesh, self.index = cfg, vocab, mesh, 0

    def _batch(self, i):
        rng = np.random.default_rng([self.cfg.seed, i])
        T = self.cfg.seq_len + self.cfg.horizon
        phrases = rng.integers(0, self.vocab, (self.cfg.batch_size, 16, 24))
        pick = rng.integers(0, 16, (self.cfg.batch_size, T // 24 + 1))
        seq = np.take_along_axis(phrases, pick[..., None], 1).reshape(self.cfg.batch_size, -1)
        return seq[:, :T].astype(np.int32)

    def __next__(self):
        b = self._batch(self.index)
        self.index += 1
        if self.mesh is None:
            return {"tokens": jnp.asarray(b)}
        return {"tokens": jax.device_put(b, NamedSharding(self.mesh, P("data")))}

    def __iter__(self):
        return self

    def get_state(self):
        return {"kind": "synthetic", "next_index": self.index, "seed": self.cfg.seed}

    def set_state(self, state):
        if state.get("kind") != "synthetic":
            raise ConfigError("checkpointed data state is not from the synthetic source")
        self.index = int(state["next_index"])


def make_batches(cfg: TrainConfig, m: Models, mesh: Mesh, split: str = "train"):
    if cfg.data == "synthetic":
        return SyntheticBatches(cfg, m.base_cfg.vocab_size, mesh)
    src = data.open_split(split, m.tokenizer, data_dir=cfg.data_dir)
    wcfg = data.WindowConfig(cfg.seq_len + cfg.horizon, cfg.batch_size, seed=cfg.seed)
    return data.make_batch_iterator(src, wcfg, mesh=mesh)


def _writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(str(workdir / "tb"))
    except Exception:  # noqa: BLE001 - TensorBoard is optional output
        return None


def run(cfg: TrainConfig, workdir: str | Path, *, resume: bool = False, steps: int | None = None,
        n_devices: int | None = None, progress: bool = True, export: str | Path | None = None,
        log=None) -> dict:
    """Train; returns the summary printed as the last JSON line by the CLI."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    total = steps if steps is not None else cfg.steps
    base_cfg, base_params, tok = load_frozen_base(cfg)
    m, gist_state, lens_state = build_models(cfg, base_cfg, base_params, tok)
    if cfg.init_from:  # a resumed run's checkpoint then overrides it
        gist_state, lens_state = warm_start(m, gist_state, lens_state, cfg.init_from)
        log(f"GistNet and LensNet start from {cfg.init_from}")
    mesh = make_mesh(n_devices)
    if cfg.batch_size % mesh.size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of the "
                          f"{mesh.size} devices of the mesh")
    rep = NamedSharding(mesh, P())
    base_params = jax.device_put(base_params, rep)
    state = jax.device_put(init_state(m, gist_state, lens_state), rep)
    batches = make_batches(cfg, m, mesh)
    mgr = manager(workdir, cfg)
    meta = {"config": json.loads(cfg.to_json()), "base": base_cfg.name}
    if resume and (workdir / "config.json").exists():
        saved = json.loads((workdir / "config.json").read_text())
        # a field added to TrainConfig after the run started counts as its default
        defaults = json.loads(type(cfg)().to_json())
        diff = sorted(k for k, v in json.loads(cfg.to_json()).items()
                      if saved.get(k, defaults[k]) != v)
        if diff:
            raise ConfigError(f"--resume with a different config than {workdir}/config.json "
                              f"(differs in: {', '.join(diff)}); an exact resume needs the same "
                              "config")
    if resume:
        restored = restore_checkpoint(mgr, state)
        if restored is not None:
            state, data_state, _ = restored
            state = jax.device_put(state, rep)
            batches.set_state(data_state)
            log(f"resumed from step {int(state.step)} ({mgr.directory})")
        else:
            log("no checkpoint to resume from: starting fresh")
    elif mgr.latest_step() is not None:
        raise ConfigError(f"{workdir} already holds checkpoints; pass --resume to continue or "
                          "use another --workdir")
    (workdir / "config.json").write_text(cfg.to_json())
    step_fn = compile_train_step(m, mesh)
    writer = _writer(workdir)
    metrics_file = open(workdir / "metrics.jsonl", "a")
    start = int(state.step)
    first_loss = last_loss = None
    pending = None  # (step, metrics) of the step dispatched last: read after the next dispatch

    def consume(step_i, mets, dt):
        nonlocal first_loss, last_loss
        mets = {k: float(v) for k, v in jax.device_get(mets).items()}
        if mets["finite"] == 0.0:
            raise TrainingDivergedError(
                f"loss became NaN/inf at step {step_i}: stopping; the last good checkpoint in "
                f"{workdir / 'checkpoints'} is kept (lower lr or check the data)")
        first_loss = mets["loss"] if first_loss is None else first_loss
        last_loss = mets["loss"]
        mets.update(step=step_i, step_time=dt)
        metrics_file.write(json.dumps(mets) + "\n")
        metrics_file.flush()
        if writer is not None:
            for k, v in mets.items():
                writer.add_scalar(f"train/{k}", v, step_i)
        return mets

    bar = tqdm(range(start, total), initial=start, total=total, disable=not progress,
               desc=f"train {cfg.name}", file=sys.stderr, dynamic_ncols=True)
    t_last = time.perf_counter()
    try:
        for i in bar:
            batch = next(batches)
            state, mets = step_fn(state, base_params, batch["tokens"])
            if pending is not None:
                now = time.perf_counter()
                shown = consume(pending[0], pending[1], now - t_last)
                t_last = now
                bar.set_postfix(loss=f"{shown['loss']:.4f}", nll_mix=f"{shown['nll_mix']:.3f}",
                                s=f"{shown['step_time']:.1f}")
            pending = (i + 1, mets)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == total:
                consume(pending[0], pending[1], time.perf_counter() - t_last)
                t_last = time.perf_counter()
                pending = None
                save_checkpoint(mgr, state, batches.get_state(), dict(meta, step=i + 1))
        if pending is not None:
            consume(pending[0], pending[1], time.perf_counter() - t_last)
    finally:
        bar.close()
        metrics_file.close()
        if writer is not None:
            writer.close()
    ckpt = str((workdir / "checkpoints").absolute())
    summary = {"steps": int(state.step), "first_loss": first_loss, "last_loss": last_loss,
               "checkpoint": ckpt, "workdir": str(workdir)}
    if export:
        export_networks(Path(export), m, state, dict(meta, steps=int(state.step),
                                                     last_loss=last_loss))
        summary["exported"] = str(export)
    return summary


def maybe_init_distributed():
    """Multi-host: `launch/train_multihost.sh` sets MC_JAX_COORDINATOR, MC_JAX_NUM_PROCESSES and
    MC_JAX_PROCESS_ID; every process then runs the same program over the global mesh."""
    coord = os.environ.get("MC_JAX_COORDINATOR")
    if coord:
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["MC_JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["MC_JAX_PROCESS_ID"]))
