"""Teach GistNet to write gists the frozen base can read: an autoencoding stage (as ICAE and
xRAG do for a frozen decoder) with GistNet alone trained.

Each example is one 32-token block b of a training window, laid out for the base as

    [last P tokens of block b-1] [gist of block b] [the 32 tokens of block b]

at compact positions 0..P+32 (`gist_objective.gist_recon_nll`, also `--set recon_weight=...` in
`mc-jax train --config experiments/gist_capacity/gist_objective.py:...`); the loss is the base's next-token NLL of block b's tokens, the first one
predicted at the gist slot. Block b's tokens come only after the gist, so the gist is the only way
its content reaches its first tokens. The prefix keeps the gist off position 0, which the base
uses as an attention sink. The hope was a loss without the horizon losses' placeholder optimum;
measured (README), most of what it teaches is still not specific to the block.

Held-out telemetry, on fixed blocks of 8 validation windows: NLL with the right gist; with the
gist of a block of another held-out window (`recon_minus_wrong`, content control: < 0 means the
base reads something of the text from the gist); with another block of the same window
(`..._same_doc`: < 0 means block-specific content); without a gist slot (`recon_minus_none`).
Whole block and first 8 tokens.

    .venv/bin/python experiments/gist_capacity/pretrain_gist_recon.py \
        --init runs/fresh_reader/export --train-reader --var-weight 1.0 --wrong-weight 1.0 \
        --margin 0.1 --steps 300 --out runs/recon_reader/export \
        --metrics experiments/gist_capacity/metrics_recon_reader.jsonl
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

from gist_objective import GistCapacityConfig, gist_recon_nll, gist_variance_floor
from mc_jax.base import base_model as bm
from mc_jax.base.loading import load_base
from mc_jax.data import pipeline as data
from mc_jax.eval.networks import _validation_windows
from mc_jax.training.checkpoints import export_networks
from mc_jax.training.lens_fit import load_models
from mc_jax.training.step import TrainState

ap = argparse.ArgumentParser()
ap.add_argument("--init", required=True, help="exported GistNet + LensNet to start from")
ap.add_argument("--steps", type=int, default=200)
ap.add_argument("--blocks", type=int, default=16, help="blocks per window and step")
ap.add_argument("--windows", type=int, default=1, help="train windows per step (the CPU runs "
                "used 1; on a GPU use many)")
ap.add_argument("--prefix", type=int, default=8, help="tokens of the previous block before the gist")
ap.add_argument("--lr", type=float, default=1e-3)
ap.add_argument("--wrong-weight", type=float, default=0.0,
                help="weight of a hinge asking NLL(right gist) to beat NLL(another block's gist) "
                "by --margin")
ap.add_argument("--margin", type=float, default=0.1)
ap.add_argument("--var-weight", type=float, default=0.0, help="variance floor on the gists")
ap.add_argument("--train-reader", action="store_true",
                help="also train the gist reader (when the GistNet has one)")
ap.add_argument("--eval-every", type=int, default=25)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--out", required=True)
ap.add_argument("--metrics", default=None)
a = ap.parse_args()
T, P = 2048, a.prefix
model = load_base(None)
m, gist_state, lens_state, info = load_models(model, a.init, 1, 1)
K = m.pack.block_size
NB = T // K
tcfg = GistCapacityConfig.from_dict(info["train_config"])
params = jax.lax.stop_gradient(model.params)
src = data.open_split("train", model.tokenizer)
it = data.make_batch_iterator(src, data.WindowConfig(T, a.windows, seed=a.seed))
held_windows = _validation_windows(model.tokenizer, T, 8, 7, None)
rs = np.random.RandomState(1)
held_blocks = jnp.asarray(np.stack([rs.choice(np.arange(1, NB), 8, replace=False) for _ in held_windows]))
held = jnp.asarray(np.stack(held_windows))
is_reader = jax.tree_util.tree_map_with_path(
    lambda kp, _: any(getattr(k, "key", None) == "reader" for k in kp), gist_state)
frozen = jax.tree.map(lambda r: bool(r) and not a.train_reader, is_reader)
opt = optax.chain(optax.clip_by_global_norm(1.0),
                  optax.masked(optax.adam(optax.warmup_cosine_decay_schedule(
                      0.0, a.lr, min(20, a.steps // 10 + 1), a.steps)),
                               jax.tree.map(lambda f: not f, frozen)),
                  optax.masked(optax.set_to_zero(), frozen))
opt_state = opt.init(gist_state)


def block_nll(g, adapter, ids_T, blocks_B, gist_B=None, with_gist=True):
    """[B, K] NLL of each listed block's tokens, laid out as [prefix][gist][block]
    (`gist_objective.gist_recon_nll`), and the gists used."""
    emb = bm.embed_tokens(params, ids_T).astype(jnp.float32).reshape(NB, K, -1)
    if gist_B is None:
        gist_B = g(1, emb[blocks_B])
    nll = gist_recon_nll(params, model.cfg, gist_B, emb[blocks_B - 1, K - P:], emb[blocks_B],
                               ids_T.reshape(NB, K)[blocks_B], adapter, with_gist)
    return nll, gist_B


def loss_fn(state, ids_WxT, blocks_WxB):
    g = nnx.merge(m.gist_graph, state)
    adapter = g.reader_adapter()

    def one(ids_T, blocks_B):
        nll, gists = block_nll(g, adapter, ids_T, blocks_B)
        loss = nll.mean()
        aux = {"recon": loss}
        if a.wrong_weight > 0:
            wrong, _ = block_nll(g, adapter, ids_T, blocks_B, jnp.roll(gists, 1, axis=0))
            hinge = jax.nn.relu(a.margin - (wrong.mean(1) - nll.mean(1))).mean()
            loss = loss + a.wrong_weight * hinge
            aux["recon_minus_wrong"] = nll.mean() - wrong.mean()
        if a.var_weight > 0:
            var, _ = gist_variance_floor(gists, tcfg.gist_var_target, m.gist_cfg.embed_rms)
            loss = loss + a.var_weight * var
        return loss, aux

    loss, aux = jax.vmap(one)(ids_WxT, blocks_WxB)
    return loss.mean(), jax.tree.map(jnp.mean, aux)


@jax.jit
def step(state, o, ids_WxT, blocks_WxB):
    (loss, aux), gr = jax.value_and_grad(loss_fn, has_aux=True)(state, ids_WxT, blocks_WxB)
    u, o = opt.update(gr, o, state)
    return optax.apply_updates(state, u), o, loss, aux


@jax.jit
def heldout(state):
    g = nnx.merge(m.gist_graph, state)
    adapter = g.reader_adapter()

    def one(ids_T, blocks_B):
        right, gists = block_nll(g, adapter, ids_T, blocks_B)
        # another block's gist, from another held-out window: same distribution, other text
        wrong, _ = block_nll(g, adapter, ids_T, blocks_B, jnp.roll(gists, 1, axis=0))
        none, _ = block_nll(g, adapter, ids_T, blocks_B, with_gist=False)
        return right, wrong, none, gists

    right, wrong, none, gists = jax.vmap(one)(held, held_blocks)
    # the wrong gist: roll across windows (blocks of other documents)
    wrong2, _ = jax.vmap(lambda ids, bl, gs: block_nll(g, adapter, ids, bl, gs))(
        held, held_blocks, jnp.roll(gists, 1, axis=0))
    _, spread = gist_variance_floor(gists.reshape(-1, gists.shape[-1]),
                                    tcfg.gist_var_target, m.gist_cfg.embed_rms)
    out = {"recon": right.mean(), "recon_first8": right[..., :8].mean(),
           "recon_minus_wrong": right.mean() - wrong2.mean(),
           "recon_minus_wrong_same_doc": right.mean() - wrong.mean(),
           "recon_minus_none": right.mean() - none.mean(),
           "first8_minus_wrong": right[..., :8].mean() - wrong2[..., :8].mean(),
           "first8_minus_none": right[..., :8].mean() - none[..., :8].mean(),
           "gist_std": spread}
    d = (right.mean(-1) - wrong2.mean(-1)).reshape(-1)
    out["recon_minus_wrong_se"] = d.std() / jnp.sqrt(d.shape[0])
    return out


log = open(a.metrics, "w") if a.metrics else None
key = jax.random.PRNGKey(a.seed)
t0 = time.time()
hrow = {}
for i in tqdm(range(a.steps + 1), desc="gist recon pretrain"):
    if i % a.eval_every == 0 or i == a.steps:
        hrow = {f"heldout_{k}": round(float(v), 5) for k, v in heldout(gist_state).items()}
        row = dict(step=i, **hrow, seconds=round(time.time() - t0, 1))
        tqdm.write(json.dumps(row))
        if log:
            log.write(json.dumps(row) + "\n")
            log.flush()
    if i == a.steps:
        break
    key, k = jax.random.split(key)
    # one window: the draws of the committed runs (made before --windows existed)
    keys = k[None] if a.windows == 1 else jax.random.split(k, a.windows)
    blocks = jax.vmap(lambda kk: jax.random.choice(kk, jnp.arange(1, NB), (a.blocks,),
                                                   replace=False))(keys)
    ids = jnp.asarray(next(it)["tokens"])
    gist_state, opt_state, loss, aux = step(gist_state, opt_state, ids, blocks)
    if log:
        log.write(json.dumps(dict(step=i + 1, loss=float(loss),
                                  **{k: float(v) for k, v in aux.items()},
                                  seconds=round(time.time() - t0, 1))) + "\n")
        log.flush()
    if not np.isfinite(float(loss)):
        raise SystemExit(f"non-finite loss at step {i + 1}; nothing exported")

meta = {k: v for k, v in info.items() if k not in ("train_config", "gist_config", "lens_config",
                                                    "dtype")}
meta["gist_recon_pretrain"] = dict(vars(a), **hrow)
m_orig = dataclasses.replace(m, cfg=tcfg)
export_networks(Path(a.out), m_orig, TrainState(
    step=jnp.int32(0), gist=gist_state, lens=lens_state, opt=None, key=None), meta)
print(json.dumps({"out": a.out, **meta["gist_recon_pretrain"]}))
