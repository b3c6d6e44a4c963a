"""`gist_dnll`: delta-NLL@H of substituting one node by its gist (trained GistNet vs mean-pool vs
untrained, and dropping the node), from `mc_jax.eval.networks.eval_gists` on held-out windows."""

from __future__ import annotations

from mc_jax.eval.evaluators.registry import (Evaluator, grid_item, md_table, register_evaluator,
                                             short_status)
from mc_jax.eval.evaluators.trained_networks import check_source, run_eval_networks
from mc_jax.eval.policies import registry as pol


@register_evaluator("gist_dnll")
class GistDeltaNLLEvaluator(Evaluator):
    """Delta-NLL@H of substituting one block (one node at `level`) by its gist, GistNet vs
    mean-pool: `mc_jax.eval.networks.eval_gists` on held-out validation windows (`n_samples`
    windows, all levels in one call; needs the prepared corpus and a checkpoint).
    Config: `source="eval_networks"` (the default and the only source), gists, levels, horizon,
    n_samples, seeds."""

    title = "Delta-NLL@H of one-node gist substitution"

    def items(self, ecfg, ctx):
        check_source(ecfg)
        return [grid_item(ecfg, ctx, dict(gist=g, level=int(lv), doc="validation",
                                          horizon=int(ecfg.get("horizon", 64)),
                                          n_samples=int(ecfg.get("n_samples", 6)), seed=int(s)))
                for g in ecfg.get("gists", ["gistnet", "meanpool"])
                for lv in ecfg.get("levels", [1, 2]) for s in ecfg.get("seeds", [0])]

    def run(self, ecfg, ctx, item):
        res = run_eval_networks(ctx, "eval_gists", n_docs=item["n_samples"],
                                horizon=item["horizon"], seed=item["seed"])
        name = f"lod{item['level']}_{item['gist']}"
        if name not in res:
            raise pol.NotApplicable(f"eval_gists reports no {name}")
        return dict(dnll=res[name], dnll_sem=res.get(f"{name}_sem"),
                    dnll_drop=res.get(f"lod{item['level']}_drop"),
                    trained_steps=res.get("trained_steps"))

    def table(self, rows):
        return md_table(["gist", "level", "doc", "status", "delta-NLL@H (nats/token)",
                         "drop the node instead"],
                        [[r["gist"], r["level"], r["doc"], short_status(r["status"]), r.get("dnll"),
                          r.get("dnll_drop")] for r in rows])
