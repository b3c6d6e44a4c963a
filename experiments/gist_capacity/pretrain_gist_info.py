"""Put block content back into a GistNet's gists, cheaply: GistNet alone (no base forward) trained
on `gist_objective.gist_info_nce` (each LOD1 gist has to pick out its block's mean token embedding
among the sequence's blocks), optionally with the training's variance floor, on the train split.
The gist reader and LensNet are kept as they are. Stage 1 of a two-stage recipe; stage 2 is
`mc-jax train --config experiments/gist_capacity/gist_objective.py:cpu_small:reader
--set init_from=OUT --set gist_info_weight=...`.

    .venv/bin/python experiments/gist_capacity/pretrain_gist_info.py \
        --init runs/reader_near/export --steps 600 --out runs/info_pre/export \
        --metrics experiments/gist_capacity/metrics_info_pretrain.jsonl
"""
import argparse
import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from tqdm import tqdm

from gist_objective import GistCapacityConfig, gist_info_nce, gist_variance_floor
from mc_jax.base import base_model as bm
from mc_jax.base.loading import load_base
from mc_jax.data import pipeline as data
from mc_jax.eval.networks import _validation_windows
from mc_jax.training.checkpoints import export_networks
from mc_jax.training.lens_fit import load_models
from mc_jax.training.step import TrainState

ap = argparse.ArgumentParser()
ap.add_argument("--init", required=True, help="exported GistNet + LensNet to start from")
ap.add_argument("--steps", type=int, default=600)
ap.add_argument("--batch", type=int, default=4, help="2048-token windows per step")
ap.add_argument("--lr", type=float, default=3e-3)
ap.add_argument("--temp", type=float, default=0.1)
ap.add_argument("--var-weight", type=float, default=0.0,
                help="variance floor on the gists (as `gist_var_weight` in training). InfoNCE is "
                "scale-free: without the floor the gists' spread shrinks to ~0.001 of the "
                "embedding RMS; with it at 1.0 InfoNCE did not learn in 175 steps (README)")
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
ap.add_argument("--metrics", default=None)
a = ap.parse_args()
T = 2048
model = load_base(None)
m, gist_state, lens_state, info = load_models(model, a.init, 1, 1)
K = m.pack.block_size
tcfg = GistCapacityConfig.from_dict(info["train_config"])
src = data.open_split("train", model.tokenizer)
it = data.make_batch_iterator(src, data.WindowConfig(T, a.batch, seed=a.seed))
held = [jnp.asarray(w) for w in _validation_windows(model.tokenizer, T, 8, 7, None)]
is_reader = jax.tree_util.tree_map_with_path(
    lambda kp, _: any(getattr(k, "key", None) == "reader" for k in kp), gist_state)
opt = optax.chain(optax.clip_by_global_norm(1.0),
                  optax.masked(optax.adam(optax.cosine_decay_schedule(a.lr, a.steps)),
                               jax.tree.map(lambda r: not r, is_reader)),
                  optax.masked(optax.set_to_zero(), is_reader))
opt_state = opt.init(gist_state)


def info_loss(state, ids_BxT):
    g = nnx.merge(m.gist_graph, state)

    def one(ids):
        e = bm.embed_tokens(model.params, ids).astype(jnp.float32).reshape(T // K, K, -1)
        g1 = g(1, e)
        info, top1 = gist_info_nce(g1, e.mean(1), a.temp)
        var, spread = gist_variance_floor(g1, tcfg.gist_var_target, m.gist_cfg.embed_rms)
        return info + a.var_weight * var, top1, spread

    loss, top1, spread = jax.vmap(one)(ids_BxT)
    return loss.mean(), (top1.mean(), spread.mean())


@jax.jit
def step(state, o, ids):
    (loss, (top1, _)), gr = jax.value_and_grad(info_loss, has_aux=True)(state, ids)
    u, o = opt.update(gr, o, state)
    return optax.apply_updates(state, u), o, loss, top1


heldout = jax.jit(lambda s: info_loss(s, jnp.stack(held)))
log = open(a.metrics, "w") if a.metrics else None
t0 = time.time()
for i in tqdm(range(a.steps), desc="gist info pretrain"):
    gist_state, opt_state, loss, top1 = step(gist_state, opt_state,
                                             jnp.asarray(next(it)["tokens"]))
    if i % 25 == 0 or i == a.steps - 1:
        hl, (ht, hs) = heldout(gist_state)
        row = dict(step=i + 1, loss=float(loss), top1=float(top1), heldout_loss=float(hl),
                   heldout_top1=float(ht), heldout_gist_std=float(hs),
                   seconds=round(time.time() - t0, 1))
        tqdm.write(json.dumps(row))
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
meta = {k: v for k, v in info.items() if k not in ("train_config", "gist_config", "lens_config",
                                                    "dtype")}
meta["gist_info_pretrain"] = dict(vars(a), heldout_loss=float(hl), heldout_top1=float(ht),
                                  heldout_gist_std=float(hs))
m_orig = dataclasses.replace(m, cfg=tcfg)
export_networks(Path(a.out), m_orig, TrainState(
    step=jnp.int32(0), gist=gist_state, lens=lens_state, opt=None, key=None), meta)
print(json.dumps({"out": a.out, **meta["gist_info_pretrain"]}))
