"""Which heads of the frozen SmolLM2 find the gold block from the question, under the runtime's
conditions (keys from separate 512-token windows, kept before RoPE; the question's queries in
their own window, rotated to one fixed distance)? Picks `retrieve`'s heads
(`mc_jax.eval.policies.retrieve.HEADS`).

    python experiments/retrieval_heads/probe.py [--cases 6] [--length 4096] [--layers 25]

Cases: RULER-lite niah_single (noise), niah_multikey (3 distractors) and passkey, with seed 7
and the Python tutorial as the prose haystack: the RULER evaluation uses seed 0 and Genesis, so
no probe case is an evaluation case. The same functions as the policy compute keys, queries and
scores. Per head: the share of cases whose top-1 block is a gold block, and recall@4; also for a
mean-key summary per block (one key per block and head: the mean of its tokens' keys, softmax
over blocks), the summary a tree node could store (issue 19, item 1).
Rule (fixed before the run): `retrieve` uses the 3 heads with the highest top-1 share of the
per-token score (ties: higher mean recall@4, then lower layer).
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

from mc_jax.base.chat import build_prompt  # noqa: E402
from mc_jax.base.loading import load_base  # noqa: E402
from mc_jax.eval.evaluators.ruler import recall_at  # noqa: E402
from mc_jax.eval.policies import retrieve as rt  # noqa: E402
from mc_jax.eval.tasks import api as tasks  # noqa: E402
from mc_jax.eval.tasks.assembly import read_haystack  # noqa: E402


def mean_key_scores(q, k, cfg, delta):
    """[L, N, n]: softmax over blocks of q(delta) . mean key, summed over question tokens."""
    L, Tq, N, F = q.shape
    kbar = k.mean(axis=2)  # [L, n, G, F]
    cos, sin = rt.bm.rope_tables(jnp.full((1, Tq), delta), None, F, cfg.rope_base)
    out = np.zeros((L, N, kbar.shape[1]))
    group = cfg.n_heads // cfg.n_kv_heads
    for l in range(L):
        qd = np.asarray(rt.bm.apply_rope(jnp.asarray(q[l])[None], cos, sin)[0])  # [Tq, N, F]
        for h in range(N):
            s = qd[:, h] @ kbar[l, :, h // group].T / np.sqrt(F)  # [Tq, n]
            s = s - s.max(-1, keepdims=True)
            p = np.exp(s)
            out[l, h] = (p / p.sum(-1, keepdims=True)).sum(0)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cases", type=int, default=6)
    ap.add_argument("--length", type=int, default=4096)
    ap.add_argument("--layers", type=int, default=25)
    ap.add_argument("--out", default=str(Path(__file__).with_name("probe.json")))
    a = ap.parse_args()
    model = load_base()
    cfg, tok = model.cfg, model.tokenizer
    text = read_haystack(ROOT / "experiments/data/python_tutorial.txt")
    specs = [("niah_single", dict(haystack="noise")),
             ("niah_multikey", dict(haystack="prose", text=text)),
             ("passkey", dict(haystack="noise"))]
    prefix = build_prompt(tok, "?", chat=True).head
    L, N = a.layers, cfg.n_heads
    heads = [(l, h) for l in range(L) for h in range(N)]
    top1 = {v: np.zeros((L, N)) for v in ("token", "mean")}
    rec4 = {v: np.zeros((L, N)) for v in ("token", "mean")}
    rows, n_cases, t0 = [], 0, time.time()
    for name, opts in specs:
        for i in range(a.cases):
            c = tasks.generate(name, tok, a.length, float(np.linspace(0.1, 0.9, a.cases)[i]),
                               tasks.case_seed(7, i), check_text=False, straddle=bool(i % 2),
                               **opts)
            ids = c.history_ids
            k = rt.history_keys(model, ids, L, prefix=prefix)
            qids = build_prompt(tok, c.question.strip(), chat=True)
            qids = qids.tail[qids.q_start:qids.q_end]
            q = rt.question_queries(model, ids[:len(ids) // 32 * 32], qids, L, prefix=prefix)
            tok_sc = rt.head_scores(q, k, heads, cfg).reshape(L, N, -1)
            mean_sc = mean_key_scores(q, k, cfg, rt.DELTA)
            for v, sc in (("token", tok_sc), ("mean", mean_sc)):
                for l in range(L):
                    for h in range(N):
                        top1[v][l, h] += int(np.argmax(sc[l, h])) in c.gold_blocks
                        rec4[v][l, h] += recall_at(sc[l, h], c.gold_blocks, 4)
            n_cases += 1
            print(f"[probe] {name} case {i}: gold {c.gold_blocks}, {time.time() - t0:.0f}s",
                  flush=True)
            rows.append(dict(task=name, case=i, gold=c.gold_blocks, n_blocks=len(ids) // 32))
    share = {v: top1[v] / n_cases for v in top1}
    r4 = {v: rec4[v] / n_cases for v in rec4}
    order = sorted(heads, key=lambda lh: (-share["token"][lh], -r4["token"][lh], lh[0]))
    chosen = order[:3]
    res = dict(cases=n_cases, length=a.length, layers=L, chosen=chosen,
               best_token=[(l, h, round(float(share["token"][l, h]), 3),
                            round(float(r4["token"][l, h]), 3)) for l, h in order[:15]],
               best_mean=[(l, h, round(float(share["mean"][l, h]), 3),
                           round(float(r4["mean"][l, h]), 3))
                          for l, h in sorted(heads, key=lambda lh: (-share["mean"][lh],
                                                                    -r4["mean"][lh]))[:15]],
               heads_at_100_token=int((share["token"] == 1).sum()),
               heads_at_100_mean=int((share["mean"] == 1).sum()),
               per_layer_top1_token=[round(float(x), 3) for x in share["token"].mean(1)],
               cases_detail=rows, seconds=round(time.time() - t0))
    Path(a.out).write_text(json.dumps(res, indent=1))
    print(json.dumps({k: v for k, v in res.items() if k != "cases_detail"}, indent=1))


if __name__ == "__main__":
    main()
