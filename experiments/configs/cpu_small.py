"""CPU sweep on the real base (SmolLM2-135M), budgets W = 512..1024, base-only policies plus the
MegaContext policies (rows say "unavailable" when their trained networks are missing).

    mc-jax eval --sweep experiments/configs/cpu_small.py            # ~40 min on 2 idle cores (est.)
    mc-jax eval --sweep experiments/configs/cpu_small.py:quick      # measured: see docs/results.md

Cost model on 2 CPU cores: one scored block of a window policy = one forward of W+32 tokens
(~3.5 s at W=512, ~8 s at W=1024); full context = one chunked forward over the document (~70 s for
8192 tokens, shared by every W); one passkey answer = one prefill of W+64 tokens + 8 decode steps.
Perplexity is therefore measured on `blocks_per_doc` blocks spread over each document (the same
blocks for every policy), not on every block.
"""

from pathlib import Path

DATA = Path(__file__).resolve().parents[1] / "data"
BASE_POLICIES = ["full", "truncate", "sinks"]
MC_POLICIES = ["recency", "meanpool", "lens", "oracle"]


def get_config(variant=None):
    genesis, python = str(DATA / "kjv_genesis.txt"), str(DATA / "python_tutorial.txt")
    docs = [dict(name="genesis-8k", path=genesis, offset=0, tokens=8192),
            dict(name="python-8k", path=python, offset=0, tokens=8192),
            dict(name="genesis-32k", path=genesis, offset=8192, tokens=32768)]
    budgets = [512, 1024]
    policies = BASE_POLICIES + MC_POLICIES
    ppl = dict(name="ppl", policies=policies, budgets=budgets, docs=docs, blocks_per_doc=12)
    passkey = dict(name="passkey", policies=policies, budgets=[512], history_mults=[4, 16, 64],
                   fillers=["repeat", "prose"], prose=genesis, depths=[0.1, 0.3, 0.5, 0.7, 0.9],
                   placements=["aligned", "straddle"], seeds=[0], max_new_tokens=8,
                   policy_kw={"full": {"max_len": 4096}})  # full answers only at 4x (cost)
    cost = dict(name="cost", policies=["truncate", "sinks"] + MC_POLICIES, budgets=budgets,
                doc=docs[0], blocks=4)
    # trained networks: mc_jax.eval.networks on held-out windows (needs --checkpoint or the
    # default exported networks, and the prepared corpus)
    gist = dict(name="gist_dnll", source="eval_networks", levels=[1, 2],
                gists=["gistnet", "meanpool", "untrained"], horizon=64, n_samples=6)
    lens = dict(name="lens_rank", source="eval_networks", n_samples=6)
    cfg = dict(name="cpu_small", base=None, dtype="float32", checkpoint=None, seed=0,
               evaluators=[ppl, passkey, gist, lens, cost])
    quick_docs = [dict(name="genesis-4k", path=genesis, offset=0, tokens=4096),
                  dict(name="python-4k", path=python, offset=0, tokens=4096)]
    if variant == "quick":
        # Sized for 2 cores shared with other jobs (measured time in docs/results.md): two
        # 4096-token documents (8x W), W=512, 6 scored blocks each; passkey 4x/16x, 3 depths,
        # needles straddling a block boundary.
        ppl.update(budgets=[512], docs=quick_docs, blocks_per_doc=6)
        passkey.update(history_mults=[4, 16], depths=[0.1, 0.5, 0.9], placements=["straddle"])
        cost.update(budgets=[512], doc=quick_docs[0], blocks=2)
    elif variant in ("recency48", "lens48"):
        # recency48: is recency with a trained GistNet really ahead of truncation? ppl only, the
        # quick documents, 48 scored blocks each (1,536 tokens per document instead of 192);
        # policies that need no LensNet. lens48 adds the lens policy: does a LensNet's focus beat
        # recency and truncation on these 3,072 scored tokens? Run once per pair (--checkpoint).
        ppl.update(budgets=[512], docs=quick_docs, blocks_per_doc=48,
                   policies=["full", "truncate", "sinks", "recency"]
                   + (["lens"] if variant == "lens48" else []))
        cfg["evaluators"] = [ppl]
    elif variant is not None:
        raise ValueError(f"cpu_small has variants: quick, recency48, lens48 (got {variant!r})")
    return cfg
