"""Ingest cost of retrieval keys (issue 19, item 1) against the plain base's prefill, in one run.

Usage: python benchmarks/ingest_cost.py [--model smollm2|tiny] [--tokens 2048] [--reps 3]

Three ways to take in the same history of N tokens, timed in alternating rounds (`--reps`), the
median of each reported (shared cores drift: alternating lets the drift hit all three alike):

(a) prefill: the plain base, one forward over the N tokens (what reading the history costs a
    base with N positions of context);
(b) ingest: `Session.ingest` without retrieval keys (the shipped GistNet only, no base forward;
    mean-pool gists on the tiny base);
(c) ingest + keys: `Session(retrieval_heads=HEADS).ingest` (the base's first max(layer)+1
    layers over each 512-token window, `mc_jax.runtime.retrieval_keys.KeyStore`).

Prints tokens/s of each, the ratios (c)/(a) and (c)/(b) in seconds, the keys' host bytes per
token; last line: JSON. Compiles happen in a warm-up round that is not timed.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def measure(model, kind: str, tokens: int = 2048, reps: int = 3, log=None) -> dict:
    """The three timings of the module docstring for `model` (kind "smollm2": the shipped
    GistNet and `HEADS`; "tiny": mean-pool gists and head (1, 0)). -> the result dict."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from mc_jax.base import base_model as bm
    from mc_jax.nets.io import load_nets
    from mc_jax.runtime.retrieval_keys import HEADS
    from mc_jax.runtime.session import Session

    log = log or (lambda m: print(m, file=sys.stderr))
    heads = ((1, 0),) if kind == "tiny" else HEADS
    # the shipped GistNet on SmolLM2 (what a Session ingests with); mean-pool gists on tiny
    gist, _, _ = load_nets(model, None, need_trained=kind == "smollm2", meanpool=kind == "tiny")
    K = gist.config.block_size
    N = tokens // K * K
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, N).astype(np.int32)

    fwd = jax.jit(lambda p, x: bm.forward(p, model.cfg, x, jnp.arange(x.shape[1])[None])[0])
    plain = Session(model, 512, gist, None, policy="recency", capacity_tokens=N + K)
    keyed = Session(model, 512, gist, None, policy="recency", capacity_tokens=N + K,
                    retrieval_heads=heads)

    def t_prefill():
        t0 = time.perf_counter()
        jax.block_until_ready(fwd(model.params, jnp.asarray(ids[None])))
        return time.perf_counter() - t0

    def t_ingest(s):
        s.reset()
        t0 = time.perf_counter()
        s.ingest(ids)
        jax.block_until_ready(s.state)
        return time.perf_counter() - t0

    t_prefill(), t_ingest(plain), t_ingest(keyed)  # warm-up: compiles
    times = {"prefill": [], "ingest": [], "ingest_keys": []}
    for r in range(reps):
        times["prefill"].append(t_prefill())
        times["ingest"].append(t_ingest(plain))
        times["ingest_keys"].append(t_ingest(keyed))
        log(f"ingest cost round {r + 1}/{reps}: " + ", ".join(f"{k} {v[-1]:.2f}s"
                                                             for k, v in times.items()))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(model=kind, tokens=N, heads=[list(h) for h in heads], reps=reps,
                seconds=med, tokens_per_s={k: N / v for k, v in med.items()},
                keys_vs_prefill_time_ratio=med["ingest_keys"] / med["prefill"],
                keys_vs_ingest_time_ratio=med["ingest_keys"] / med["ingest"],
                key_bytes_per_token=keyed.keys.nbytes / N)


def load_model(kind: str):
    import jax

    from mc_jax.base import base_model as bm

    if kind == "tiny":
        from mc_jax.base.tiny import ByteTokenizer, TinyBase

        cfg = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=4096)
        return TinyBase(cfg, bm.init_params(cfg, jax.random.PRNGKey(0)), ByteTokenizer())
    from mc_jax.base import loading

    return loading.load_base(None)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "tiny"])
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    res = measure(load_model(a.model), a.model, a.tokens, a.reps)
    med, N = res["seconds"], res["tokens"]
    for k, v in res["tokens_per_s"].items():
        print(f"{k:>12}: {v:8.0f} tokens/s ({med[k]:.2f} s for {N} tokens)")
    print(f"ingest+keys / prefill time: {res['keys_vs_prefill_time_ratio']:.2f}; "
          f"ingest+keys / ingest time: {res['keys_vs_ingest_time_ratio']:.1f}; keys: "
          f"{res['key_bytes_per_token']:.0f} host bytes per token")
    print(json.dumps(res))
    return res


if __name__ == "__main__":
    main()
