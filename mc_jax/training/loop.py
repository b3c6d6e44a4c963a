"""The training loop: data, the compiled step, metrics, checkpoints, export.

`run` trains a `TrainConfig` in a work directory: metrics.jsonl (one JSON row per step),
TensorBoard events under tb/ (when tensorboardX is installed), Orbax checkpoints for an exact
resume (verified on restore; the config must match the one stored in the checkpoint), and
optionally the exported networks. One run at a time holds a workdir (workdir/.lock).
The metrics of step i are read after step i + 1 is dispatched, so the host never waits on the
device between steps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from numbers import Integral
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from tqdm import tqdm

from mc_jax.data import pipeline as data
from mc_jax.errors import ConfigError, CorruptFileError, McJaxError
from mc_jax.training.checkpoints import (export_networks, manager, read_meta,
                                         restore_checkpoint, save_checkpoint, verify_step,
                                         warm_start)
from mc_jax.training.config import TrainConfig
from mc_jax.training.models import Models, build_models, load_frozen_base
from mc_jax.training.step import (base_shardings, compile_train_step, init_state, make_mesh,
                                  peak_bytes)


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


@contextlib.contextmanager
def workdir_lock(workdir: Path):
    """One writer per work directory: an exclusive flock on workdir/.lock (holding this run's pid
    and host), held for the whole run. A second run is refused by name; the OS drops the lock of
    a killed run, so a kill -9 never leaves the workdir stuck. Each process of a multi-host run
    locks its own file."""
    name = ".lock" if jax.process_count() == 1 else f".lock.{jax.process_index()}"
    path = workdir / name
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            raise ConfigError(f"{workdir} is in use by another `mc-jax train` ({holder}; lock "
                              f"file {path}): wait for it to finish or use another --workdir") \
                from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on host {socket.gethostname()}".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _check_run_args(steps, n_devices):
    def bad(v):
        return isinstance(v, bool) or not isinstance(v, Integral)

    if steps is not None and (bad(steps) or steps < 0):
        raise ConfigError(f"--steps must be an integer >= 0 (the step to train up to), got "
                          f"{steps!r}")
    n = len(jax.devices())
    if n_devices is not None and (bad(n_devices) or not 1 <= n_devices <= n):
        raise ConfigError(f"--devices must be between 1 and {n} (the devices JAX sees), got "
                          f"{n_devices!r}")


def _trim_metrics(path: Path, last_step: int):
    """Drop metrics rows past the restored step (a killed run logged them before its next save;
    the resumed run logs them again) and a torn last line, so each step appears once. Atomic."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for n, line in enumerate(lines):
        try:
            row = json.loads(line)
        except ValueError:
            if n < len(lines) - 1:
                keep.append(line)  # not ours to judge; a torn last line is dropped
            continue
        if not (isinstance(row, dict) and isinstance(row.get("step"), int)
                and row["step"] > last_step):
            keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep))
        os.replace(tmp, path)


def _resume_config(cfg: TrainConfig, saved: dict, source: str, steps, log):
    """Compare this run's config with the run's saved one (a field added to TrainConfig after
    the run started counts as its default). `steps` may differ: on a resume it only says how far
    to train (like --steps); the learning-rate schedule keeps the run's own `steps`, so the
    resume stays exact. Returns (config to train with, step to train up to)."""
    defaults = json.loads(type(cfg)().to_json())
    diff = sorted(k for k, v in json.loads(cfg.to_json()).items()
                  if k != "steps" and saved.get(k, defaults[k]) != v)
    if diff:
        raise ConfigError(f"--resume with a different config than the run's ({source}; differs "
                          f"in: {', '.join(diff)}); an exact resume needs the same config: resume "
                          f"with the run's own values or use a fresh --workdir (nothing was "
                          "changed)")
    run_steps = saved.get("steps", defaults["steps"])
    total = steps if steps is not None else cfg.steps
    if cfg.steps != run_steps:
        log(f"steps={cfg.steps}: training up to step {total}; the learning-rate schedule keeps "
            f"the run's steps={run_steps} (an exact resume)")
        cfg = cfg.replace(steps=run_steps)
    return cfg, total


def run(cfg: TrainConfig, workdir: str | Path, *, resume: bool = False, steps: int | None = None,
        n_devices: int | None = None, progress: bool = True, export: str | Path | None = None,
        log=None) -> dict:
    """Train; returns the summary printed as the last JSON line by the CLI."""
    _check_run_args(steps, n_devices)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    with workdir_lock(workdir):
        return _run(cfg, workdir, resume, steps, n_devices, progress, export,
                    log or (lambda s: print(s, file=sys.stderr, flush=True)))


def _run(cfg, workdir, resume, steps, n_devices, progress, export, log) -> dict:
    total = steps if steps is not None else cfg.steps
    mgr = manager(workdir, cfg)
    ckpt_step = mgr.latest_step() if resume else None
    saved_meta = None
    if ckpt_step is not None:  # the checkpoint's own config decides, before anything is built
        verify_step(mgr, ckpt_step, log)
        saved_meta = read_meta(mgr, ckpt_step)
        if isinstance(saved_meta.get("config"), dict):
            cfg, total = _resume_config(cfg, saved_meta["config"], f"checkpoint step "
                                        f"{ckpt_step}'s meta", steps, log)
    elif resume and (workdir / "config.json").exists():
        try:
            saved = json.loads((workdir / "config.json").read_text())
            assert isinstance(saved, dict)
        except (ValueError, AssertionError) as e:
            raise CorruptFileError(f"{workdir}/config.json is not the JSON object of a run's "
                                   "config (damaged?); restore it or use a fresh --workdir") from e
        cfg, total = _resume_config(cfg, saved, f"{workdir}/config.json", steps, log)
    if not resume and mgr.latest_step() is not None:
        raise ConfigError(f"{workdir} already holds checkpoints; pass --resume to continue or "
                          "use another --workdir")
    base_cfg, base_params, tok = load_frozen_base(cfg)
    m, gist_state, lens_state = build_models(cfg, base_cfg, base_params, tok)
    if cfg.init_from:  # a resumed run's checkpoint then overrides it
        gist_state, lens_state = warm_start(m, gist_state, lens_state, cfg.init_from)
        log(f"GistNet and LensNet start from {cfg.init_from}")
    mesh = make_mesh(n_devices, cfg.model_parallel)
    n_data = int(mesh.shape["data"])
    if cfg.batch_size % n_data:
        raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of the "
                          f"{n_data} devices of the mesh's data axis")
    rep = NamedSharding(mesh, P())
    base_sh = base_shardings(cfg, mesh, base_params)
    base_params = jax.device_put(base_params, base_sh)
    state = jax.device_put(init_state(m, gist_state, lens_state), rep)
    batches = make_batches(cfg, m, mesh)
    meta = {"config": json.loads(cfg.to_json()), "base": base_cfg.name, "devices": mesh.size}
    if saved_meta is not None and saved_meta.get("devices", mesh.size) != mesh.size:
        log(f"warning: resuming on {mesh.size} devices a run saved on {saved_meta['devices']}: "
            "it continues, but is no longer bit-identical to an uninterrupted run (the batch "
            f"reductions split differently); pass --devices {saved_meta['devices']} for that")
    if ckpt_step is not None:
        state, data_state, _ = restore_checkpoint(mgr, state, ckpt_step, verify=False)
        state = jax.device_put(state, rep)
        batches.set_state(data_state)
        log(f"resumed from step {int(state.step)} ({mgr.directory})")
    elif resume:
        log("no checkpoint to resume from: starting fresh")
    # compiled (and its memory checked) before this run writes anything of its own
    step_fn = compiled_step(compile_train_step(m, mesh, base_sh), state, base_params, cfg, mesh,
                            log)
    # one writer of the run's files: process 0 (every process of a multi-host run logs the same
    # global metrics; Orbax coordinates the checkpoint itself)
    lead = jax.process_index() == 0
    if resume and lead:
        _trim_metrics(workdir / "metrics.jsonl", int(state.step))
    if lead:
        tmp = workdir / "config.json.tmp"
        tmp.write_text(cfg.to_json())
        os.replace(tmp, workdir / "config.json")
    writer = _writer(workdir) if lead else None
    metrics_file = open(workdir / "metrics.jsonl" if lead else os.devnull, "a")
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


def device_memory_limit() -> int | None:
    """Bytes one device may use, where the backend says (GPU, TPU); None on CPU."""
    try:
        return (jax.local_devices()[0].memory_stats() or {}).get("bytes_limit")
    except Exception:  # noqa: BLE001 - a backend without memory stats
        return None


_COMPILED: dict = {}


def compiled_step(step_fn, state, base_params, cfg: TrainConfig, mesh, log):
    """Compile the train step ahead of its first call and check its memory: XLA's estimate per
    device (arguments + temporaries + outputs not aliased to arguments) is printed, and a
    config that needs more than `cfg.memory_limit_gib` (else the device's own limit, where the
    backend reports one) is refused with ConfigError before any step runs. -> the compiled
    step (called like the jitted one)."""
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + cfg.horizon), jnp.int32,
                                  sharding=NamedSharding(mesh, P("data")))
    sig = lambda a: (a.shape, str(a.dtype), getattr(a, "sharding", None))  # noqa: E731
    key = (id(step_fn), cfg.replace(memory_limit_gib=0.0), jax.tree.structure((state, base_params)),
           tuple(sig(a) for a in jax.tree.leaves((state, base_params))))
    t0 = time.perf_counter()
    if key not in _COMPILED:  # a second run of the same shapes in this process reuses it
        while len(_COMPILED) >= 4:  # a long-lived process keeps the newest few
            _COMPILED.pop(next(iter(_COMPILED)))
        _COMPILED[key] = step_fn.lower(state, base_params, tokens).compile()
    compiled = _COMPILED[key]
    dt = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    limit = cfg.memory_limit_gib * 2 ** 30 if cfg.memory_limit_gib else device_memory_limit()
    gib = lambda b: f"{b / 2 ** 30:.3f} GiB"  # noqa: E731
    if mem is None:
        log(f"train step compiled in {dt:.1f}s (this backend gives no memory estimate)")
        return compiled
    need = peak_bytes(mem)
    mp = int(mesh.shape["model"])
    log(f"train step compiled in {dt:.1f}s: needs {gib(need)} per device (XLA estimate: "
        f"arguments {gib(mem.argument_size_in_bytes)}, temporaries {gib(mem.temp_size_in_bytes)})"
        f" on a {mesh.shape['data']} x {mp} (data x model) mesh"
        + (f", base sharded {cfg.base_sharding}" if mp > 1 else "")
        + (f"; limit {gib(limit)}" if limit else ""))
    if limit and need > limit:
        raise ConfigError(
            f"config {cfg.name}: the train step needs {gib(need)} per device (XLA's estimate), "
            f"more than the {gib(limit)} "
            + ("of memory_limit_gib" if cfg.memory_limit_gib else "the device has")
            + "; nothing was run. Lower batch_size or budget, set remat=True / attn_chunk, or "
              "shard the base over more devices (model_parallel, base_sharding)")
    return compiled


def maybe_init_distributed():
    """Multi-process: join the job this process is part of (manual MC_JAX_* variables, a SLURM
    srun step, a TPU pod slice; `mc_jax.training.distributed`), or nothing for one process."""
    from mc_jax.training.distributed import init_distributed

    return init_distributed()
