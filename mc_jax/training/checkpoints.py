"""Checkpoints of a training run: Orbax saves of the full train state (with the data iterator's
state and run metadata, the run's full config among it) for exact resume, each verified on
restore against a sha256 manifest written after the save; the small exported GistNet + LensNet
pair (`nets.io.save_networks`), and warm starts from such an export."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.errors import ConfigError, CorruptFileError
from mc_jax.nets.io import fill_params, save_networks
from mc_jax.training.config import TrainConfig
from mc_jax.training.models import Models
from mc_jax.training.step import TrainState


def manager(workdir: Path, cfg: TrainConfig):
    """The Orbax CheckpointManager of workdir/checkpoints (synchronous saves)."""
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=opts)


# sha256 of every file of a finished step, written into the step folder after Orbax finalised
# it: Orbax checks the zarr shard index only (crc32c), not the data, so a flipped byte in an
# array file would otherwise restore as a different state
MANIFEST = "mc_jax_sha256.json"


def _sha256(f: Path) -> str:
    h = hashlib.sha256()
    with open(f, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _step_files(step_dir: Path) -> dict:
    return {str(f.relative_to(step_dir)): f for f in sorted(step_dir.rglob("*"))
            if f.is_file() and f.name not in (MANIFEST, MANIFEST + ".tmp")}


def write_manifest(step_dir: Path):
    """The checksum manifest of a saved step (atomic: a kill leaves none or the whole file)."""
    sums = {rel: {"size": f.stat().st_size, "sha256": _sha256(f)}
            for rel, f in _step_files(step_dir).items()}
    tmp = step_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as fh:
        json.dump({"files": sums}, fh, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, step_dir / MANIFEST)


def step_problem(step_dir: Path) -> str | None:
    """What is wrong with a saved step's files against its manifest (None: all intact), or
    'unverified' where the step has no manifest (saved by an older mc-jax, or killed between
    Orbax's save and the manifest's)."""
    if not step_dir.is_dir():
        return f"{step_dir} is missing"
    if not (step_dir / MANIFEST).is_file():
        return "unverified"
    try:
        want = json.loads((step_dir / MANIFEST).read_text())["files"]
        assert isinstance(want, dict) and want
    except Exception:  # noqa: BLE001 - any unreadable manifest is a damaged step
        return f"its checksum manifest {MANIFEST} is unreadable"
    have = _step_files(step_dir)
    for rel, w in sorted(want.items()):
        f = have.get(rel)
        if f is None:
            return f"file {rel} is missing"
        if f.stat().st_size != w.get("size") or _sha256(f) != w.get("sha256"):
            return f"file {rel} does not match its sha256 (changed or truncated)"
    extra = sorted(set(have) - set(want))
    if extra:
        return f"file {extra[0]} was not part of the saved step"
    return None


def _damaged(mgr, step: int, problem: str) -> CorruptFileError:
    """The error for a damaged step: names it and the newest intact step before it; nothing is
    deleted (the user moves the damaged folder aside)."""
    root = Path(mgr.directory)
    good = next((s for s in sorted(mgr.all_steps(), reverse=True)
                 if s < step and step_problem(root / str(s)) in (None, "unverified")), None)
    where = root / str(step)
    fix = (f"the newest intact step is {good}: move the damaged folder out of the way (e.g. `mv "
           f"{where} {root.parent / f'damaged-step-{step}'}`) and --resume again to continue "
           f"from step {good}" if good is not None else
           "no earlier intact step is left: start again in a fresh --workdir")
    return CorruptFileError(f"checkpoint step {step} ({where}) is damaged: {problem}. Nothing "
                            f"was deleted; {fix}")


def verify_step(mgr, step: int, log=None):
    """Check a step's files against its manifest; CorruptFileError naming the step if not."""
    problem = step_problem(Path(mgr.directory) / str(step))
    if problem == "unverified":
        if log:
            log(f"checkpoint step {step} has no checksum manifest ({MANIFEST}: saved by an older "
                "mc-jax or killed just after its save): restoring it unverified")
    elif problem is not None:
        raise _damaged(mgr, step, problem)


def save_checkpoint(mgr, state: TrainState, data_state: dict, meta: dict):
    import orbax.checkpoint as ocp

    step = int(state.step)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_state),
                                           meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()
    if jax.process_index() == 0 and step in mgr.all_steps():
        write_manifest(Path(mgr.directory) / str(step))


def read_meta(mgr, step: int) -> dict:
    """The run metadata of a saved step (its full config among it), without the arrays."""
    import orbax.checkpoint as ocp

    try:
        r = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        meta = r.meta
        assert isinstance(meta, dict)
    except Exception as e:  # noqa: BLE001 - orbax raises several types for damaged files
        raise _damaged(mgr, step, f"its metadata cannot be read ({type(e).__name__}: {e})") from e
    return meta


def _nonfinite_leaves(state) -> list[str]:
    floats = lambda x: jnp.issubdtype(x.dtype, jnp.inexact)  # noqa: E731
    ok = jax.jit(lambda t: [jnp.isfinite(x).all() if floats(x) else jnp.bool_(True)
                            for x in jax.tree.leaves(t)])(state)
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]]
    return [p for p, good in zip(paths, jax.device_get(ok)) if not good]


def restore_checkpoint(mgr, template: TrainState, step: int | None = None, *, verify=True,
                       log=None):
    """(state, data state, meta) of a step (default: the latest), or None where there is none.
    The step's files are checked against its manifest (`verify`) and the restored arrays must
    be finite (a saved state always is); a damaged step raises CorruptFileError by name."""
    import orbax.checkpoint as ocp

    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    if verify:
        verify_step(mgr, step, log)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
        r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      data=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for damaged files
        raise _damaged(mgr, step, f"it cannot be restored ({type(e).__name__}: {e}); if the "
                                  "config is not the run's own, resume with the run's config "
                                  "or use a fresh --workdir") from e
    bad = _nonfinite_leaves(r.state)
    if bad:
        raise _damaged(mgr, step, f"non-finite values in {bad[0]}"
                                  + (f" and {len(bad) - 1} more" if len(bad) > 1 else ""))
    return r.state, r.data, r.meta


def export_networks(path: Path, m: Models, state: TrainState, meta: dict, dtype="bfloat16",
                    train_config: dict | None = None):
    """Small standalone checkpoint of GistNet + LensNet (`nets.io.save_networks`), with this
    run's training config in its networks.json (or `train_config`, a stored one kept as it is)."""
    tc = json.loads(m.cfg.to_json()) if train_config is None else train_config
    save_networks(path, state.gist, state.lens, m.gist_cfg, m.lens_cfg,
                  dict(meta, train_config=tc), dtype)


def warm_start(m: Models, gist_state, lens_state, path: str | Path):
    """GistNet / LensNet states of this run's shapes, with the parameters of an exported
    checkpoint (`init_from`): fine-tuning starts there, with a fresh optimiser."""
    from safetensors.numpy import load_file

    f = Path(path) / "networks.safetensors"
    if not f.is_file():
        raise ConfigError(f"init_from={path}: no networks.safetensors there (give a directory "
                          "written by `mc-jax train --export` or `mc-jax fit-lens`)")
    try:
        flat = load_file(str(f))
    except Exception as e:
        raise CorruptFileError(f"{f}: checkpoint is damaged ({e})") from e
    out = []
    for name, graph, st in (("gist", m.gist_graph, gist_state), ("lens", m.lens_graph,
                                                                  lens_state)):
        mod = nnx.merge(graph, jax.tree.map(jnp.copy, st))  # leave the caller's state as it is
        fill_params(mod, name, flat, ConfigError,
                     f"init_from={path} does not fit this config: parameter")
        out.append(nnx.split(mod)[1])
    return tuple(out)
