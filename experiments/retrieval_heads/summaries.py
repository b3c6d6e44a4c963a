"""What a tree node must keep of its tokens' keys so the question still finds it (issue 19,
item 1): node summaries compared with the per-token score, on the probe's cases (seed 7; no
evaluation case) and the heads `probe.py` ranked best.

    python experiments/retrieval_heads/summaries.py [--cases 6] [--length 4096]

Per head and summary, the share of cases whose top-1 block is a gold block:
- token: softmax attention mass over every stored key, per block (what `retrieve` uses);
- mean: one mean key per block (softmax over blocks);
- quest: per-channel min and max of the block's keys; the block's score is Quest's upper bound
  of q.k, sum_c max(q_c min_c, q_c max_c), softmax over blocks, summed over question tokens;
- rep4: the 4 keys per block that received the most attention (that head, inside their own
  window: InfLLM's representatives), kept unaveraged; attention mass over all stored reps;
- quest_lod2: top-down search, the gold block inside the best LOD2 node (32 blocks) by the
  min/max bound of its children (a parent's min/max bounds every child's), then the best block
  in it by its own bound.
Keys, queries, windows and distances as in `mc_jax.eval.policies.retrieve`.
"""
import argparse
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from mc_jax.base import base_model as bm  # noqa: E402
from mc_jax.base.chat import build_prompt  # noqa: E402
from mc_jax.base.loading import load_base  # noqa: E402
from mc_jax.eval.policies import retrieve as rt  # noqa: E402
from mc_jax.eval.tasks import api as tasks  # noqa: E402
from mc_jax.eval.tasks.assembly import read_haystack  # noqa: E402

K = 32


def window_qk(model, ids, n_layers, prefix, window=rt.WINDOW):
    """Pre-RoPE q [L, T, N, F] and k [L, T, G, F] of the complete blocks, per window."""
    n = len(ids) // K
    P = len(prefix)
    qs, ks = [], []
    for s in range(0, n * K, window):
        chunk = ids[s:min(s + window, n * K)]
        x = np.zeros(P + window, np.int32)
        x[:P], x[P:P + len(chunk)] = prefix, chunk
        valid = np.arange(P + window) < P + len(chunk)
        q, k = rt._window_qk(model.params, model.cfg, jnp.asarray(x[None]),
                             jnp.asarray(valid[None]), n_layers)
        qs.append(np.asarray(q)[:, P:P + len(chunk)])
        ks.append(np.asarray(k)[:, P:P + len(chunk)])
    return np.concatenate(qs, 1), np.concatenate(ks, 1)


def received(qh, kh, cfg, window=rt.WINDOW):
    """Attention each token receives from the later tokens of its own window (one head, RoPE at
    window positions), [T]."""
    T, F = kh.shape
    out = np.zeros(T)
    for s in range(0, T, window):
        e = min(s + window, T)
        pos = jnp.arange(e - s)[None]
        cos, sin = bm.rope_tables(pos, None, F, cfg.rope_base)
        qr = np.asarray(bm.apply_rope(jnp.asarray(qh[s:e])[None, :, None], cos, sin))[0, :, 0]
        kr = np.asarray(bm.apply_rope(jnp.asarray(kh[s:e])[None, :, None], cos, sin))[0, :, 0]
        a = qr @ kr.T / np.sqrt(F)
        a = np.where(np.tril(np.ones((e - s, e - s), bool)), a, -np.inf)
        a = np.exp(a - a.max(-1, keepdims=True))
        a /= a.sum(-1, keepdims=True)
        out[s:e] = a.sum(0)
    return out


def rotate(q, delta, cfg):
    cos, sin = bm.rope_tables(jnp.full((1, q.shape[0]), delta), None, q.shape[-1], cfg.rope_base)
    return np.asarray(bm.apply_rope(jnp.asarray(q)[None, :, None], cos, sin))[0, :, 0]


def softmax_mass(s_TxM, owner_M, n):
    s = s_TxM - s_TxM.max(-1, keepdims=True)
    p = np.exp(s)
    p /= p.sum(-1, keepdims=True)
    return np.bincount(owner_M, weights=p.sum(0), minlength=n)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--out", default=str(Path(__file__).with_name("summaries.json")))
    a = ap.parse_args()
    probe = json.loads(Path(__file__).with_name("probe.json").read_text())
    heads = [tuple(h[:2]) for h in probe["best_token"][:8]]
    L = max(l for l, _ in heads) + 1
    model = load_base()
    cfg, tok = model.cfg, model.tokenizer
    group = cfg.n_heads // cfg.n_kv_heads
    text = read_haystack(ROOT / "experiments/data/python_tutorial.txt")
    specs = [("niah_single", dict(haystack="noise")),
             ("niah_multikey", dict(haystack="prose", text=text)),
             ("passkey", dict(haystack="noise"))]
    prefix = np.asarray(build_prompt(tok, "?", chat=True).head, np.int32)
    kinds = ("token", "mean", "quest", "rep4", "quest_lod2")
    hits = {(h, v): 0 for h in heads for v in kinds}
    n_cases, t0 = 0, time.time()
    for name, opts in specs:
        for i in range(a.cases):
            c = tasks.generate(name, tok, a.length, float(np.linspace(0.1, 0.9, a.cases)[i]),
                               tasks.case_seed(7, i), check_text=False, straddle=bool(i % 2),
                               **opts)
            ids = np.asarray(c.history_ids, np.int32)
            n = len(ids) // K
            qw, kw = window_qk(model, ids, L, prefix)
            pr = build_prompt(tok, c.question.strip(), chat=True)
            q = rt.question_queries(model, ids[:n * K], pr.tail[pr.q_start:pr.q_end], L,
                                    prefix=prefix)
            gold = set(c.gold_blocks)
            for (l, h) in heads:
                g = h // group
                kh = kw[l, :, g]  # [T, F]
                qd = rotate(q[l, :, h], rt.DELTA, cfg)  # [Tq, F]
                F = kh.shape[-1]
                kb = kh.reshape(n, K, F)
                sc = {"token": softmax_mass(qd @ kh.T / np.sqrt(F), np.arange(n * K) // K, n),
                      "mean": softmax_mass(qd @ kb.mean(1).T / np.sqrt(F), np.arange(n), n)}
                lo, hi = kb.min(1), kb.max(1)  # [n, F]
                bound = np.maximum(qd[:, None] * lo[None], qd[:, None] * hi[None]).sum(-1)
                sc["quest"] = softmax_mass(bound / np.sqrt(F), np.arange(n), n)
                rec = received(qw[l, :, h], kh, cfg).reshape(n, K)
                top = np.argsort(-rec, axis=1)[:, :4]
                reps = np.take_along_axis(kb, top[:, :, None], axis=1).reshape(-1, F)
                sc["rep4"] = softmax_mass(qd @ reps.T / np.sqrt(F), np.repeat(np.arange(n), 4), n)
                for v in kinds[:4]:
                    hits[((l, h), v)] += int(np.argmax(sc[v])) in gold
                n2 = -(-n // K)
                lo2 = np.stack([lo[j * K:(j + 1) * K].min(0) for j in range(n2)])
                hi2 = np.stack([hi[j * K:(j + 1) * K].max(0) for j in range(n2)])
                b2 = np.maximum(qd[:, None] * lo2[None], qd[:, None] * hi2[None]).sum(-1)
                best2 = int(np.argmax(softmax_mass(b2 / np.sqrt(F), np.arange(n2), n2)))
                inside = range(best2 * K, min((best2 + 1) * K, n))
                pick = max(inside, key=lambda b: sc["quest"][b])
                hits[((l, h), "quest_lod2")] += pick in gold
            n_cases += 1
            print(f"[summaries] {name} case {i}: {time.time() - t0:.0f}s", flush=True)
    table = {f"{l},{h}": {v: round(hits[((l, h), v)] / n_cases, 3) for v in kinds}
             for (l, h) in heads}
    res = dict(cases=n_cases, length=a.length, heads=heads, top1_share=table,
               seconds=round(time.time() - t0))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
