"""Perplexity with training-free retrieval focus (issue 19): `retrieve` in its perplexity mode
(before each scored block, the 4 history blocks the newest block's tokens attend to most are
made raw) against full, truncate and recency, on the `cpu_small` quick documents (Genesis and
the Python tutorial, 4,096 tokens each, W = 512).

Its setting was chosen on three other documents before these were scored
(experiments/retrieval_ppl/tune.py, table in experiments/retrieval_ppl/README.md): the lowest
NLL there was R = 4 blocks ranked by all 90 heads of layers 14-23, gists masked out of
attention (the base reads only raw blocks, as in the probe of ../shared/RETRIEVAL.md).

    mc-jax eval --sweep experiments/configs/retrieval_ppl.py:quick --out experiments/results/retrieval_ppl_quick
    mc-jax eval --sweep experiments/configs/retrieval_ppl.py:48 --out experiments/results/retrieval_ppl_48
"""
from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
LAYER_HEADS = [[layer, h] for layer in range(14, 24) for h in range(9)]


def get_config(variant=None):
    genesis, python = str(DATA / "kjv_genesis.txt"), str(DATA / "python_tutorial.txt")
    docs = [dict(name="genesis-4k", path=genesis, offset=0, tokens=4096),
            dict(name="python-4k", path=python, offset=0, tokens=4096)]
    if variant not in ("quick", "48"):
        raise ValueError(f"retrieval_ppl has variants quick (6 blocks per document, as "
                         f"cpu_small:quick) and 48 (48 blocks, as cpu_small:recency48); got "
                         f"{variant!r}")
    ppl = dict(name="ppl", policies=["full", "truncate", "recency", "retrieve"], budgets=[512],
               docs=docs, blocks_per_doc=6 if variant == "quick" else 48,
               policy_kw={"retrieve": dict(ppl_top=4, heads=LAYER_HEADS, mask_gists=True)})
    return dict(name=f"retrieval_ppl_{variant}", base=None, dtype="float32", checkpoint=None,
                seed=0, evaluators=[ppl])
