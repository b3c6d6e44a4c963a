"""Throughput of the batched runtime (`mc_jax.runtime.batch.BatchedSession`): tokens/s of
teacher-forced scoring with B streams in one vmapped step, at B = 1, 4 and 16 (default), against
B = 1 in the same process, and the plain `Session` (no vmap) as a second reference.

    python benchmarks/batched_decode.py [--model tiny|smollm2] [--budget 512] [--batches 1 4 16]
        [--history 2048] [--steps 3]

Each stream ingests `--history` tokens of its own random ids (without the base), then one
warm-up step (compiles) and `--steps` timed teacher-forced blocks; tokens/s = B * K * steps /
seconds. Policy `lens` with an untrained LensNet and mean-pool-shaped GistNet (untrained): their
cost, not their choices, is what is timed. After the batched rounds the first stream's NLL of
the timed blocks is checked against a Session fed the same ids (max abs difference printed).
Last line: JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import numpy as np
from flax import nnx

from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet
from mc_jax.runtime.batch import BatchedSession
from mc_jax.runtime.session import Session

sys.path.insert(0, __import__("os").path.dirname(__file__))
from decode_overhead import load  # noqa: E402

K = GistNetConfig.block_size


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", choices=["tiny", "smollm2"])
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--history", type=int, default=2048)
    ap.add_argument("--steps", type=int, default=3)
    args = ap.parse_args(argv)
    model, lcfg = load(args.model)
    d = model.cfg.d_model
    gcfg = GistNetConfig.tiny(d) if args.model == "tiny" else GistNetConfig.small(d)
    gist = build_gist_model(gcfg, rngs=nnx.Rngs(0))
    lens = LensNet(lcfg, rngs=nnx.Rngs(1))
    kw = dict(policy="lens", capacity_tokens=args.history + K * (args.steps + 2))
    rng = np.random.RandomState(0)
    V = model.cfg.vocab_size
    Bmax = max(args.batches)
    hist = rng.randint(0, V, (Bmax, args.history)).astype(np.int32)
    blocks = rng.randint(0, V, (Bmax, args.steps + 1, K)).astype(np.int32)
    out = dict(model=args.model, budget=args.budget, history=args.history, steps=args.steps,
               backend=jax.default_backend(), rows=[])

    def timed(step_fn, B):
        step_fn(blocks[:B, 0])  # warm-up: compiles
        nll = []
        t0 = time.perf_counter()
        for j in range(1, args.steps + 1):
            nll.append(np.asarray(step_fn(blocks[:B, j])))
        dt = time.perf_counter() - t0
        return B * K * args.steps / dt, dt, np.stack(nll, 1)  # [B, steps, K]

    s = Session(model, args.budget, gist, lens, **kw)
    s.ingest(hist[0])
    tps, dt, ref = timed(lambda ids: s.step(ids[0]).nll_K[None], 1)
    out["rows"].append(dict(kind="Session (no vmap)", B=1, tokens_per_s=tps, seconds=dt))
    print(f"Session, B=1: {tps:.1f} tokens/s", file=sys.stderr, flush=True)
    base = None
    for B in args.batches:
        bs = BatchedSession(model, args.budget, gist, lens, batch=B, **kw)
        bs.ingest(list(hist[:B]))
        tps, dt, nll = timed(lambda ids: bs.step(ids).nll_K, B)
        base = tps if B == 1 or base is None else base
        diff = float(np.max(np.abs(nll[0] - ref[0])))
        out["rows"].append(dict(kind="BatchedSession", B=B, tokens_per_s=tps, seconds=dt,
                                ratio_vs_B1=tps / base, max_abs_nll_diff_stream0=diff))
        print(f"BatchedSession, B={B}: {tps:.1f} tokens/s ({tps / base:.2f}x B=1); stream 0 "
              f"NLL vs Session: max |diff| {diff:.2e}", file=sys.stderr, flush=True)
        del bs
    print(json.dumps(out))


if __name__ == "__main__":
    main()
