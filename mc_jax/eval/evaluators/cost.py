"""`cost`: seconds per scored block of each policy after warm-up, and the ratio to truncate at
the same budget, timed in the same item."""

from __future__ import annotations

import time

import numpy as np

from mc_jax.eval.evaluators.registry import (Evaluator, grid_item, is_ok, md_table, policy_order,
                                             pyplot, register_evaluator, short_status)
from mc_jax.eval.policies.registry import K


@register_evaluator("cost")
class CostEvaluator(Evaluator):
    """Seconds per scored block of `nll_stream` after warm-up (a warm-up call on a different
    document of the same length, so no compile and no memo is timed), and the ratio to truncate at
    the same W timed in the same item. The document's last `blocks` blocks are scored."""

    title = f"Cost: seconds per scored {K}-token block (after warm-up) and ratio to truncate"

    def items(self, ecfg, ctx):
        return [grid_item(ecfg, ctx, dict(policy=p, W=int(W), doc=ecfg["doc"]["name"],
                                      tokens=int(ecfg["doc"]["tokens"]),
                                      blocks=int(ecfg.get("blocks", 4))))
                for W in ecfg["budgets"] for p in ecfg["policies"]]

    @staticmethod
    def _time(policy, ids, blocks) -> float:
        policy.nll_stream(np.roll(ids, 1), blocks)  # warm-up: compile (and any memo) elsewhere
        t0 = time.perf_counter()
        policy.nll_stream(ids, blocks)
        return (time.perf_counter() - t0) / len(blocks)

    def run(self, ecfg, ctx, item):
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        ids = ctx.doc_ids(ecfg["doc"])
        nb = len(ids) // K
        blocks = list(range(max(1, nb - item["blocks"]), nb))
        sec = self._time(policy, ids, blocks)
        base = sec if item["policy"] == "truncate" else self._time(
            ctx.policy("truncate", item["W"]), ids, blocks)
        return dict(sec_per_block=sec, truncate_sec_per_block=base, ratio=sec / base,
                    stream_blocks=nb)

    def table(self, rows):
        body = [[r["W"], r["policy"], short_status(r["status"]), r.get("sec_per_block"),
                 r.get("truncate_sec_per_block"), r.get("ratio")]
                for r in sorted(rows, key=lambda r: (r["W"], policy_order(r["policy"])))]
        return md_table(["W", "policy", "status", "s/block", "truncate s/block", "ratio"], body)

    def plot(self, rows, out_dir):
        ok = [r for r in rows if is_ok(r)]
        if not ok:
            return []
        plt = pyplot()
        ok.sort(key=lambda r: (r["W"], policy_order(r["policy"])))
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(ok), 3.2))
        ax.bar(range(len(ok)), [r["ratio"] for r in ok])
        ax.set_xticks(range(len(ok)), [f"{r['policy']}\nW={r['W']}" for r in ok], fontsize=7)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylabel("time per block / truncate")
        fig.tight_layout()
        path = out_dir / "cost.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]
