"""Decode cost of the MegaContext runtime vs the plain base model, and its scaling with history.

Usage: python benchmarks/decode_overhead.py [--model tiny|smollm2] [--budget 512] [--blocks 3]
       [--kv-mode exact|approx]

All figures come from one run, on one Session (one compile per jitted function):

1. overhead at budget W: (a) the plain base model generating with a KV cache over W tokens
   (a cache of W slots prefilled with W - K tokens, K tokens decoded in one jitted `fori_loop`
   with the runtime's sampler: the same loop and cache size as (b)), seconds per token; also
   reported, one jitted `mc_jax.base.sampling.decode_step` call per token from Python
   (`plain_python_loop_...`, which pays per-token dispatch and so flatters (b)); (b) the full
   MegaContext step (KV sync after the last refocus + K sampled tokens + GistNet ingest + LensNet
   + allocator), seconds per block / K. The two are timed in alternating pairs (`--pairs` per
   history length) and overhead_ratio is the median of the per-pair ratios (b)/(a), so drifts in
   machine speed (shared cores) hit both sides alike.
2. scaling: time per block at histories of 8k, 64k and 1M tokens. The tree is filled quickly
   with `tree.append_blocks` (random ids, the runtime's GistNet), the WC is built with the recency
   policy (`working_context.build_recency`, budget W - K), then `--blocks` blocks are streamed
   (teacher forced) after one warm-up block and timed, each followed by one plain block (a);
   step_time_ratio_* compare the medians of block / plain-block at each length (machine-speed
   drift cancels; raw_step_time_ratio_* are the plain ratios of seconds). Each timed block is
   split into its KV recompute (`jit_sync`, the suffix after the previous refocus) and the rest
   (`jit_step`, whose own sync then recomputes nothing), so `kv_recompute_fraction` is measured,
   not estimated.
3. recompilations after warm-up (new entries in the compile caches of the runtime's jitted
   functions), and device memory in
   use (sum of `jax.live_arrays()` bytes) at each history length. The tree has one fixed capacity
   (~1M tokens, depth 3) for all three lengths, so memory is what that capacity costs.

Policy: `lens` with an untrained LensNet (its cost is what matters here) and mean-pool gists at
depth 3 (the shipped networks are depth 2, which cannot hold 1M tokens in W=512).
Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base import sampling
from mc_jax.core import tree as tr
from mc_jax.core import working_context as wcm
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from mc_jax.runtime.session import Session
from mc_jax.runtime.state import check_state
from mc_jax.runtime.step import jit_ingest, jit_step, jit_sync
from mc_jax.runtime.telemetry import time_networks

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))  # ingest_cost

K = GistNetConfig.block_size  # the runtime's block size (the GistNet default)
HISTORIES = (8192, 65536, 1_000_000)


def compiled() -> int:
    """Entries in the compile caches of the runtime's jitted functions."""
    return sum(f._cache_size() for f in (jit_step, jit_ingest, jit_sync))


def load(name: str):
    if name == "tiny":
        from mc_jax.base.tiny import ByteTokenizer, TinyBase

        cfg = bm.LlamaConfig.tiny()
        return TinyBase(cfg, bm.init_params(cfg, jax.random.PRNGKey(0)), ByteTokenizer()), \
            LensNetConfig.tiny(d_model=cfg.d_model, max_level=3)
    from mc_jax.base.loading import load_base

    m = load_base()
    return m, LensNetConfig.small(d_model=m.cfg.d_model, max_level=3)


def live_bytes() -> int:
    return int(sum(a.nbytes for a in jax.live_arrays()))


def _prefilled(model, slots: int, n: int):
    """(logits, cache): a cache of `slots` slots prefilled with n random tokens."""
    cfg, params = model.cfg, model.params
    cache = bm.init_cache(cfg, 1, slots, params["embed"].dtype)
    ids = jnp.asarray(np.random.RandomState(0).randint(0, cfg.vocab_size, (1, n)), jnp.int32)
    return sampling.prefill(params, cfg, cache, ids, jnp.ones((1, n), bool))


def plain_decode(model, W: int, n_tokens: int) -> float:
    """Seconds per token: base model, cache of W slots holding W tokens."""
    cfg, params = model.cfg, model.params
    logits, cache = _prefilled(model, W + n_tokens + 2, W)
    tok = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    key = jax.random.PRNGKey(0)
    tok, cache = sampling.decode_step(params, cfg, cache, tok, jnp.int32(W), key,
                                      jnp.float32(0), jnp.float32(1))  # compile
    jax.block_until_ready(tok)
    t0 = time.perf_counter()
    for i in range(n_tokens):
        tok, cache = sampling.decode_step(params, cfg, cache, tok, jnp.int32(W + 1 + i), key,
                                          jnp.float32(0), jnp.float32(1))
    jax.block_until_ready(tok)
    return (time.perf_counter() - t0) / n_tokens


def plain_block(model, W: int):
    """-> once(): seconds per token of the base model decoding K tokens in one jitted
    `lax.fori_loop` on a cache of W slots holding W - K tokens (the same loop, sampler and cache
    size as the MegaContext step's sampled block, whose WC costs <= W - K before the block, so
    the two differ only by what MegaContext adds). Compiled before returning."""
    cfg, params = model.cfg, model.params
    n = W - K
    logits, cache = _prefilled(model, W, n)

    @jax.jit
    def block(params, cache, logits_V, key, temperature, top_p):
        def body(j, carry):
            cache, logits_V, toks = carry
            tok = sampling.sample_token(logits_V[None], jax.random.fold_in(key, j), temperature,
                                        top_p)[0].astype(jnp.int32)
            out, cache = bm.forward(params, cfg, tok[None, None], (n + j)[None, None],
                                    cache=cache, cache_index=n + j)
            return cache, out[0, 0], toks.at[j].set(tok)

        return jax.lax.fori_loop(0, K, body, (cache, logits_V, jnp.zeros((K,), jnp.int32)))[2]

    args = (params, cache, logits[0, -1], jax.random.PRNGKey(0), jnp.float32(0),
            jnp.float32(1))
    jax.block_until_ready(block(*args))  # compile

    def once() -> float:
        t0 = time.perf_counter()
        jax.block_until_ready(block(*args))
        return (time.perf_counter() - t0) / K

    return once


def fill(session: Session, n_tokens: int, seed: int):
    """Tree of n_tokens random ids (append_blocks, N blocks per call) + the recency WC."""
    rt, params, nets = session.rt, session.params, session.nets
    N = 1024
    n_blocks = n_tokens // K
    rng = np.random.RandomState(seed)

    @jax.jit
    def add(tree, ids_NxK):  # compiles once for N = 1024 and once for N = 1
        gist_fn = lambda lv, c: nnx.merge(rt.gist_graph, nets["gist"])(lv, c)
        return tr.append_blocks(tree, ids_NxK, rt.tcfg, lambda i: bm.embed_tokens(params, i),
                                gist_fn)

    session.reset()
    tree = session.state.tree
    done = 0
    while done < n_blocks:
        n = min(N, n_blocks - done)
        ids = jnp.asarray(rng.randint(0, rt.base_cfg.vocab_size, (n, K)), jnp.int32)
        if n == N:
            tree = add(tree, ids)
        else:
            for j in range(n):
                tree = add(tree, ids[j:j + 1])
        done += n
    tr.check_tree(tree, rt.tcfg)
    wc = wcm.build_recency(n_blocks * K, rt.cfg.wcfg, budget=rt.cfg.budget - K)
    session.state = session.state.replace(tree=tree, wc=wc)
    session.ids = [0] * (n_blocks * K)
    check_state(session.state, rt)


def timed_blocks(session: Session, n: int, seed: int, teacher: bool = True, ref=None):
    """Time n blocks; with `ref` (the plain block), each block is followed by one reference run
    and `norm` = block time / reference time (machine-speed drift cancels)."""
    rng = np.random.RandomState(seed)
    V = session.rt.base_cfg.vocab_size
    rows = []
    for i in range(n):
        ids = rng.randint(0, V, K).astype(np.int32)
        t0 = time.perf_counter()
        rec = session.sync()
        jax.block_until_ready(session.state.cache.k)
        t1 = time.perf_counter()
        info = session.step(ids, n_given=0 if not teacher else K, teacher=teacher)
        t2 = time.perf_counter()
        row = dict(sync_s=t1 - t0, rest_s=t2 - t1, total_s=t2 - t0, recompute=rec,
                   actions=int(info.num_actions))
        if ref is not None:
            row["norm"] = row["total_s"] / (ref() * K)
        rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks per history length")
    ap.add_argument("--plain-tokens", type=int, default=32)
    ap.add_argument("--pairs", type=int, default=4,
                    help="alternating (plain block, sampled MegaContext block) pairs per history")
    ap.add_argument("--ingest-tokens", type=int, default=2048,
                    help="history tokens for the ingest-cost figures (benchmarks/ingest_cost.py"
                         " in this run: plain prefill vs ingest vs ingest + retrieval keys); "
                         "0 skips them")
    ap.add_argument("--kv-mode", default="exact", choices=["exact", "approx"],
                    help="approx: global positions, cached rows of unchanged entries are moved, "
                         "only chunks with new content are recomputed")
    args = ap.parse_args(argv)
    W = args.budget
    model, lens_cfg = load(args.model)
    say = lambda m: print(m, file=sys.stderr, flush=True)
    gist = build_gist_model(GistNetConfig(d_model=model.cfg.d_model, depth=3, kind="mean_pool",
                                          embed_rms=bm.embedding_rms(model.params)),
                            rngs=nnx.Rngs(0))
    lens = LensNet(lens_cfg, rngs=nnx.Rngs(1))
    pos_mode = "global" if args.kv_mode == "approx" else "compact"
    s = Session(model, W, gist, lens, policy="lens", capacity_tokens=HISTORIES[-1] + 64 * K,
                depth=3, kv_mode=args.kv_mode, position_mode=pos_mode)
    say(f"model {args.model}, W={W}, tree capacity {s.cfg.capacity_tokens} tokens, depth 3, "
        f"cache {s.cfg.cache_slots} slots, chunk {s.cfg.chunk}, kv_mode {args.kv_mode} "
        f"({pos_mode} positions)")

    plain_loop = plain_decode(model, W, args.plain_tokens)
    plain_once = plain_block(model, W)
    plain = float(np.median([plain_once() for _ in range(3)]))
    say(f"(a) plain base, cache of {W} slots: {plain * 1e3:.2f} ms/token decoding {K} tokens "
        f"in one jitted loop (the baseline); {plain_loop * 1e3:.2f} ms/token one jitted call "
        "per token from Python")

    results, traces_warm = {}, None
    for h in HISTORIES:
        t0 = time.perf_counter()
        fill(s, h, seed=h % 997)
        fill_s = time.perf_counter() - t0
        timed_blocks(s, 1, seed=1)  # warm-up: full recompute (and compile at the first length)
        if traces_warm is None:
            timed_blocks(s, 1, seed=2, teacher=False)
            traces_warm = compiled()
        rows = timed_blocks(s, args.blocks, seed=3, ref=plain_once)
        samp = timed_blocks(s, 1, seed=4, teacher=False)
        # overhead pairs: plain block and sampled MegaContext block alternately, so that drifts
        # in machine speed hit both sides of the ratio alike
        pairs = []
        for i in range(args.pairs):
            p_ = plain_once()
            m_ = timed_blocks(s, 1, seed=10 + i, teacher=False)[0]["total_s"] / K
            pairs.append((p_, m_))
        mem = live_bytes()
        med = lambda key, rs=rows: float(np.median([r[key] for r in rs]))
        results[h] = dict(pair_ratio=float(np.median([m_ / p_ for p_, m_ in pairs])),
                          pair_plain=float(np.median([p_ for p_, _ in pairs])),
                          pair_mc=float(np.median([m_ for _, m_ in pairs])),
                          block_s=med("total_s"), sync_s=med("sync_s"), rest_s=med("rest_s"),
                          block_norm=med("norm"),
                          recompute=med("recompute"), sampled_block_s=samp[0]["total_s"],
                          actions=float(np.mean([r["actions"] for r in rows])),
                          device_bytes=mem, fill_s=fill_s)
        say(f"history {h}: block {results[h]['block_s']:.3f}s (kv sync "
            f"{results[h]['sync_s']:.3f}s for {results[h]['recompute']:.0f} slots, rest "
            f"{results[h]['rest_s']:.3f}s), sampled block {samp[0]['total_s']:.3f}s, device "
            f"{mem / 2 ** 20:.1f} MiB, fill {fill_s:.1f}s; paired sampled block / plain block "
            f"{results[h]['pair_ratio']:.3f} ({results[h]['pair_mc'] * 1e3:.1f} vs "
            f"{results[h]['pair_plain'] * 1e3:.1f} ms/token)")
    recompiles = compiled() - traces_warm
    nets = time_networks(s)
    base = results[HISTORIES[0]]
    # overhead: median over all alternating pairs at every history length (the same work)
    mc_per_token = float(np.median([r["pair_mc"] for r in results.values()]))
    plain = float(np.median([r["pair_plain"] for r in results.values()]))
    pair_ratio = float(np.median([r["pair_ratio"] for r in results.values()]))
    out = dict(
        model=args.model, budget=W, kv_mode=args.kv_mode, position_mode=pos_mode,
        plain_s_per_token=plain, plain_python_loop_s_per_token=plain_loop,
        megacontext_s_per_token=mc_per_token, overhead_ratio=pair_ratio,
        # per-block time in units of the plain block timed right after it (drift cancels)
        step_time_ratio_64k_vs_8k=results[65536]["block_norm"] / base["block_norm"],
        step_time_ratio_1M_vs_8k=results[HISTORIES[-1]]["block_norm"] / base["block_norm"],
        raw_step_time_ratio_64k_vs_8k=results[65536]["block_s"] / base["block_s"],
        raw_step_time_ratio_1M_vs_8k=results[HISTORIES[-1]]["block_s"] / base["block_s"],
        recompiles_after_warmup=recompiles,
        kv_recompute_fraction=float(np.mean([r["sync_s"] / r["block_s"]
                                             for r in results.values()])),
        kv_recompute_slots=float(np.mean([r["recompute"] for r in results.values()])),
        device_mib={str(h): r["device_bytes"] / 2 ** 20 for h, r in results.items()},
        block_s={str(h): r["block_s"] for h, r in results.items()},
        sampled_block_s={str(h): r["sampled_block_s"] for h, r in results.items()},
        actions_per_block=float(np.mean([r["actions"] for r in results.values()])),
        gistnet_s_per_call=nets["gistnet_s_per_call"],
        lensnet_s_per_call=nets["lensnet_s_per_call"])
    if args.ingest_tokens:
        # issue 19: what taking in a history costs now that ingest also keeps retrieval keys
        # (the base's first layers per 512-token window), against the plain base's prefill
        from ingest_cost import measure

        del s
        ing = measure(model, args.model, args.ingest_tokens, reps=2, log=say)
        tps = ing["tokens_per_s"]
        say(f"ingest of {ing['tokens']} tokens: plain base prefill {tps['prefill']:.0f} tok/s, "
            f"Session ingest {tps['ingest']:.0f} tok/s, ingest + retrieval keys "
            f"{tps['ingest_keys']:.0f} tok/s ({ing['keys_vs_prefill_time_ratio']:.2f}x the "
            "prefill's time)")
        out.update(ingest_tokens=ing["tokens"], prefill_tokens_per_s=tps["prefill"],
                   ingest_tokens_per_s=tps["ingest"], ingest_keys_tokens_per_s=tps["ingest_keys"],
                   ingest_keys_vs_prefill_time_ratio=ing["keys_vs_prefill_time_ratio"],
                   key_bytes_per_token=ing["key_bytes_per_token"])
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
