"""How much of a dropped block can ONE freely optimised input vector win back for the frozen base?

An upper bound for any GistNet on a frozen base: per (window, block), optimise a single vector v in
place of the block (Adam on the horizon NLL, directly in embedding space), starting from the
block's last-token embedding. The vector is fitted on the first half of the horizon and scored on
both halves: the second half ("held-out") shows whether what v carries generalises beyond the
tokens it was fitted on. Compared with dropping the block and with the raw block, same windows.

    .venv/bin/python experiments/gist_capacity/probe_free_vector.py --windows 4 --steps 40 \
        --out experiments/gist_capacity/free_vector.json
"""
import argparse, json, time
import numpy as np, jax, jax.numpy as jnp, optax
from mc_jax.base.loading import load_base
from mc_jax.base import base_model as bm
from mc_jax.training import windows as twc
from mc_jax.eval.networks import _validation_windows
from mc_jax.training.forward import packed_logits

ap = argparse.ArgumentParser()
ap.add_argument("--windows", type=int, default=4)
ap.add_argument("--steps", type=int, default=40)
ap.add_argument("--budget", type=int, default=256)
ap.add_argument("--horizon", type=int, default=64)
ap.add_argument("--blocks", default="7,5")
ap.add_argument("--lr", type=float, default=0.1, help="Adam step, in units of the embedding RMS")
ap.add_argument("--out", default=None)
a = ap.parse_args()
m = load_base(None)
p, cfg = m.params, m.cfg
W, H, K = a.budget, a.horizon, 32
N = W // K
blocks = [int(b) for b in a.blocks.split(",")]
pc = twc.PackConfig(seq_blocks=N, budget=W, horizon=H, depth=1, protect_blocks=1, edit_headroom=False)
rms = bm.embedding_rms(p)
wins = _validation_windows(m.tokenizer, W + H, a.windows, 0, None)


def rows(ids):
    emb = bm.embed_tokens(p, jnp.asarray(ids[:W])).reshape(N, K, -1).astype(jnp.float32)
    hor = jnp.asarray(ids[W:])
    return emb, hor, bm.embed_tokens(p, hor).astype(jnp.float32)


embs, hors, hembs = zip(*[rows(ids) for ids in wins])
E, HO, HE = jnp.stack(embs), jnp.stack(hors), jnp.stack(hembs)          # [B,N,K,D] [B,H] [B,H,D]
levels = np.zeros((len(blocks), N), np.int32)
for i, b in enumerate(blocks):
    levels[i, b] = 1
LV = jnp.asarray(levels)


def per_token_nll(v_BxSxD, mode):
    """[B, S, H] horizon NLL; mode gist (v in the block's place), drop, raw."""
    def one(e, he, v, lv):
        if mode == "raw":
            lv = jnp.zeros_like(lv)
        g = jnp.zeros((N, e.shape[-1])).at[jnp.argmax(lv)].set(v)
        x, pos, sig, valid = twc.pack(lv, e, (g,), he, pc)
        if mode == "drop":  # the gist slot becomes padding; positions stay compact over the rest
            gslot = valid & (jnp.cumsum(valid) - 1 == jnp.argmax(lv) * K)
            valid = valid & ~gslot
            pos = jnp.where(valid, jnp.cumsum(valid) - 1, 0).astype(jnp.float32)
        return x, pos, valid
    x, pos, valid = jax.vmap(lambda e, he, vS: jax.vmap(lambda v, lv: one(e, he, v, lv))(vS, LV))(E, HE, v_BxSxD)
    B, S = x.shape[:2]
    lg = packed_logits(p, cfg, x.reshape(B * S, *x.shape[2:]), pos.reshape(B * S, -1),
                       valid.reshape(B * S, -1), W, H)
    tg = jnp.broadcast_to(HO[:, None], (B, S, H)).reshape(B * S, H)
    return bm.token_nll(lg, tg).reshape(B, S, H)


half = H // 2
loss_fn = jax.jit(lambda v: per_token_nll(v, "gist")[..., :half].mean())
grad_fn = jax.jit(jax.value_and_grad(lambda v: per_token_nll(v, "gist")[..., :half].mean()))
eval_fn = jax.jit(lambda v: per_token_nll(v, "gist"))
v0 = jnp.stack([E[:, b, -1] for b in blocks], 1)                      # last-token embedding
zero = jnp.zeros_like(v0)
raw = np.asarray(jax.jit(lambda v: per_token_nll(v, "raw"))(zero))
drop = np.asarray(jax.jit(lambda v: per_token_nll(v, "drop"))(zero))
init = np.asarray(eval_fn(v0))
opt = optax.adam(a.lr * rms)
st = opt.init(v0)
v = v0
t0 = time.time()
for s in range(a.steps):
    l, g = grad_fn(v)
    up, st = opt.update(g, st, v)
    v = optax.apply_updates(v, up)
    print(f"step {s} fit-loss {float(l):.4f} ({time.time() - t0:.0f}s)", flush=True)
fin = np.asarray(eval_fn(v))


def summ(x):
    return {"fit_half": x[..., :half].mean((0, 2)).round(4).tolist(),
            "heldout_half": x[..., half:].mean((0, 2)).round(4).tolist()}


def paired(x, y):
    d = (x - y)[..., half:].mean(-1)                                  # [B, S] held-out half
    return {"mean": float(d.mean()), "sem": float(d.std(ddof=1) / np.sqrt(d.size)),
            "per_block": d.mean(0).round(4).tolist()}


res = {"blocks": blocks, "windows": a.windows, "steps": a.steps, "budget": W, "horizon": H,
       "lr_rms": a.lr, "v_norm_over_rms": float(jnp.sqrt((v ** 2).mean(-1)).mean() / rms),
       "raw": summ(raw), "drop": summ(drop), "last_token": summ(init), "free_vector": summ(fin),
       "heldout_free_minus_drop": paired(fin, drop), "heldout_last_minus_drop": paired(init, drop),
       "heldout_drop_minus_raw": paired(drop, raw), "wall_s": time.time() - t0}
print(json.dumps(res, indent=1))
if a.out:
    json.dump(res, open(a.out, "w"), indent=1)
