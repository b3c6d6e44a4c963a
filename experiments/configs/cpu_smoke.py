"""Smoke sweep: a tiny random base (2 layers, d=64) with a byte tokenizer; the evaluators that run
on it (ppl, passkey, cost), a few grid points each. Runs in well under a minute on 2 CPU cores;
tests/test_evaluate.py runs it. The numbers mean nothing (random weights): it checks the machinery,
not the method. gist_dnll and lens_rank are not listed: they measure trained networks on the
prepared corpus with the real base (mc_jax.eval.networks), so on this base they could only record
"unavailable" rows; cpu_small and gpu_full run them.

    mc-jax eval --sweep experiments/configs/cpu_smoke.py --out /tmp/smoke
"""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
POLICIES = ["full", "truncate", "sinks", "recency", "lens"]


def get_config(variant=None):
    W = 64
    docs = [dict(name="genesis", path=str(DATA / "kjv_genesis.txt"), offset=0, tokens=512),
            dict(name="python", path=str(DATA / "python_tutorial.txt"), offset=0, tokens=1536)]
    return dict(
        name="cpu_smoke",
        base="tiny",
        base_kw=dict(vocab_size=256, max_seq_len=1024),  # the 1536-token doc is "not applicable"
        checkpoint=None,
        seed=0,
        evaluators=[
            dict(name="ppl", policies=POLICIES, budgets=[W], docs=docs, blocks_per_doc=3),
            dict(name="passkey", policies=POLICIES, budgets=[W], history_mults=[4, 16],
                 fillers=["repeat", "prose"], prose=str(DATA / "kjv_genesis.txt"),
                 depths=[0.5], placements=["aligned", "straddle"], seeds=[0],
                 max_new_tokens=6),
            dict(name="cost", policies=["truncate", "sinks", "recency"], budgets=[W],
                 doc=docs[0], blocks=2),
        ],
    )
