"""Checkpoints of a training run: Orbax saves of the full train state (with the data iterator's
state and run metadata) for exact resume, the small exported GistNet + LensNet pair
(`nets.io.save_networks`), and warm starts from such an export."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.errors import ConfigError, CorruptFileError, McJaxError
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


def save_checkpoint(mgr, state: TrainState, data_state: dict, meta: dict):
    import orbax.checkpoint as ocp

    step = int(state.step)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_state),
                                           meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()


def restore_checkpoint(mgr, template: TrainState, step: int | None = None):
    import orbax.checkpoint as ocp

    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
        r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      data=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for damaged files
        raise McJaxError(f"checkpoint step {step} in {mgr.directory} cannot be restored "
                         f"({type(e).__name__}: {e}); delete that step folder to fall back to "
                         "the previous one") from e
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
