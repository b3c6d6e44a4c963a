"""Do the LOD1 gists still hold their block's content, whatever the base makes of them?

A linear read-out probe, no base forward: gists of the blocks of held-out validation windows are
mapped by ridge regression (fitted on half of the windows, scored on the other half) to two
summaries of the block: the mean of its token embeddings and the mean of its last 8 tokens'
embeddings (what the next tokens depend on most). The ridge penalty is chosen on a split of the
training half. Scored
by R^2 and by retrieval: is the block whose true summary is nearest (cosine) to the prediction
the right one, among all held-out blocks? High figures mean the content is in the gist and the
bottleneck is the base reading it; low ones mean GistNet dropped it.

    .venv/bin/python experiments/gist_capacity/probe_gist_content.py --docs 16 \
        --checkpoint shipped --checkpoint runs/reader_r8/export \
        --out experiments/gist_capacity/gist_content_probe.json
"""
import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.eval.networks import _gist_variants, _validation_windows
from mc_jax.nets.io import default_checkpoint
from mc_jax.base.loading import load_base
from mc_jax.nets.io import load_networks

ap = argparse.ArgumentParser()
ap.add_argument("--docs", type=int, default=32)
ap.add_argument("--window", type=int, default=2048)
ap.add_argument("--checkpoint", action="append", default=None,
                help="export directory, or 'shipped' (repeatable)")
ap.add_argument("--out", default=None)
a = ap.parse_args()
K = 32
m = load_base(None)
wins = _validation_windows(m.tokenizer, a.window, a.docs, 3, None)
emb = [np.asarray(bm.embed_tokens(m.params, jnp.asarray(w)).astype(jnp.float32))
       .reshape(-1, K, m.cfg.d_model) for w in wins]
targets = {"mean_embedding": np.concatenate([e.mean(1) for e in emb]),
           "last_8_tokens": np.concatenate([e[:, -8:].mean(1) for e in emb])}
n_blocks = emb[0].shape[0]
half = a.docs // 2 * n_blocks  # train on the first half of the windows, score on the rest


RIDGES = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def _fit(X, Y, lam):
    """Ridge map X -> Y (lam relative to the sample count; X standardised by the caller)."""
    ym = Y.mean(0)
    Wt = np.linalg.solve(X.T @ X + lam * len(X) * np.eye(X.shape[1]), X.T @ (Y - ym))
    return lambda Z: Z @ Wt + ym


def _r2(Y, pred):
    return float(1 - ((Y - pred) ** 2).sum() / ((Y - Y.mean(0)) ** 2).sum())


def probe(feats):
    Xtr, Xte = feats[:half], feats[half:]
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    out = {}
    for name, Y in targets.items():
        Ytr, Yte = Y[:half], Y[half:]
        q = half * 3 // 4  # ridge chosen on the last quarter of the training half
        lam = max(RIDGES, key=lambda r: _r2(Ytr[q:], _fit(Xtr[:q], Ytr[:q], r)(Xtr[q:])))
        pred = _fit(Xtr, Ytr, lam)(Xte)
        r2 = _r2(Yte, pred)
        pn = pred / np.linalg.norm(pred, axis=1, keepdims=True)
        tn = Yte / np.linalg.norm(Yte, axis=1, keepdims=True)
        hit = (np.argmax(pn @ tn.T, axis=1) == np.arange(len(Yte))).mean()
        out[name] = {"r2": float(r2), "retrieval_top1": float(hit), "ridge": lam}
    return out


res = {"docs": a.docs, "window": a.window, "train_blocks": half,
       "test_blocks": len(targets["last_8_tokens"]) - half, "chance_top1": 1 / (len(
           targets["last_8_tokens"]) - half), "probes": {}}
# reference rows: the summaries themselves as features (an upper bound) and the raw block
res["probes"]["block mean embedding itself"] = probe(targets["mean_embedding"])
for ck in a.checkpoint or ["shipped"]:
    path = default_checkpoint() if ck == "shipped" else ck
    gist, _, info = load_networks(path, m.cfg)
    variants = _gist_variants(gist)
    for k in ("gistnet", "untrained", "meanpool"):
        if k in res["probes"]:  # the baselines are the same for every checkpoint
            continue
        g = variants[k]
        f = jax.jit(lambda x, g=g: g(1, x))
        feats = np.concatenate([np.asarray(f(jnp.asarray(e))) for e in emb])
        label = f"{ck} ({info.get('steps')} steps)" if k == "gistnet" else k
        res["probes"][label] = probe(feats)
        print(label, json.dumps(res["probes"][label]), flush=True)
if a.out:
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=2)
print(json.dumps(res))
