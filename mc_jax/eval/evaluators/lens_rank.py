"""`lens_rank`: how well LensNet scores rank measured single-edit delta-NLL (Spearman), from
`mc_jax.eval.networks.eval_lens` on held-out windows."""

from __future__ import annotations

from mc_jax.eval.evaluators.registry import (Evaluator, grid_item, md_table, register_evaluator,
                                             short_status)
from mc_jax.eval.evaluators.trained_networks import check_source, run_eval_networks


@register_evaluator("lens_rank")
class LensRankEvaluator(Evaluator):
    """How well LensNet scores rank measured single-edit delta-NLL (Spearman):
    `mc_jax.eval.networks.eval_lens` (mixture WCs sampled as in training, on `n_samples` held-out
    windows). Config: `source="eval_networks"` (the default and the only source), n_samples,
    seeds."""

    title = "LensNet ranking of measured edit utilities"

    def items(self, ecfg, ctx):
        check_source(ecfg)
        return [grid_item(ecfg, ctx, dict(W=None, doc="validation",
                                          n_samples=int(ecfg.get("n_samples", 6)), seed=int(s)))
                for s in ecfg.get("seeds", [0])]

    def run(self, ecfg, ctx, item):
        res = run_eval_networks(ctx, "eval_lens", n_docs=item["n_samples"], seed=item["seed"])
        return {k: v for k, v in res.items() if k != "checkpoint"}

    def table(self, rows):
        return md_table(["W", "doc", "status", "Spearman"],
                        [[r["W"], r["doc"], short_status(r["status"]), r.get("spearman")]
                         for r in rows])
