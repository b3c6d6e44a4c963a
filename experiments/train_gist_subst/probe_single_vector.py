"""Which one-vector stand-in for a block hurts the horizon least? (forward only, SmolLM2)"""
import sys, numpy as np, jax, jax.numpy as jnp
from mc_jax.base.loading import load_base
from mc_jax.base import base_model as bm
from mc_jax.training import windows as twc
from mc_jax.eval.networks import _validation_windows, raw_nll, _packed_nll
m = load_base(None)
p, cfg = m.params, m.cfg
H, Wt = 64, 512
wins = _validation_windows(m.tokenizer, Wt + H, 8, 0, None)
blocks = [10, 12, 13, 14]
N, K = Wt // 32, 32
pc = twc.PackConfig(seq_blocks=N, budget=Wt, horizon=H, depth=1, protect_blocks=1, edit_headroom=False)
E = p["embed"].astype(jnp.float32)
res = {k: [] for k in ["drop", "mean", "last", "first", "surprise", "max_norm_dev"]}
for ids in wins:
    r = raw_nll(p, cfg, ids, H)
    emb = bm.embed_tokens(p, jnp.asarray(ids[:Wt])).reshape(N, K, -1).astype(jnp.float32)
    hor = jnp.asarray(ids[Wt:]); hor_emb = bm.embed_tokens(p, hor).astype(jnp.float32)
    # per-token surprise in context (the base's own NLL), for picking a salient token
    lg = bm.logits_fn(p, cfg, jnp.asarray(ids[:Wt])[None])[0]
    tok_nll = np.asarray(bm.token_nll(lg[:-1][None], jnp.asarray(ids[1:Wt])[None])[0])
    tok_nll = np.concatenate([[0.0], tok_nll]).reshape(N, K)
    mu = E.mean(0)
    dev = np.asarray(jnp.linalg.norm(emb - mu, axis=-1))
    cands = {"mean": emb.mean(1), "last": emb[:, -1], "first": emb[:, 0],
             "surprise": emb[jnp.arange(N), jnp.asarray(tok_nll.argmax(1))],
             "max_norm_dev": emb[jnp.arange(N), jnp.asarray(dev.argmax(1))]}
    for name, g1 in cands.items():
        levels = np.zeros((len(blocks), N), np.int32)
        for i, b in enumerate(blocks):
            levels[i, b] = 1
        x, pos, _, valid = jax.vmap(lambda lv: twc.pack(lv, emb, (g1,), hor_emb, pc))(jnp.asarray(levels))
        n = np.asarray(_packed_nll(p, cfg, x, pos, valid, jnp.broadcast_to(hor, (len(blocks), H)), Wt))
        res[name].append(n - r)
    # drop: via substitution_nll
    from mc_jax.eval.networks import substitution_nll
    d = substitution_nll(p, cfg, lambda lv, x: x.mean(-2), ids, level=1, blocks=blocks, horizon=H, drop=True)
    res["drop"].append(d - r)
    print({k: np.round(np.mean(v, 0), 4).tolist() for k, v in res.items() if v}, flush=True)
for k, v in res.items():
    v = np.array(v); dd = v - np.array(res["drop"])
    print(f"{k:14s} mean {v.mean():+.4f}  minus drop {dd.mean():+.4f} ± {dd.std(ddof=1)/np.sqrt(dd.size):.4f}  per block {np.round(v.mean(0),4).tolist()}")
