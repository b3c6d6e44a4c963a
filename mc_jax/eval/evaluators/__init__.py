"""The sweep evaluators, one per file; importing this package registers them all.

`ppl` (long-document perplexity and the truncate -> full gap closed), `passkey` (retrieval of a
key hidden in long filler), `gist_dnll` and `lens_rank` (the trained networks, via
`mc_jax.eval.networks`), `cost` (time per scored block, ratio to truncate), `ruler` (RULER-lite retrieval tasks from
`mc_jax.eval.tasks`: accuracy with intervals, block recall@k, heatmaps, effective length).
"""

from mc_jax.eval.evaluators.registry import (EVALUATORS, Evaluator, evaluator_names,
                                             register_evaluator)

# each module registers its evaluator when imported
from mc_jax.eval.evaluators import (cost, gist_dnll, lens_rank, passkey, ppl,  # noqa: E402,F401
                                    ruler)

__all__ = ["EVALUATORS", "Evaluator", "evaluator_names", "register_evaluator"]
