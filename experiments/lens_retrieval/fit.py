"""Fit the question-aware LensNet on the train split's free labels and judge it on held-out cases
(issue 19, items 2 and 4). Reads the features of experiments/lens_retrieval/features.py.

    python experiments/lens_retrieval/fit.py --name fit1 --train train --eval eval
    python experiments/lens_retrieval/fit.py --name fit2 --train train2 --eval eval eval2
    python experiments/lens_retrieval/fit.py --name fit2 --eval eval eval2 --no-fit  # from the asset

Each writes experiments/lens_retrieval/<name>/ and the asset mc_jax/assets/cpu_small_q (the
shipped one is fit2's; see README.md for why there are two).

Rules, fixed before the first fit:
- dev = the train-split cases whose index is 5 mod 6 (16 of 96); fitted on the other 80;
- loss per case: listwise softmax cross-entropy over its blocks (logits 10 u) against the
  uniform distribution on its gold blocks, plus the mean binary cross-entropy of (u + 1) / 2
  against gold (u > 0 means "expand": gold blocks);
- 600 AdamW steps, batch 8, lr 1e-3 (warmup-cosine), seed 0; the parameters kept are those of
  the evaluation (every 50 steps) with the highest dev recall@1, ties to the lower dev loss;
- the eval split (cpu_ruler:quick's cases, niah_single / niah_multikey / passkey at 2k and 8k,
  haystacks, keys, values and the passkey family never seen in fitting) is scored once, after the
  fit, for lensq, retrieve (summed head mass) and bm25: recall@1 and recall@4 (ties against gold,
  `ruler.recall_at`), with 95% Wilson intervals on the cases whose gold blocks are all in the
  top k.

Writes experiments/lens_retrieval/{metrics.jsonl, results.json, results.md} and the asset.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STEPS, BATCH, LR, EVAL_EVERY, SEED = 600, 8, 1e-3, 50, 0
E_TRAIN = 128


TRAIN = "train"


def load(split: str) -> list[tuple[str, dict]]:
    out = []
    for p in sorted((HERE / "cache" / split).glob("*.npz")):
        if p.name.endswith(".tmp.npz"):
            continue
        z = np.load(p)
        out.append((p.stem, {k: z[k] for k in z.files}))
    return out


def labels(feat, E):
    g = np.zeros(E, np.float32)
    g[np.asarray(feat["gold"], np.int64)] = 1.0
    return g


def stack(items, E):
    import jax
    import jax.numpy as jnp

    from mc_jax.eval.policies.lensq import inputs_from_features

    fs = [inputs_from_features(f, E) for _, f in items]
    return (jax.tree.map(lambda *a: jnp.stack(a), *fs),
            jnp.asarray(np.stack([labels(f, E) for _, f in items])))


def loss_fn(u_BxE, mask_BxE, gold_BxE):
    import jax
    import jax.numpy as jnp

    logits = jnp.where(mask_BxE, 10.0 * u_BxE, -1e9)
    tgt = gold_BxE / jnp.maximum(gold_BxE.sum(-1, keepdims=True), 1.0)
    ce = -(tgt * jax.nn.log_softmax(logits, axis=-1)).sum(-1)
    p = jnp.clip((u_BxE + 1.0) / 2.0, 1e-6, 1 - 1e-6)
    bce = -(gold_BxE * jnp.log(p) + (1 - gold_BxE) * jnp.log(1 - p))
    bce = (bce * mask_BxE).sum(-1) / jnp.maximum(mask_BxE.sum(-1), 1)
    return jnp.mean(ce + bce)


def recall_rows(scores: dict, feat) -> dict:
    from mc_jax.eval.evaluators.ruler import recall_at

    from mc_jax.eval.policies.retrieve import with_neighbours

    gold = [int(g) for g in feat["gold"]]
    out = {f"{name}@{k}": recall_at(s, gold, k) for name, s in scores.items() for k in (1, 4)}
    for name, s in scores.items():  # what the policy keeps raw: the best block and neighbours
        kept = with_neighbours([int(b) for b in np.argsort(-np.asarray(s), kind="stable")], 1,
                               len(s))
        out[f"{name}@kept"] = float(np.mean([g in kept for g in gold]))
    return out


def fit():
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from mc_jax.eval.policies.lensq import n_match
    from mc_jax.eval.policies.retrieve import HEADS
    from mc_jax.nets.lensnet import LensNet, LensNetConfig

    data = load(TRAIN)
    if len(data) < 24:
        raise SystemExit(f"only {len(data)} train cases cached; run features.py train 96 first")
    dev = [d for d in data if int(d[0][:4]) % 6 == 5]
    tr = [d for d in data if int(d[0][:4]) % 6 != 5]
    cfg = LensNetConfig.small(d_model=int(tr[0][1]["gists"].shape[1]), n_match=n_match(len(HEADS)),
                              query=True, max_level=2)
    from mc_jax.core import lens_features as lf

    graph, state = nnx.split(LensNet(cfg, rngs=nnx.Rngs(SEED)))
    sched = optax.warmup_cosine_decay_schedule(0.0, LR, STEPS // 20, STEPS)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(sched, weight_decay=0.01))
    opt = tx.init(state)

    def batch_loss(st, f, gold):
        return loss_fn(lf.score(nnx.merge(graph, st), f).u, f.mask_xE, gold)

    @jax.jit
    def step(st, opt, f, gold):
        loss, g = jax.value_and_grad(batch_loss)(st, f, gold)
        upd, opt = tx.update(g, opt, st)
        return optax.apply_updates(st, upd), opt, loss

    @jax.jit
    def dev_scores(st, f, gold):
        u = lf.score(nnx.merge(graph, st), f).u
        return u, loss_fn(u, f.mask_xE, gold)

    fdev, gdev = stack(dev, E_TRAIN)
    rng = np.random.default_rng(SEED)
    best, best_state, log = (-1.0, np.inf), None, []
    mpath = OUT / "metrics.jsonl"
    mf = mpath.open("w")
    t0 = time.perf_counter()
    for it in range(1, STEPS + 1):
        idx = rng.choice(len(tr), BATCH, replace=False)
        f, g = stack([tr[i] for i in idx], E_TRAIN)
        state, opt, loss = step(state, opt, f, g)
        loss = float(loss)
        if it % EVAL_EVERY == 0 or it == STEPS:
            u, dl = dev_scores(state, fdev, gdev)
            u = np.asarray(u)
            r1 = float(np.mean([recall_rows({"l": u[i, :len(d[1]["gists"])]}, d[1])["l@1"] > 0
                                for i, d in enumerate(dev)]))
            row = dict(step=it, loss=loss, dev_loss=float(dl), dev_recall1_any=r1,
                       seconds=round(time.perf_counter() - t0, 1))
            mf.write(json.dumps(row) + "\n")
            mf.flush()
            print(row, flush=True)
            if (r1, -float(dl)) > (best[0], -best[1]):
                best = (r1, float(dl))
                best_state = jax.tree.map(lambda a: np.asarray(a), state)
    mf.close()
    model = nnx.merge(graph, jax.tree.map(jnp.asarray, best_state))
    return model, cfg, dict(steps=STEPS, batch=BATCH, lr=LR, train_cases=len(tr),
                            dev_cases=len(dev), best_dev_recall1_any=best[0],
                            best_dev_loss=best[1])


def save(model, cfg, fit_info):
    from flax import nnx

    from mc_jax.base import loading
    from mc_jax.eval.policies.lensq import ASSET
    from mc_jax.eval.policies.retrieve import HEADS
    from mc_jax.nets.io import default_checkpoint, load_networks, save_networks

    base = loading.load_base(None)
    gist, _, info = load_networks(default_checkpoint(), base.cfg)
    meta = {k: v for k, v in info.items() if k not in ("gist_config", "lens_config", "dtype",
                                                       "checksum_sha256")}
    meta["lensq"] = dict(heads=[list(h) for h in HEADS], fit=fit_info,
                         command=" ".join(["python"] + sys.argv),
                         gist_from=str(default_checkpoint().relative_to(ROOT)))
    save_networks(ASSET, nnx.state(gist, nnx.Param), nnx.state(model, nnx.Param), gist.config,
                  cfg, meta, dtype="bfloat16")
    print("wrote", ASSET)


def evaluate(splits):
    from mc_jax.eval.policies.lensq import ASSET, inputs_from_features, lens_scores
    from mc_jax.nets.io import load_networks
    from mc_jax.stats import wilson_interval

    _, lens, _ = load_networks(ASSET)
    rows = []
    for name, f in [x for sp in splits for x in load(sp)]:
        n = len(f["gists"])
        u = np.asarray(lens_scores(lens, inputs_from_features(f)))[:n]
        task, L, case = name.rsplit("_", 2)
        r = recall_rows({"lensq": u, "retrieve": f["mass"].sum(0), "bm25": f["bm25"]}, f)
        rows.append(dict(case=name, task=task, length=int(L), **r))
    out = {}
    for task in sorted({r["task"] for r in rows}):
        for L in sorted({r["length"] for r in rows}):
            sel = [r for r in rows if r["task"] == task and r["length"] == L]
            if not sel:
                continue
            cell = {}
            for key in sel[0]:
                if "@" in key:
                    v = np.array([r[key] for r in sel])
                    hits = int(np.sum(v >= 1.0))
                    lo, hi = wilson_interval(hits, len(v))
                    cell[key] = dict(mean=float(v.mean()), all_gold=hits, n=len(v), lo=lo, hi=hi)
            out[f"{task}/{L}"] = cell
    tag = "_".join(splits)
    (OUT / f"results_{tag}.json").write_text(json.dumps(dict(cells=out, rows=rows), indent=1))
    ks = (1, 4, "kept")
    lines = ["| task / history | " + " | ".join(f"{p} {k}" for p in ("lensq", "retrieve", "bm25")
                                                 for k in ks) + " |",
             "|---|" + "---|" * 9]
    for cell, c in out.items():
        lines.append(f"| {cell} | " + " | ".join(
            f"{c[f'{p}@{k}']['mean']:.2f} ({c[f'{p}@{k}']['all_gold']}/{c[f'{p}@{k}']['n']})"
            for p in ("lensq", "retrieve", "bm25") for k in ks) + " |")
    tot = {}
    for p in ("lensq", "retrieve", "bm25"):
        for k in ks:
            v = [r[f"{p}@{k}"] for r in rows]
            hits = int(np.sum(np.asarray(v) >= 1.0))
            lo, hi = wilson_interval(hits, len(v))
            tot[f"{p}@{k}"] = f"{np.mean(v):.2f} ({hits}/{len(v)}, [{lo:.2f}, {hi:.2f}])"
    lines.append("| all | " + " | ".join(tot[f"{p}@{k}"] for p in ("lensq", "retrieve", "bm25")
                                         for k in ks) + " |")
    (OUT / f"results_{tag}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    import argparse

    sys.path.insert(0, str(ROOT))
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", required=True)
    ap.add_argument("--train", default="train")
    ap.add_argument("--eval", nargs="+", default=["eval"])
    ap.add_argument("--no-fit", action="store_true")
    a = ap.parse_args()
    TRAIN, OUT = a.train, HERE / a.name
    OUT.mkdir(exist_ok=True)
    if not a.no_fit:
        m, c, info = fit()
        save(m, c, info)
    for sp in a.eval:
        evaluate([sp])
