"""The train state and the one jit-compiled, sharded train step.

One `jax.jit` over a 2-D Mesh ('data', 'model'): the batch is sharded over 'data', the train
state (GistNet, LensNet, optimiser: small) replicated and donated; the frozen base's parameters
are a separate, never-differentiated argument, replicated when the 'model' axis has one device
and otherwise sharded over it by `TrainConfig.base_sharding` (`base_param_specs`):

- "tp" (tensor parallel, Megatron's split): the attention and MLP input projections (wq, wk,
  wv, w_gate, w_up and the q/k/v biases) split their output features, the output projections
  (wo, w_down) their input features, the embedding (tied output head) its vocabulary;
- "fsdp" (fully sharded): every parameter split along its largest dimension that divides (the
  stacked layer axis excluded), gathered where it is used.

Norms, and any parameter whose dimension does not divide by the 'model' size, stay replicated.
XLA's SPMD partitioner inserts the collectives; the values are those of the replicated step
(tests/test_sharding.py).
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

from mc_jax.errors import ConfigError
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


def make_mesh(n_devices: int | None = None, model: int = 1) -> Mesh:
    """A ('data', 'model') mesh of the first n_devices devices (default all), `model` of them
    along 'model' (consecutive devices: in a multi-process run one model group lies within a
    process when `model` divides its local device count)."""
    devs = jax.devices()[: n_devices or len(jax.devices())]
    if model < 1 or len(devs) % model:
        raise ConfigError(f"model_parallel={model} does not divide the {len(devs)} devices of "
                          "the mesh")
    if jax.process_count() > 1 and model > 1 and jax.local_device_count() % model:
        raise ConfigError(f"model_parallel={model} must divide each process's "
                          f"{jax.local_device_count()} local devices (a model group within a "
                          "host)")
    return Mesh(np.array(devs).reshape(len(devs) // model, model), ("data", "model"))


BASE_SHARDINGS = ("tp", "fsdp")
_TP_OUT = ("wq", "wk", "wv", "w_gate", "w_up", "bq", "bk", "bv")  # split the last axis
_TP_IN = ("wo", "w_down")  # split the input axis (second to last)


def base_param_specs(params, mode: str, model: int):
    """PartitionSpec per base parameter (a pytree like `params`; see the module docstring)."""
    if mode not in BASE_SHARDINGS:
        raise ConfigError(f"base_sharding must be one of {', '.join(BASE_SHARDINGS)}, got "
                          f"{mode!r}")

    def spec(path, a):
        keys = [getattr(k, "key", getattr(k, "name", str(k))) for k in path]
        shape = tuple(getattr(a, "shape", ()))
        if model <= 1 or not shape:
            return P()
        name, stacked = keys[-1], "layers" in keys[:-1]
        axis = None
        if mode == "tp":
            if name in _TP_OUT:
                axis = len(shape) - 1
            elif name in _TP_IN and len(shape) >= 2:
                axis = len(shape) - 2
            elif name == "embed":
                axis = 0
            if axis is not None and shape[axis] % model:
                axis = None
        else:
            axes = [i for i in range(int(stacked), len(shape)) if shape[i] % model == 0
                    and shape[i] >= model]
            axis = max(axes, key=lambda i: shape[i], default=None)
        if axis is None:
            return P()
        parts = [None] * len(shape)
        parts[axis] = "model"
        return P(*parts)

    return jax.tree_util.tree_map_with_path(spec, params)


def base_shardings(cfg: TrainConfig, mesh: Mesh, params):
    """NamedSharding per base parameter for this config and mesh (replicated without a
    'model' axis of more than one device)."""
    specs = base_param_specs(params, cfg.base_sharding, int(mesh.shape.get("model", 1)))
    return jax.tree.map(lambda sp: NamedSharding(mesh, sp), specs,
                        is_leaf=lambda x: isinstance(x, P))


def peak_bytes(ma) -> int:
    """What a device holds while a compiled program runs, from its `memory_analysis()`:
    arguments + temporaries + outputs, less the outputs aliased to (donated) arguments."""
    return int(ma.argument_size_in_bytes + ma.temp_size_in_bytes + ma.output_size_in_bytes
               - getattr(ma, "alias_size_in_bytes", 0))


_STEP_CACHE: dict = {}


def compile_train_step(m: Models, mesh: Mesh, base_sharding=None):
    """The jitted step for this config and mesh (cached: a resumed run in the same process, or a
    second run of the same config, reuses the compiled step). base_sharding: the base
    parameters' shardings (`base_shardings`), default replicated."""
    # memory_limit_gib is checked after compiling (training/loop.py) and changes no program
    key = (m.cfg.replace(memory_limit_gib=0.0), m.base_cfg, tuple(d.id for d in mesh.devices.flat),
           mesh.devices.shape)
    if key not in _STEP_CACHE:
        rep = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))

        def step(s, bp, t):
            return train_step(s, bp, t, m)

        _STEP_CACHE[key] = jax.jit(step, donate_argnums=(0,),
                                   in_shardings=(rep, base_sharding or rep, data),
                                   out_shardings=(rep, rep))
    return _STEP_CACHE[key]
