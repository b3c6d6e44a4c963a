"""The train state and the one jit-compiled, sharded train step.

One `jax.jit` over a Mesh ('data' axis): the batch is sharded, parameters replicated, the train
state donated; the base parameters are a separate, replicated, never-differentiated argument.
The optimiser trains GistNet and/or LensNet by phase (the other's updates are zero).
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mc_jax.training.config import TrainConfig
from mc_jax.training.models import Models
from mc_jax.training.objective import batch_loss


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    gist: Any
    lens: Any
    opt: Any
    key: jax.Array  # base key: step t draws from fold_in(key, t), so a resumed run draws the same


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * 0.1)
    train = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                        optax.adamw(sched, weight_decay=cfg.weight_decay))
    trains = {"gist": cfg.phase in ("gist", "joint"), "lens": cfg.phase in ("lens", "joint")}
    labels = {k: jax.tree.map(lambda _: "train" if trains[k] else "freeze", v)
              for k, v in params.items()}
    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def init_state(m: Models, gist_state, lens_state) -> TrainState:
    params = {"gist": gist_state, "lens": lens_state}
    opt = make_optimizer(m.cfg, params).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), gist=gist_state, lens=lens_state, opt=opt,
                      key=jax.random.PRNGKey(m.cfg.seed))


def train_step(state: TrainState, base_params, tokens_BxT, m: Models):
    params = {"gist": state.gist, "lens": state.lens}
    key = jax.random.fold_in(state.key, state.step)
    (loss, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        params, base_params, tokens_BxT, key, m)
    tx = make_optimizer(m.cfg, params)
    updates, opt = tx.update(grads, state.opt, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(loss).astype(jnp.float32)
    new = TrainState(step=state.step + 1, gist=params["gist"], lens=params["lens"], opt=opt,
                     key=state.key)
    # never carry a non-finite update forward: the host stops on `finite == 0`
    new = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(loss), a, b), new, state)
    return new, metrics


def make_mesh(n_devices: int | None = None) -> Mesh:
    devs = np.array(jax.devices()[: n_devices or len(jax.devices())])
    return Mesh(devs, ("data",))


_STEP_CACHE: dict = {}


def compile_train_step(m: Models, mesh: Mesh):
    """The jitted step for this config and mesh (cached: a resumed run in the same process, or a
    second run of the same config, reuses the compiled step)."""
    key = (m.cfg, m.base_cfg, tuple(d.id for d in mesh.devices.flat))
    if key not in _STEP_CACHE:
        rep = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))

        def step(s, bp, t):
            return train_step(s, bp, t, m)

        _STEP_CACHE[key] = jax.jit(step, donate_argnums=(0,), in_shardings=(rep, rep, data),
                                   out_shardings=(rep, rep))
    return _STEP_CACHE[key]
