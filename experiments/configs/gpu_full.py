"""GPU sweep (one H200-class device): working-context budget W = 8192 (the base model's whole
context) with histories up to 64x W = 512k tokens, plus smaller budgets for perplexity.

    mc-jax eval --sweep experiments/configs/gpu_full.py --checkpoint CKPT
    mc-jax eval --sweep experiments/configs/gpu_full.py:ppl_only

Why the perplexity budgets are below 8192: SmolLM2's context is 8192 tokens, so at W = 8192 the full
context reference cannot see more than truncation does and the truncate -> full gap is zero; the gap
question is asked at W = 1024..4096 on 8192-token documents, and W = 8192 is used for long documents
(truncate vs MegaContext, no full reference), passkey and cost.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
POLICIES = ["full", "truncate", "sinks", "recency", "meanpool", "lens", "oracle"]


def get_config(variant=None):
    genesis, python = str(DATA / "kjv_genesis.txt"), str(DATA / "python_tutorial.txt")
    gap_docs = [dict(name=f"genesis-8k-{i}", path=genesis, offset=8192 * i, tokens=8192)
                for i in range(6)] + [
                dict(name=f"python-8k-{i}", path=python, offset=8192 * i, tokens=8192)
                for i in range(7)]
    long_docs = [dict(name="genesis-48k", path=genesis, offset=0, tokens=49152),
                 dict(name="python-64k", path=python, offset=0, tokens=65024)]
    evaluators = [
        dict(name="ppl", policies=POLICIES, budgets=[1024, 2048, 4096], docs=gap_docs,
             blocks_per_doc=None),
        dict(name="ppl", policies=POLICIES, budgets=[8192], docs=long_docs, blocks_per_doc=None),
        dict(name="passkey", policies=POLICIES, budgets=[8192], history_mults=[4, 16, 64],
             fillers=["repeat", "prose"], prose=genesis,
             depths=[0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0],
             placements=["aligned", "straddle"], seeds=[0, 1, 2], max_new_tokens=8),
        dict(name="gist_dnll", source="eval_networks", levels=[1, 2],
             gists=["gistnet", "meanpool", "untrained"], horizon=64, n_samples=64),
        dict(name="lens_rank", source="eval_networks", n_samples=64),
        dict(name="cost", policies=["truncate", "sinks", "recency", "lens"], budgets=[2048, 8192],
             doc=long_docs[0], blocks=32),
    ]
    cfg = dict(name="gpu_full", base=None, dtype="bfloat16", checkpoint=None, seed=0,
               evaluators=evaluators)
    if variant == "ppl_only":
        cfg["evaluators"] = evaluators[:2]
    elif variant == "passkey_only":
        cfg["evaluators"] = evaluators[2:3]
    elif variant is not None:
        raise ValueError(f"gpu_full has variants: ppl_only, passkey_only (got {variant!r})")
    return cfg
