"""`ppl`: long-document perplexity by teacher-forced streaming, and the fraction of the
truncate -> full gap each policy closes (one row per policy x budget x document)."""

from __future__ import annotations

import math
import time

import numpy as np

from mc_jax.errors import ConfigError, InputError
from mc_jax.eval.evaluators.registry import (Evaluator, grid_item, is_ok, md_table, policy_order,
                                             pyplot, register_evaluator, short_status)
from mc_jax.eval.policies.registry import K


def scored_blocks(n_tokens: int, score_from: int, n: int | None) -> list[int]:
    """`n` blocks spread evenly over the blocks that start at or after token `score_from`
    (all of them when n is None)."""
    first, last = max(1, -(-score_from // K)), n_tokens // K - 1
    if last < first:
        raise InputError(f"a document of {n_tokens} tokens has no complete block after token "
                         f"{score_from}; use longer documents or a smaller score_from")
    allb = list(range(first, last + 1))
    if n is None or n >= len(allb):
        return allb
    return sorted({allb[int(round(i))] for i in np.linspace(0, len(allb) - 1, n)})


@register_evaluator("ppl")
class PerplexityEvaluator(Evaluator):
    """Long-document perplexity by teacher-forced streaming in K-token blocks.

    Grid: policies x budgets x docs. Scored blocks: `blocks_per_doc` blocks spread evenly over the
    blocks whose history is at least `score_from` tokens (default W: before that every policy sees
    the whole history), the same blocks for every policy. Gap closed is computed on log-perplexity
    (mean NLL): (nll_truncate - nll_policy) / (nll_truncate - nll_full), over the docs where full
    context applies.
    """

    title = f"Long-document perplexity (teacher-forced streaming, {K}-token blocks)"

    def items(self, ecfg, ctx):
        out = []
        for W in ecfg["budgets"]:
            for doc in ecfg["docs"]:
                for p in ecfg["policies"]:
                    out.append(grid_item(ecfg, ctx, dict(
                        policy=p, W=int(W), doc=doc["name"], tokens=int(doc["tokens"]),
                        score_from=int(ecfg.get("score_from") or W),
                        blocks_per_doc=ecfg.get("blocks_per_doc"))))
        return out

    def run(self, ecfg, ctx, item):
        doc = next(d for d in ecfg["docs"] if d["name"] == item["doc"])
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        ids = ctx.doc_ids(doc)
        blocks = scored_blocks(len(ids), item["score_from"], item["blocks_per_doc"])
        stats = getattr(policy, "stats", None)  # MegaContext policies count what they did
        before = stats() if stats else {}
        t0 = time.perf_counter()
        nll_BxK = np.asarray(policy.nll_stream(ids, blocks), np.float64)
        dt = time.perf_counter() - t0
        if nll_BxK.shape != (len(blocks), K):
            raise ConfigError(f"policy {item['policy']} returned NLL of shape {nll_BxK.shape}, "
                              f"expected {(len(blocks), K)}")
        nll = float(nll_BxK.mean())
        out = dict(nll=nll, ppl=math.exp(nll), scored_tokens=int(nll_BxK.size),
                   scored_blocks=len(blocks), sec_per_block=dt / len(blocks))
        if stats:  # this document's share of the policy's counters
            out["policy_stats"] = {k: v - before.get(k, 0) for k, v in stats().items()}
        return out

    @staticmethod
    def aggregate(rows):
        """Per (W, policy): token-weighted NLL over the docs where truncate, full and the policy
        are all ok, ppl, and gap closed. Also each policy's NLL over all its ok docs."""
        by = {}
        for r in rows:
            by.setdefault((r["W"], r["doc"]), {})[r["policy"]] = r
        out = {}
        for (W, doc), d in by.items():
            base_ok = is_ok(d.get("truncate", {})) and is_ok(d.get("full", {}))
            for p, r in d.items():
                a = out.setdefault((W, p), dict(docs=0, tok=0, nll_sum=0.0, gdocs=0, gtok=0,
                                                g_p=0.0, g_t=0.0, g_f=0.0, status=r["status"],
                                                sec=[]))
                if not is_ok(r):
                    continue
                a["status"] = "ok"
                a["docs"] += 1
                a["tok"] += r["scored_tokens"]
                a["nll_sum"] += r["nll"] * r["scored_tokens"]
                a["sec"].append(r["sec_per_block"])
                if base_ok:
                    n = r["scored_tokens"]
                    a["gdocs"] += 1
                    a["gtok"] += n
                    a["g_p"] += r["nll"] * n
                    a["g_t"] += d["truncate"]["nll"] * n
                    a["g_f"] += d["full"]["nll"] * n
        for a in out.values():
            a["nll"] = a["nll_sum"] / a["tok"] if a["tok"] else None
            a["ppl"] = math.exp(a["nll"]) if a["nll"] is not None else None
            a["ppl_common"] = math.exp(a["g_p"] / a["gtok"]) if a["gtok"] else None
            if a["gtok"] and abs(a["g_t"] - a["g_f"]) > 1e-12:
                a["gap_closed"] = (a["g_t"] - a["g_p"]) / (a["g_t"] - a["g_f"])
            else:
                a["gap_closed"] = None
            a["sec_per_block"] = float(np.median(a["sec"])) if a["sec"] else None
        return out

    def table(self, rows):
        agg = self.aggregate(rows)
        body = []
        for (W, p), a in sorted(agg.items(), key=lambda kv: (kv[0][0], policy_order(kv[0][1]))):
            if a["status"] != "ok":
                body.append([W, p, short_status(a["status"]), None, None, None, None, None])
            else:
                body.append([W, p, "ok", a["gdocs"], a["ppl_common"], a["gap_closed"], a["docs"],
                             a["ppl"]])
        s = ("Per budget W. Perplexity = exp(token-weighted mean NLL). `full fits`: the documents "
             "where truncate and full context both ran, the same tokens for every policy; "
             "`gap closed` = (nll_truncate - nll_policy) / (nll_truncate - nll_full), i.e. on "
             "log-perplexity, over those documents. `all docs`: every document the policy ran "
             "on.\n\n")
        s += md_table(["W", "policy", "status", "docs (full fits)", "ppl (full fits)", "gap closed",
                  "docs (all)", "ppl (all docs)"], body)
        per = [[r["W"], r["doc"], r["policy"],
                r["ppl"] if is_ok(r) else short_status(r["status"]),
                r.get("sec_per_block")] for r in sorted(
                    rows, key=lambda r: (r["W"], r["doc"], policy_order(r["policy"])))]
        s += ("\n\nPer document (s/block: wall time of the row / scored blocks; the first row of "
              "a shape includes its compile):\n\n"
              + md_table(["W", "doc", "policy", "ppl", "s/block"], per))
        return s

    def plot(self, rows, out_dir):
        agg = {k: a for k, a in self.aggregate(rows).items() if a["status"] == "ok"}
        if not agg:
            return []
        plt = pyplot()
        Ws = sorted({W for W, _ in agg})
        ps = sorted({p for _, p in agg}, key=policy_order)
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(Ws) * len(ps) / 2, 3.5))
        width = 0.8 / len(ps)
        common = any(a["ppl_common"] for a in agg.values())
        field = "ppl_common" if common else "ppl"
        allys = []
        for j, p in enumerate(ps):
            ys = [agg.get((W, p), {}).get(field) or np.nan for W in Ws]
            allys += ys
            bars = ax.bar(np.arange(len(Ws)) + j * width, ys, width, label=p)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        lo, hi = np.nanmin(allys), np.nanmax(allys)
        ax.set_ylim(lo - 0.5 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.set_xticks(np.arange(len(Ws)) + 0.4 - width / 2, [f"W={W}" for W in Ws])
        ax.set_ylabel("perplexity" + (" (docs where full fits)" if common else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "ppl.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]
