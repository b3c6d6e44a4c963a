"""What the MegaContext runtime holds: its static configuration (`DecodeConfig`, `Runtime`) and
its array state (`DecodeState`), plus the per-block outputs of a step (`StepInfo`).

`Runtime` is the jit static argument of every runtime step. It hashes and compares by value
(configs, dtypes and the NNX graph definitions of GistNet and LensNet), so two sessions built
from equal configs share one compile; `make_runtime` returns one object per distinct value, so the
jit cache's equality check is an identity check.

Letters: K block size, W WC budget, S cache slots (W rounded up to C), C recompute chunk,
E entry rows (W + 1), V vocab, D d_model.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.core import focus as fm
from mc_jax.core import tree as tr
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, ConfigError

POLICIES = ("lens", "recency", "truncate")
KV_MODES = ("exact", "approx")


# ---------------------------------------------------------------------------------------------
# static configuration


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """Static shape and policy of a decode run."""

    budget: int  # W, base-model positions of the WC (also the cache slots, rounded up to chunk)
    capacity_blocks: int  # tree capacity; the longest history is capacity_blocks * K tokens
    depth: int = 2
    block_size: int = 32
    protected_blocks: int = 1
    policy: str = "lens"
    position_mode: str = "compact"
    rope_damping: bool = False
    chunk: int = 64  # C, slots per KV-recompute chunk
    focus: fm.FocusConfig = fm.FocusConfig()
    # "exact": recompute from the first changed slot on; "approx" (global positions only): move
    # the cached rows of unchanged entries to their new slots and recompute only the chunks that
    # hold new content, so entries after an edit keep keys/values from their old context
    kv_mode: str = "exact"

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ConfigError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        if self.position_mode not in wcm.MODES:
            raise ConfigError(f"position_mode must be one of {wcm.MODES}")
        if self.chunk < 1:
            raise ConfigError(f"chunk must be >= 1, got {self.chunk}")
        if self.kv_mode not in KV_MODES:
            raise ConfigError(f"kv_mode must be one of {KV_MODES}, got {self.kv_mode!r}")
        if self.kv_mode == "approx" and (self.position_mode != "global"
                                         or self.policy == "truncate"):
            raise ConfigError("kv_mode='approx' needs position_mode='global' (a cached row keeps "
                              "its RoPE position only when positions do not depend on what "
                              "precedes it) and a policy other than truncate")
        self.wcfg  # validates budget vs capacity (ConfigError with the fix)

    @property
    def wcfg(self) -> wcm.WCConfig:
        return wcm.WCConfig(w_max=self.budget, depth=self.depth, block_size=self.block_size,
                            protected_blocks=self.protected_blocks,
                            max_tokens=self.capacity_blocks * self.block_size)

    @property
    def cache_slots(self) -> int:
        return -(-self.budget // self.chunk) * self.chunk

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Everything static about a run (a jit static argument, hashed and compared by value):
    configs, dtypes and the NNX graph definitions of GistNet and LensNet."""

    cfg: DecodeConfig
    base_cfg: bm.LlamaConfig
    gist_graph: Any
    lens_graph: Any = None  # None unless policy == "lens"
    lens_incremental: bool = False
    lens_latent_shape: tuple = ()
    gist_dtype: str = "float32"
    cache_dtype: Any = jnp.float32

    def __post_init__(self):
        # one spelling per dtype (jnp.float32 == np.dtype("float32") but their hashes differ)
        object.__setattr__(self, "cache_dtype", np.dtype(self.cache_dtype))

    def __hash__(self):  # cached: hashing a GraphDef costs about a millisecond, jit hashes per call
        h = self.__dict__.get("_hash")
        if h is None:
            h = hash(tuple(getattr(self, f.name) for f in dataclasses.fields(self)))
            object.__setattr__(self, "_hash", h)
        return h

    @property
    def tcfg(self) -> tr.TreeConfig:
        return tr.TreeConfig(d=self.base_cfg.d_model, capacity_blocks=self.cfg.capacity_blocks,
                             depth=self.cfg.depth, block_size=self.cfg.block_size,
                             dtype=self.gist_dtype)


_RUNTIMES: dict[Runtime, Runtime] = {}  # one object per distinct Runtime value (see the docstring)


def make_runtime(cfg: DecodeConfig, base_cfg: bm.LlamaConfig, gist_model, lens_model=None,
                 cache_dtype=jnp.float32):
    """(Runtime, network params pytree) from live NNX models."""
    if cfg.policy == "lens" and lens_model is None:
        raise ConfigError("policy 'lens' needs a LensNet; pass lens_model or use 'recency'")
    if gist_model.config.depth < cfg.depth:
        raise ConfigError(f"the GistNet produces levels 1..{gist_model.config.depth}, the "
                          f"decode config needs depth {cfg.depth}")
    if cfg.budget > base_cfg.max_seq_len:
        raise CapacityError(f"budget {cfg.budget} exceeds the base model's context of "
                            f"{base_cfg.max_seq_len}")
    gist_graph, gist_state = nnx.split(gist_model)
    nets = {"gist": gist_state}
    lens_graph, inc, lat = None, False, ()
    if cfg.policy == "lens":
        lens_graph, lens_state = nnx.split(lens_model)
        nets["lens"] = lens_state
        lc = lens_model.config
        if lc.max_level < cfg.depth:
            raise ConfigError(f"LensNet max_level {lc.max_level} < depth {cfg.depth}")
        inc, lat = lc.incremental, (lc.n_latents, lc.d_lens)
    rt = Runtime(cfg=cfg, base_cfg=base_cfg, gist_graph=gist_graph, lens_graph=lens_graph,
                 lens_incremental=inc, lens_latent_shape=lat, cache_dtype=cache_dtype)
    return _RUNTIMES.setdefault(rt, rt), nets


def with_reader(base_params, gist_model):
    """The base parameters the runtime runs with: plus the GistNet's gist reader (key
    "gist_reader", applied at gist slots only) when it has one."""
    ad = gist_model.reader_adapter()
    return base_params if ad is None else {**base_params, "gist_reader": ad}


# ---------------------------------------------------------------------------------------------
# array state


@flax.struct.dataclass
class DecodeState:
    tree: tr.Tree
    wc: wcm.WorkingContext
    cache: bm.KVCache  # [L, 1, S, G, F]
    cache_key_S: jax.Array  # int32 content key of each cached slot (-1: nothing)
    kv_len: jax.Array  # int32 []: slots [0, kv_len) of the cache are a correct prefix
    last_logits_V: jax.Array  # float32: logits of cache slot kv_len - 1 (predicts the next token)
    key: jax.Array  # PRNG key (folded with the block index per step)
    latents: jax.Array  # LensNet latents (incremental mode), else a [0] placeholder
    blocks: jax.Array  # int32 [] blocks processed
    total_actions: jax.Array  # int32 []
    total_recompute: jax.Array  # int32 [] KV slots recomputed so far


def init_state(rt: Runtime, seed: int = 0) -> DecodeState:
    cfg = rt.cfg
    wcfg = cfg.wcfg
    S = cfg.cache_slots
    latents = (jnp.zeros(rt.lens_latent_shape, jnp.float32) if rt.lens_incremental
               else jnp.zeros((0,), jnp.float32))
    return DecodeState(
        tree=tr.init_tree(rt.tcfg),
        wc=wcm.build_recency(0, wcfg),
        cache=bm.init_cache(rt.base_cfg, 1, S, rt.cache_dtype),
        cache_key_S=jnp.full((S,), -1, jnp.int32),
        kv_len=jnp.zeros((), jnp.int32),
        last_logits_V=jnp.zeros((rt.base_cfg.vocab_size,), jnp.float32),
        key=jax.random.PRNGKey(seed),
        latents=latents,
        blocks=jnp.zeros((), jnp.int32),
        total_actions=jnp.zeros((), jnp.int32),
        total_recompute=jnp.zeros((), jnp.int32))


def check_state(state: DecodeState, rt: Runtime) -> DecodeState:
    """Host side: raise the tree's / WC's sticky errors (mc_jax.errors types)."""
    tr.check_tree(state.tree, rt.tcfg)
    wcm.check_wc(state.wc, rt.cfg.wcfg)
    return state


@flax.struct.dataclass
class StepInfo:
    """Per-block outputs and telemetry (stacked over blocks by `ingest`)."""

    tokens_K: jax.Array  # int32 the block's tokens (given or sampled)
    nll_K: jax.Array  # float32 NLL of each token (0 for the very first token of a history)
    recompute: jax.Array  # int32 KV slots recomputed by this step's sync
    num_actions: jax.Array  # int32 allocator actions (lens policy; -1 for rebuild policies)
    cooldown_hits: jax.Array  # int32
    budget_blocked: jax.Array  # int32
    cost: jax.Array  # int32 WC cost after refocus
    num_tokens: jax.Array  # int32 history length after the block
    level_E: jax.Array  # int32 WC after refocus (for --show-focus)
    node_E: jax.Array
    num_entries: jax.Array
