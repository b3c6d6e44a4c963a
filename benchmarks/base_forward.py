"""Base-model speed: prefill tokens/s at several lengths, and decode tokens/s with the KV cache vs
recomputing the whole prefix for every token (the ratio is measured in the same run).

    .venv/bin/python benchmarks/base_forward.py [--base tiny|default|PATH] [--lengths 512 1024 2048]
        [--decode-context 512] [--decode-tokens 16] [--dtype float32|bfloat16]

Compile time is excluded (each shape is run once before timing). Last line: JSON with the figures.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import decode_step, prefill


def timed(fn, repeats):
    jax.block_until_ready(fn())  # compile + warm
    t0 = time.perf_counter()
    for _ in range(repeats):
        jax.block_until_ready(fn())
    return (time.perf_counter() - t0) / repeats


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="default", help="'tiny' (random), 'default' (SmolLM2) or a path")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048])
    ap.add_argument("--decode-context", type=int, default=512,
                    help="prefix length the decode comparison starts from")
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = ap.parse_args()

    if args.base == "tiny":
        cfg = bm.LlamaConfig.tiny(vocab_size=49152, max_seq_len=8192)
        params = bm.init_params(cfg, jax.random.PRNGKey(0))
    else:
        from mc_jax.base.loading import load_base
        m = load_base(None if args.base == "default" else args.base)
        cfg, params = m.cfg, m.params
    params = bm.cast_params(params, jnp.dtype(args.dtype))
    rng = np.random.default_rng(0)
    out = {"base": cfg.name, "backend": jax.default_backend(), "dtype": args.dtype,
           "prefill_tokens_per_s": {}}
    for T in args.lengths:
        ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, T)), jnp.int32)
        s = timed(lambda: bm.logits_fn(params, cfg, ids), args.repeats)
        out["prefill_tokens_per_s"][str(T)] = T / s
        print(f"prefill T={T}: {s:.3f}s  {T / s:.1f} tokens/s", flush=True)

    C, N = args.decode_context, args.decode_tokens
    size = C + N
    ids = jnp.asarray(rng.integers(0, cfg.vocab_size, (1, size)), jnp.int32)

    def with_cache():
        cache = bm.init_cache(cfg, 1, size, params["embed"].dtype)
        _, cache = prefill(params, cfg, cache, ids[:, :C], jnp.ones((1, C), bool))
        tok = ids[:, C]
        key = jax.random.PRNGKey(0)
        for i in range(N):
            tok, cache = decode_step(params, cfg, cache, tok, jnp.int32(C + i), key,
                                     jnp.float32(0.0), jnp.float32(1.0))
        return tok

    def prefill_only():
        cache = bm.init_cache(cfg, 1, size, params["embed"].dtype)
        return prefill(params, cfg, cache, ids[:, :C], jnp.ones((1, C), bool))[0]

    def recompute():
        # every token re-runs the whole (padded, fixed-shape) prefix: no cache
        valid = np.zeros((1, size), bool)
        tok = None
        for i in range(N):
            valid[0, :C + i + 1] = True
            tok = jnp.argmax(bm.logits_fn(params, cfg, ids, jnp.asarray(valid))[0, C + i])
        return tok

    t_cache = (timed(with_cache, 1) - timed(prefill_only, 1)) / N
    t_recompute = timed(recompute, 1) / N
    out.update(decode_context=C, decode_tokens=N,
               decode_tokens_per_s_kv_cache=1 / t_cache,
               decode_tokens_per_s_recompute=1 / t_recompute,
               kv_cache_speedup=t_recompute / t_cache)
    print(f"decode at context {C}: KV cache {1 / t_cache:.1f} tok/s, recompute "
          f"{1 / t_recompute:.2f} tok/s, speedup x{t_recompute / t_cache:.1f}", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
