"""The MegaContext runtime: one jit-compiled decode step over histories far longer than W.

Per K=32-token block (SPEC section 2, "Runtime loop"):

1. sync: bring the KV cache up to date with the working context (WC). The cache holds the
   materialised WC in slots [0, cost). Every slot carries a content key (first token of what it
   shows * 8 + level); the first slot whose key differs from the WC's (or lies past the cached
   length) is the first changed slot f, and only [f, cost) is recomputed, in fixed chunks of C
   slots under `lax.while_loop` (start rounded down to a multiple of C). This is exact: a slot's
   keys/values depend only on the slots at or before it, and a slot's position is a function of
   the content before it (compact) or of its own content (global).
2. the block: teacher forcing is one K-token forward at slots [cost, cost+K); sampling is K
   single-token forwards in a `lax.fori_loop` (the first `n_given` tokens may be forced, e.g. the
   tail of a prompt). The first token of the block is predicted by the logit of the last WC slot
   (kept in the state), so per-block NLL is exact next-token NLL.
3. ingest: append the block to the tree (GistNet runs under `lax.cond` when a node completes)
   and to the WC.
4. refocus: LensNet scores the WC and `focus.allocate(incoming=K)` edits it (policy `lens`), or
   `focus.recency_step` rebuilds it (`recency`, and `truncate`, which additionally masks every gist
   slot out of attention, so the base sees only the newest raw blocks).

After refocus the WC costs <= W - K, so a cache of W slots (rounded up to C) holds it plus the next
block. Steps that need no base-model output (prompt ingestion, unscored blocks) skip 1-2: the tree
and WC do not depend on the base model, and the next step's sync recomputes whatever changed.
Nothing depends on the history length except the tree's capacity (fixed at state creation), so a
state compiles once per (config, capacity) and per-block cost is flat in the history.

Letters: K block size, W WC budget, S cache slots (W rounded up to C), C recompute chunk,
E entry rows (W + 1), V vocab, D d_model, N blocks per ingest call, A action-log rows.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.core import focus as fm
from mc_jax.core import tree as tm
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, ConfigError, InputError, MissingResourceError
from mc_jax.base.sampling import sample_token
from mc_jax.nets.io import load_nets

POLICIES = ("lens", "recency", "truncate")
KV_MODES = ("exact", "approx")
INGEST_BLOCKS = 16  # blocks per ingest call (one compile; a partial call masks the rest)
NEVER_EDITED = 2 ** 30  # LensNet since-edit input; training always passes this value


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


@dataclasses.dataclass(frozen=True, eq=False)
class Runtime:
    """Everything static about a run (hashed by identity, so it is a jit static argument):
    configs and the NNX graph definitions of GistNet and LensNet."""

    cfg: DecodeConfig
    base_cfg: bm.LlamaConfig
    gist_graph: Any
    lens_graph: Any = None  # None unless policy == "lens"
    lens_incremental: bool = False
    lens_latent_shape: tuple = ()
    gist_dtype: str = "float32"
    cache_dtype: Any = jnp.float32

    @property
    def tcfg(self) -> tm.TreeConfig:
        return tm.TreeConfig(d=self.base_cfg.d_model, capacity_blocks=self.cfg.capacity_blocks,
                             depth=self.cfg.depth, block_size=self.cfg.block_size,
                             dtype=self.gist_dtype)


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
    return rt, nets


# ---------------------------------------------------------------------------------------------
# array state


@flax.struct.dataclass
class DecodeState:
    tree: tm.Tree
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
        tree=tm.init_tree(rt.tcfg),
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


# ---------------------------------------------------------------------------------------------
# pieces of the step (pure; used inside jit)


def _embed_fn(params):
    return lambda ids: bm.embed_tokens(params, ids)


def _head(params, bcfg: bm.LlamaConfig, h_D):
    head = params["embed"].T if bcfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("d,dv->v", h_D, head.astype(h_D.dtype),
                      preferred_element_type=jnp.float32)


def slot_keys(wc: wcm.WorkingContext, wcfg: wcm.WCConfig, S: int):
    """int32 [S]: content key of each slot: (first token shown) * 8 + level; -1 past the cost."""
    cum_E = jnp.cumsum(wc.cost_E)
    first_E = cum_E - wc.cost_E
    s = jnp.arange(S, dtype=jnp.int32)
    ent = jnp.clip(jnp.searchsorted(cum_E, s, side="right"), 0, wcfg.max_entries - 1)
    start_E, _ = wcm.entry_spans(wc, wcfg)
    lvl = wc.level_E[ent]
    tok = jnp.where(lvl == 0, start_E[ent] + s - first_E[ent], start_E[ent])
    return jnp.where(s < cum_E[-1], tok * 8 + lvl, -1).astype(jnp.int32)


def _materialised_inputs(rt: Runtime, params, state: DecodeState):
    """x [S, D], positions [S], sigma [S] or None, valid [S], keys [S], next position."""
    cfg, wcfg, S = rt.cfg, rt.cfg.wcfg, rt.cfg.cache_slots
    m = wcm.materialise_tree(state.wc, state.tree, _embed_fn(params), wcfg, cfg.position_mode)
    pad = S - wcfg.w_max
    x = jnp.pad(m.x_WxD, ((0, pad), (0, 0)))
    valid = jnp.pad(m.valid_W, (0, pad))
    pos = jnp.pad(m.pos_W, (0, pad))
    sigma = jnp.pad(m.sigma_W, (0, pad)) if cfg.rope_damping else None
    cost = state.wc.total_cost()
    if cfg.policy == "truncate":  # only raw tokens are visible; compact positions over them
        lvl_S = jnp.pad(state.wc.level_E[jnp.clip(m.slot_entry_W, 0)], (0, pad))
        valid = valid & (lvl_S == 0)
        pos = jnp.where(valid, jnp.cumsum(valid) - 1, 0).astype(jnp.int32)
        next_pos = jnp.sum(valid).astype(jnp.int32)
    elif cfg.position_mode == "compact":
        next_pos = cost
    else:
        next_pos = state.wc.num_tokens
    return x, pos, sigma, valid, slot_keys(state.wc, wcfg, S), next_pos


def gist_slots_of(key_S):
    """bool [S]: the slots holding a gist (level > 0 in the content key)."""
    return (key_S >= 0) & (key_S % 8 > 0)


def with_reader(base_params, gist_model):
    """The base parameters the runtime runs with: plus the GistNet's gist reader (key
    "gist_reader", applied at gist slots only) when it has one."""
    ad = gist_model.reader_adapter()
    return base_params if ad is None else {**base_params, "gist_reader": ad}


def _forward_chunk(rt: Runtime, params, x_SxD, pos_S, valid_S, sigma_S, gist_S, cache, start,
                   last, h_last):
    """Recompute the C cache slots [start, start + C) from the materialised inputs (attending to
    the valid cached slots before them; gist_S: where the gist reader applies); h_last takes the
    hidden state of slot `last` if the chunk holds it. -> (cache, h_last)."""
    C = rt.cfg.chunk
    sl = lambda a: jax.lax.dynamic_slice_in_dim(a, start, C)[None]  # noqa: E731
    ad = params.get("gist_reader")
    h, cache = bm.forward(params, rt.base_cfg, sl(x_SxD), sl(pos_S), valid_BxT=sl(valid_S),
                          sigma_BxT=None if sigma_S is None else sl(sigma_S), cache=cache,
                          cache_index=start, return_hidden=True, adapter=ad,
                          adapt_BxT=sl(gist_S))
    j = last - start
    h_last = jnp.where((j >= 0) & (j < C), h[0, jnp.clip(j, 0, C - 1)], h_last)
    return cache, h_last


def sync_cache(rt: Runtime, params, state: DecodeState):
    """Recompute the KV cache from the first slot whose content changed. -> (state, slots
    recomputed, next position)."""
    bcfg, C, S = rt.base_cfg, rt.cfg.chunk, rt.cfg.cache_slots
    x_SxD, pos_S, sigma_S, valid_S, key_S, next_pos = _materialised_inputs(rt, params, state)
    cost = state.wc.total_cost()
    s = jnp.arange(S, dtype=jnp.int32)
    differs = ((key_S != state.cache_key_S) | (s >= state.kv_len)) & (s < cost)
    f = jnp.where(jnp.any(differs), jnp.argmax(differs), cost).astype(jnp.int32)
    # the stored logit belongs to slot kv_len - 1: recompute the last slot if that is not cost-1
    f = jnp.where((f >= cost) & (state.kv_len != cost), jnp.maximum(cost - 1, 0), f)
    start0 = jnp.where(f >= cost, cost, (f // C) * C)  # chunk-aligned; nothing if unchanged
    cache = state.cache.replace(valid_BxS=state.cache.valid_BxS & (s < start0)[None])
    x_pad = jnp.pad(x_SxD, ((0, C), (0, 0)))
    pos_pad, valid_pad = jnp.pad(pos_S, (0, C)), jnp.pad(valid_S & (s < cost), (0, C))
    sig_pad = None if sigma_S is None else jnp.pad(sigma_S, (0, C))
    gist_pad = jnp.pad(gist_slots_of(key_S), (0, C))
    h0 = jnp.zeros((bcfg.d_model,), params["embed"].dtype)

    def cond(carry):
        return carry[0] < cost

    def body(carry):
        start, cache, h_last = carry
        cache, h_last = _forward_chunk(rt, params, x_pad, pos_pad, valid_pad, sig_pad, gist_pad,
                                       cache, start, cost - 1, h_last)
        return start + C, cache, h_last

    _, cache, h_last = jax.lax.while_loop(cond, body, (start0, cache, h0))
    recomputed = jnp.maximum(cost - start0, 0)
    logits = jnp.where(recomputed > 0, _head(params, bcfg, h_last), state.last_logits_V)
    state = state.replace(cache=cache, cache_key_S=jnp.where(s < cost, key_S, -1),
                          kv_len=cost, last_logits_V=logits,
                          total_recompute=state.total_recompute + recomputed)
    return state, recomputed.astype(jnp.int32), next_pos


def sync_cache_approx(rt: Runtime, params, state: DecodeState):
    """Approximate sync (global positions): reuse every cached row whose content key is still in
    the WC, moved to its new slot; recompute only the C-slot chunks that contain new content (and
    the chunk of the last slot if its logit is not the stored one). -> like `sync_cache`."""
    bcfg, C, S = rt.base_cfg, rt.cfg.chunk, rt.cfg.cache_slots
    x_SxD, pos_S, sigma_S, valid_S, key_S, next_pos = _materialised_inputs(rt, params, state)
    cost = state.wc.total_cost()
    s = jnp.arange(S, dtype=jnp.int32)
    # cached keys are strictly increasing over [0, kv_len) (WC order is temporal order)
    old_S = jnp.where(s < state.kv_len, state.cache_key_S, jnp.iinfo(jnp.int32).max)
    src_S = jnp.clip(jnp.searchsorted(old_S, key_S), 0, S - 1).astype(jnp.int32)
    hit_S = (old_S[src_S] == key_S) & (s < cost)
    last = jnp.maximum(cost - 1, 0)
    keep_last = hit_S[last] & (src_S[last] == state.kv_len - 1)
    miss_S = (s < cost) & (~hit_S | ((s == last) & ~keep_last))
    move = lambda a: jnp.take(a, src_S, axis=2)  # noqa: E731  [L, B, S, G, F]
    cache = bm.KVCache(k=move(state.cache.k), v=move(state.cache.v),
                       valid_BxS=(hit_S & ~miss_S)[None])
    n_chunks = S // C
    todo = miss_S.reshape(n_chunks, C).any(-1)
    j_idx = jnp.arange(n_chunks)
    next_chunk = lambda j: jnp.where(jnp.any(todo & (j_idx >= j)),  # noqa: E731
                                     jnp.argmax(todo & (j_idx >= j)), n_chunks)
    valid_S = valid_S & (s < cost)
    h0 = jnp.zeros((bcfg.d_model,), params["embed"].dtype)

    def body(carry):
        j, cache, h_last = carry
        cache, h_last = _forward_chunk(rt, params, x_SxD, pos_S, valid_S, sigma_S,
                                       gist_slots_of(key_S), cache, j * C, last, h_last)
        return next_chunk(j + 1), cache, h_last

    _, cache, h_last = jax.lax.while_loop(lambda c: c[0] < n_chunks, body,
                                          (next_chunk(0), cache, h0))
    recomputed = jnp.sum(todo * jnp.clip(cost - j_idx * C, 0, C)).astype(jnp.int32)
    logits = jnp.where(keep_last, state.last_logits_V, _head(params, bcfg, h_last))
    state = state.replace(cache=cache, cache_key_S=jnp.where(s < cost, key_S, -1),
                          kv_len=cost, last_logits_V=logits,
                          total_recompute=state.total_recompute + recomputed)
    return state, recomputed, next_pos


def _sync(rt: Runtime, params, state: DecodeState):
    if rt.cfg.kv_mode == "approx":
        return sync_cache_approx(rt, params, state)
    return sync_cache(rt, params, state)


def _teacher_block(rt: Runtime, params, state: DecodeState, ids_K, next_pos):
    K, bcfg = rt.cfg.block_size, rt.base_cfg
    c = state.wc.total_cost()
    pos_K = next_pos + jnp.arange(K, dtype=jnp.int32)
    logits_1xKxV, cache = bm.forward(params, bcfg, ids_K[None], pos_K[None], cache=state.cache,
                                     cache_index=c)
    pred_KxV = jnp.concatenate([state.last_logits_V[None], logits_1xKxV[0, :-1]], axis=0)
    nll_K = bm.token_nll(pred_KxV[None], ids_K[None])[0]
    return cache, logits_1xKxV[0, -1], ids_K, nll_K


def _sampled_block(rt: Runtime, params, state: DecodeState, ids_K, n_given, next_pos,
                   temperature, top_p):
    K, bcfg = rt.cfg.block_size, rt.base_cfg
    c = state.wc.total_cost()
    key = jax.random.fold_in(state.key, state.blocks)

    def body(j, carry):
        cache, logits_V, toks, nll = carry
        sampled = sample_token(logits_V[None], jax.random.fold_in(key, j), temperature, top_p)[0]
        tok = jnp.where(j < n_given, ids_K[j], sampled).astype(jnp.int32)
        nll = nll.at[j].set(-jax.nn.log_softmax(logits_V)[tok])
        out, cache = bm.forward(params, bcfg, tok[None, None], (next_pos + j)[None, None],
                                cache=cache, cache_index=c + j)
        return cache, out[0, 0], toks.at[j].set(tok), nll

    init = (state.cache, state.last_logits_V, jnp.zeros((K,), jnp.int32),
            jnp.zeros((K,), jnp.float32))
    cache, logits_V, toks, nll = jax.lax.fori_loop(0, K, body, init)
    return cache, logits_V, toks, nll


def _lens_scores(rt: Runtime, nets, state: DecodeState):
    """LensNet u [E] for the WC (open block masked), plus new latents."""
    wcfg, K = rt.cfg.wcfg, rt.cfg.block_size
    wc, tree = state.wc, state.tree
    lens = nnx.merge(rt.lens_graph, nets["lens"])
    vec_ExD = wcm.lens_inputs(wc, tree, wcfg)
    start_E, span_E = wcm.entry_spans(wc, wcfg)
    last_block = jnp.where(wc.level_E == 0, wc.node_E, (start_E + span_E - 1) // K)
    E = wcfg.max_entries
    mask = wc.valid_E & (jnp.arange(E) != wcm.open_index(wc))
    # training's distance: cursor block minus the entry's end block (exclusive)
    dist = jnp.maximum(wc.num_tokens // K - last_block - 1, 0)
    counts = tree.counts(K)
    top, lod1 = tree.gists[-1], tree.gists[0]
    n_top, n1 = counts[-1], counts[0]
    idx1 = n1 - 1 - jnp.arange(5)
    tail = jnp.concatenate([top[jnp.clip(n_top - 1, 0, top.shape[0] - 1)][None],
                            lod1[jnp.clip(idx1, 0, lod1.shape[0] - 1)]], axis=0)
    tail_mask = jnp.concatenate([(n_top > 0)[None], idx1 >= 0])
    prev = state.latents if rt.lens_incremental else None
    out = lens(vec_ExD.astype(jnp.float32), mask, level_xE=jnp.where(mask, wc.level_E, 0),
               span_xE=jnp.where(mask, span_E, 0), distance_xE=jnp.where(mask, dist, 0),
               since_edit_xE=jnp.full((E,), NEVER_EDITED, jnp.int32),
               tail_xUxD=tail.astype(jnp.float32), tail_mask_xU=tail_mask,
               prev_latents_xMxC=prev)
    latents = out.latents if rt.lens_incremental else state.latents
    return out.u, latents


def _ingest_and_refocus(rt: Runtime, params, nets, state: DecodeState, toks_K):
    """Append the finished block to the tree and the WC, then refocus. -> (state, log parts)."""
    cfg, wcfg, K = rt.cfg, rt.cfg.wcfg, rt.cfg.block_size
    gist_fn = lambda level, c: nnx.merge(rt.gist_graph, nets["gist"])(level, c)
    tree = tm.append_tokens(state.tree, toks_K, rt.tcfg, _embed_fn(params), gist_fn)
    wc = wcm.append(state.wc, K, wcfg)
    state = state.replace(tree=tree, wc=wc)
    if cfg.policy == "lens":
        u_E, latents = _lens_scores(rt, nets, state)
        wc, log = fm.allocate(wc, u_E, wcfg, cfg.focus, incoming=K)
        acts, cd, bb = log.num_actions(), log.cooldown_hits, log.budget_blocked
        state = state.replace(latents=latents)
    else:
        wc = fm.recency_step(wc, wcfg, incoming=K)
        acts, cd, bb = jnp.int32(-1), jnp.int32(0), jnp.int32(0)
    state = state.replace(wc=wc, blocks=state.blocks + 1,
                          total_actions=state.total_actions + jnp.maximum(acts, 0))
    return state, (acts.astype(jnp.int32), cd.astype(jnp.int32), bb.astype(jnp.int32))


def _info(state, toks_K, nll_K, recompute, parts):
    acts, cd, bb = parts
    wc = state.wc
    return StepInfo(tokens_K=toks_K, nll_K=nll_K, recompute=recompute, num_actions=acts,
                    cooldown_hits=cd, budget_blocked=bb, cost=wc.total_cost().astype(jnp.int32),
                    num_tokens=wc.num_tokens, level_E=wc.level_E, node_E=wc.node_E,
                    num_entries=wc.num_entries)


def block_step(rt: Runtime, params, nets, state: DecodeState, ids_K, n_given, temperature,
               top_p, *, teacher: bool):
    """One block: sync the cache, decode K tokens, ingest, refocus. Pure (jit it).

    teacher: one K-token forward of ids_K (n_given ignored); else K sampled tokens, the first
    n_given of which are forced to ids_K. Requires an aligned cursor (num_tokens % K == 0).
    """
    state, recompute, next_pos = _sync(rt, params, state)
    if teacher:
        cache, logits, toks, nll = _teacher_block(rt, params, state, ids_K, next_pos)
    else:
        cache, logits, toks, nll = _sampled_block(rt, params, state, ids_K, n_given, next_pos,
                                                  temperature, top_p)
    K = rt.cfg.block_size
    c = state.wc.total_cost()
    keys = (state.wc.num_tokens + jnp.arange(K, dtype=jnp.int32)) * 8
    state = state.replace(
        cache=cache, last_logits_V=logits, kv_len=c + K,
        cache_key_S=jax.lax.dynamic_update_slice(state.cache_key_S, keys, (c,)))
    nll = jnp.where((state.wc.num_tokens + jnp.arange(K)) == 0, 0.0, nll)
    state, parts = _ingest_and_refocus(rt, params, nets, state, toks)
    return state, _info(state, toks, nll, recompute, parts)


def ingest_blocks(rt: Runtime, params, nets, state: DecodeState, ids_NxK, valid_N):
    """Ingest N whole blocks without running the base model (tree + WC + refocus per block);
    blocks with valid_N False are skipped. -> (state, StepInfo stacked over N)."""
    K = rt.cfg.block_size

    def one(state, xs):
        ids_K, ok = xs

        def run(state):
            st, parts = _ingest_and_refocus(rt, params, nets, state, ids_K)
            return st, _info(st, ids_K, jnp.zeros((K,), jnp.float32), jnp.int32(0), parts)

        def skip(state):
            z = jnp.int32(0)
            return state, _info(state, ids_K, jnp.zeros((K,), jnp.float32), z, (z, z, z))

        return jax.lax.cond(ok, run, skip, state)

    return jax.lax.scan(one, state, (ids_NxK, valid_N))


TRACES = {"step": 0, "ingest": 0, "sync": 0, "oracle": 0}


@functools.partial(jax.jit, static_argnames=("rt", "teacher"), donate_argnames=("state",))
def jit_step(rt, params, nets, state, ids_K, n_given, temperature, top_p, teacher):
    TRACES["step"] += 1
    return block_step(rt, params, nets, state, ids_K, n_given, temperature, top_p,
                      teacher=teacher)


@functools.partial(jax.jit, static_argnames=("rt",), donate_argnames=("state",))
def jit_ingest(rt, params, nets, state, ids_NxK, valid_N):
    TRACES["ingest"] += 1
    return ingest_blocks(rt, params, nets, state, ids_NxK, valid_N)


@functools.partial(jax.jit, static_argnames=("rt",), donate_argnames=("state",))
def jit_sync(rt, params, state):
    TRACES["sync"] += 1
    state, recompute, next_pos = _sync(rt, params, state)
    return state, recompute, next_pos


def check_state(state: DecodeState, rt: Runtime) -> DecodeState:
    """Host side: raise the tree's / WC's sticky errors (mc_jax.errors types)."""
    tm.check_tree(state.tree, rt.tcfg)
    wcm.check_wc(state.wc, rt.cfg.wcfg)
    return state


# ---------------------------------------------------------------------------------------------
# networks and the Session driver (host)


def _bucket_blocks(n: int) -> int:
    b = 64
    while b < n:
        b *= 2
    return b


class Session:
    """A host driver over the jitted step for one base model, networks and budget.

    Keeps one DecodeState; `feed` streams token ids (teacher forced or ingest-only), `generate`
    samples. Compiles once per (budget, capacity, policy).
    """

    def __init__(self, base_model, budget: int, gist_model, lens_model=None, *,
                 policy: str = "lens", capacity_tokens: int = 1 << 16, depth=None,
                 position_mode="compact", rope_damping=False, chunk: int = 64,
                 focus: fm.FocusConfig | None = None, seed: int = 0, kv_mode: str = "exact"):
        self.model = base_model
        depth = depth or gist_model.config.depth
        K = 32
        need = -(-int(capacity_tokens) // K)
        cap = _bucket_blocks(need)
        kw = dict(budget=int(budget), depth=depth, policy=policy, position_mode=position_mode,
                  rope_damping=rope_damping, chunk=chunk, focus=focus or fm.FocusConfig(),
                  kv_mode=kv_mode)
        try:
            cfg = DecodeConfig(capacity_blocks=cap, **kw)
        except ConfigError:
            cfg = DecodeConfig(capacity_blocks=need, **kw)  # exact capacity, or the real error
        self.rt, self.nets = make_runtime(cfg, base_model.cfg, gist_model, lens_model,
                                          cache_dtype=base_model.params["embed"].dtype)
        self.params = with_reader(base_model.params, gist_model)
        self.seed = seed
        self.reset()

    @property
    def cfg(self) -> DecodeConfig:
        return self.rt.cfg

    def reset(self):
        self.state = init_state(self.rt, self.seed)
        self.ids: list[int] = []

    def _check_room(self, n_more: int):
        cap = self.cfg.capacity_tokens
        if len(self.ids) + n_more > cap:
            raise CapacityError(
                f"{len(self.ids) + n_more} tokens exceed the tree's capacity of {cap} tokens "
                f"(budget {self.cfg.budget}, depth {self.cfg.depth}); shorten the input or "
                "create the session with a larger capacity_tokens")

    def _ids(self, ids) -> np.ndarray:
        arr = bm.check_token_ids(ids, self.model.cfg).reshape(-1)
        return arr

    def ingest(self, ids, on_block=None, progress=None) -> None:
        """Ingest whole blocks without the base model (len(ids) % K == 0, aligned cursor)."""
        K, N = self.cfg.block_size, INGEST_BLOCKS
        ids = self._ids(ids)
        if len(ids) % K or len(self.ids) % K:
            raise ValueError("ingest takes whole blocks at a block boundary")
        self._check_room(len(ids))
        blocks = ids.reshape(-1, K)
        for i in range(0, len(blocks), N):
            part = blocks[i:i + N]
            n = len(part)
            pad = np.zeros((N, K), np.int32)
            pad[:n] = part
            self.state, info = jit_ingest(self.rt, self.params, self.nets, self.state,
                                          jnp.asarray(pad), jnp.asarray(np.arange(N) < n))
            self.ids.extend(part.reshape(-1).tolist())
            if on_block is not None:
                info = jax.device_get(info)
                for j in range(n):
                    on_block(jax.tree.map(lambda a: a[j], info))
            if progress is not None:
                progress(n * K)
        check_state(self.state, self.rt)

    def step(self, ids_K=None, n_given: int = 32, *, teacher: bool = True,
             temperature: float = 0.0, top_p: float = 1.0) -> StepInfo:
        K = self.cfg.block_size
        self._check_room(K)
        ids = np.zeros((K,), np.int32)
        if ids_K is not None:
            given = self._ids(ids_K)
            ids[:len(given)] = given
        self.state, info = jit_step(self.rt, self.params, self.nets, self.state,
                                    jnp.asarray(ids), jnp.int32(n_given),
                                    jnp.float32(temperature), jnp.float32(top_p),
                                    teacher=teacher)
        info = jax.device_get(info)
        self.ids.extend(np.asarray(info.tokens_K).tolist())
        check_state(self.state, self.rt)
        return info

    def sync(self) -> int:
        self.state, rec, _ = jit_sync(self.rt, self.params, self.state)
        return int(rec)


# ---------------------------------------------------------------------------------------------
# evaluator policies (docs/results.md contract)


class MegaContextPolicy:
    """nll_stream / answer over a Session (policies recency, meanpool, lens; `OraclePolicy`
    scores each block its own way through `_score_block`)."""

    def __init__(self, name, base_model, budget, gist_model, lens_model, policy, **kw):
        self.name, self.budget, self.model = name, int(budget), base_model
        self._gist, self._lens, self._policy, self._kw = gist_model, lens_model, policy, kw
        self._sessions: dict[int, Session] = {}
        self._stats = {"blocks": 0, "actions": 0, "recompute": 0}

    def _session(self, n_tokens: int) -> Session:
        cap = _bucket_blocks(-(-n_tokens // 32) + 2) * 32
        if cap not in self._sessions:
            self._sessions[cap] = Session(self.model, self.budget, self._gist, self._lens,
                                          policy=self._policy, capacity_tokens=cap, **self._kw)
        s = self._sessions[cap]
        s.reset()
        return s

    def nll_stream(self, ids_N, blocks: Sequence[int] | None = None) -> np.ndarray:
        from mc_jax.eval.policies.registry import check_blocks

        ids = bm.check_token_ids(ids_N, self.model.cfg).reshape(-1)
        blocks = check_blocks(ids, blocks)
        if not blocks:
            return np.zeros((0, 32), np.float32)
        s = self._session(len(ids))
        want = sorted(set(blocks))
        out: dict[int, np.ndarray] = {}
        b = 0
        for w in want:
            if w > b:
                s.ingest(ids[32 * b:32 * w])
                b = w
            out[w] = self._score_block(s, ids[32 * w:32 * w + 32])
            b = w + 1
        self._end_stream(s)
        return np.stack([out[w] for w in blocks])

    def _score_block(self, s: Session, ids_K) -> np.ndarray:
        """NLL [K] of the next block, teacher forced; advances the session past it."""
        info = s.step(ids_K, teacher=True)
        self._stats["recompute"] += int(info.recompute)
        return np.asarray(info.nll_K, np.float32)

    def _end_stream(self, s: Session) -> None:
        self._stats["blocks"] += int(s.state.blocks)
        self._stats["actions"] += int(s.state.total_actions)

    def answer(self, history_ids, question_ids, max_new_tokens: int) -> str:
        ids = bm.check_token_ids(history_ids, self.model.cfg).reshape(-1)
        q = bm.check_token_ids(list(question_ids), self.model.cfg).reshape(-1)
        s = self._session(len(ids) + 32)
        n_full = len(ids) // 32 * 32
        s.ingest(ids[:n_full])
        try:
            return answer_after_wc(s, ids[n_full:], q, max_new_tokens)
        except CapacityError as e:
            from mc_jax.eval.policies.registry import NotApplicable

            raise NotApplicable(str(e)) from e

    def stats(self) -> dict:
        return dict(self._stats)


# ---------------------------------------------------------------------------------------------
# oracle focus: the best single expansion, found by measuring every candidate on the scored block


def oracle_wc(wc: wcm.WorkingContext, e, wcfg: wcm.WCConfig, incoming: int = 32):
    """The WC with entry e expanded (LOD1 -> its raw block; LOD2 -> its K LOD1 gists), after
    collapsing the oldest collapsible raw blocks that the expansion needs room for (at most two;
    room means cost + K - 1 + incoming <= W). Collapsing a raw block keeps the entry count, so e
    still names the same entry. -> (wc, ok); ok False (wc unchanged apart from those collapses)
    when e is not expandable or no room can be made."""
    K = wcfg.block_size

    def collapse_oldest(_, w):
        need = w.total_cost() + (K - 1) + incoming > wcfg.w_max
        cb = wcm.collapsible_block(w, wcfg)
        out, _ = wcm.splice(w, jnp.where(need & jnp.any(cb), wcm.COLLAPSE, 0), jnp.argmax(cb),
                            wcfg, fresh_age=0)
        return out

    ok = wcm.expandable(wc, wcfg)[e]
    wc2 = jax.lax.fori_loop(0, 2, collapse_oldest, wc)
    ok = ok & (wc2.total_cost() + (K - 1) + incoming <= wcfg.w_max)
    out, _ = wcm.splice(wc2, jnp.where(ok, wcm.EXPAND, 0), e, wcfg, fresh_age=0)
    return out, ok


def block_nll_under(rt: Runtime, params, state: DecodeState, wc, ids_K):
    """Teacher-forced NLL [K] of the block ids_K right after the working context `wc` (over the
    state's tree): one uncached forward of [materialised wc || block], the block at slots
    [S, S + K) with positions continuing the WC's. With wc = state.wc this is what `block_step`
    computes through the cache."""
    S, K = rt.cfg.cache_slots, rt.cfg.block_size
    st = state.replace(wc=wc)
    x, pos, sigma, valid, key, next_pos = _materialised_inputs(rt, params, st)
    emb = bm.embed_tokens(params, ids_K).astype(x.dtype)
    x = jnp.concatenate([x, emb])
    pos = jnp.concatenate([pos, next_pos + jnp.arange(K, dtype=pos.dtype)])
    valid = jnp.concatenate([valid, jnp.ones((K,), bool)])
    gist = jnp.concatenate([gist_slots_of(key), jnp.zeros((K,), bool)])
    if sigma is not None:
        sigma = jnp.concatenate([sigma, jnp.zeros((K,), sigma.dtype)])[None]
    h, _ = bm.forward(params, rt.base_cfg, x[None], pos[None], valid_BxT=valid[None],
                      sigma_BxT=sigma, return_hidden=True, adapter=params.get("gist_reader"),
                      adapt_BxT=gist[None])
    last = jnp.clip(wc.total_cost() - 1, 0, S - 1)  # the last WC slot predicts token 0
    rows_KxD = jnp.concatenate([h[0, last][None], h[0, S:S + K - 1]])
    logits_KxV = jax.vmap(lambda r: _head(params, rt.base_cfg, r))(rows_KxD)
    return bm.token_nll(logits_KxV[None], ids_K[None])[0]


@functools.partial(jax.jit, static_argnames=("rt",))
def jit_oracle_candidate(rt, params, state, ids_K, e):
    """(NLL [K] of ids_K after the WC with entry e expanded, ok, that WC)."""
    TRACES["oracle"] += 1
    wc, ok = oracle_wc(state.wc, e, rt.cfg.wcfg, incoming=rt.cfg.block_size)
    return block_nll_under(rt, params, state, wc, ids_K), ok, wc


class OraclePolicy(MegaContextPolicy):
    """The evaluator's `oracle`: an upper bound for one expansion per block (SPEC section 4).

    Before each scored block, on the recency policy's WC: every expandable entry is expanded in
    turn (`oracle_wc`: the oldest raw blocks are collapsed first when room is needed), the
    block's NLL under each candidate WC is measured with the frozen base (`block_nll_under`),
    and the block is scored under the best of them or under the unchanged WC, whichever has
    the lower mean NLL. It reads the tokens it scores, so it bounds what a LensNet choosing one
    expansion per block could gain; it is not a runnable policy. The choice is not carried to
    the next block (the WC returns to recency), and `answer` is not applicable. Cost: one
    forward of W + K tokens per expandable entry per scored block.

    The minimum over ~20 candidates measured on the same 32 tokens is also biased low by chance.
    `stats()["heldout_gain_nats"]` separates the two: the candidate (or the unchanged WC) is
    chosen by the block's first 16 tokens and the gain over recency is counted on the last 16
    only (`heldout_tokens` of them).
    """

    def __init__(self, base_model, budget, gist_model, **kw):
        super().__init__("oracle", base_model, budget, gist_model, None, "recency", **kw)
        self._stats = {"blocks": 0, "candidates": 0, "expanded": 0, "gain_nats": 0.0,
                       "heldout_gain_nats": 0.0, "heldout_tokens": 0}

    def _score_block(self, s: Session, ids_K) -> np.ndarray:
        blk = jnp.asarray(ids_K)
        cands = np.flatnonzero(np.asarray(wcm.expandable(s.state.wc, s.cfg.wcfg)))
        tried = []
        for e in cands:
            nll, ok, _ = jit_oracle_candidate(s.rt, s.params, s.state, blk, jnp.int32(e))
            if bool(ok):
                tried.append(np.asarray(nll, np.float32))
        # the unchanged WC (recency's own score), which also moves the session past the block
        base = np.asarray(s.step(ids_K, teacher=True).nll_K, np.float32)
        best = min(tried, key=np.mean, default=None)
        pick = best is not None and best.mean() < base.mean()
        out = best if pick else base
        self._stats["blocks"] += 1
        self._stats["candidates"] += len(cands)
        self._stats["expanded"] += int(pick)
        self._stats["gain_nats"] += float(base.sum() - out.sum())
        # the minimum over ~20 candidates on the very tokens it is scored on is biased low by
        # chance alone; choosing on the block's first half and scoring the second half is not
        h = len(base) // 2
        first = min([base] + tried, key=lambda n: float(np.mean(n[:h])))
        self._stats["heldout_gain_nats"] += float(base[h:].sum() - first[h:].sum())
        self._stats["heldout_tokens"] += len(base) - h
        return out

    def _end_stream(self, s: Session) -> None:  # its counters are per scored block
        pass

    def answer(self, history_ids, question_ids, max_new_tokens: int) -> str:
        from mc_jax.eval.policies.registry import NotApplicable

        raise NotApplicable("the oracle picks its focus by the NLL of the tokens it scores; it "
                            "does not know an answer's tokens in advance")


@functools.partial(jax.jit, static_argnames=("rt",))
def _wc_inputs(rt, params, state):
    x, pos, sigma, valid, key, next_pos = _materialised_inputs(rt, params, state)
    sigma = jnp.zeros(pos.shape, jnp.float32) if sigma is None else sigma
    return x, pos, sigma, valid, gist_slots_of(key), next_pos


def answer_after_wc(s: Session, tail_ids, question_ids, max_new_tokens: int) -> str:
    """Greedy answer after [WC of the ingested history || tail (partial block) || question];
    the tail and question sit outside the budget, in a fresh cache sized to fit."""
    from mc_jax.base import sampling

    model, rt = s.model, s.rt
    x_SxD, pos_S, sig_S, valid_S, gist_S, next_pos = jax.device_get(
        _wc_inputs(rt, s.params, s.state))
    cost = int(np.sum(np.asarray(valid_S))) if rt.cfg.policy == "truncate" else int(
        s.state.wc.total_cost())
    if rt.cfg.policy == "truncate":
        sel = np.asarray(valid_S)
        x, pos, sig = np.asarray(x_SxD)[sel], np.asarray(pos_S)[sel], np.asarray(sig_S)[sel]
        gist = np.asarray(gist_S)[sel]
    else:
        x, pos, sig = (np.asarray(x_SxD)[:cost], np.asarray(pos_S)[:cost],
                       np.asarray(sig_S)[:cost])
        gist = np.asarray(gist_S)[:cost]
    extra = np.concatenate([np.asarray(tail_ids, np.int32), np.asarray(question_ids, np.int32)])
    emb = np.asarray(bm.embed_tokens(s.params, jnp.asarray(extra))) if len(extra) else \
        np.zeros((0, x.shape[1]), x.dtype)
    p0 = int(next_pos)
    x = np.concatenate([x, emb.astype(x.dtype)])
    pos = np.concatenate([pos, p0 + np.arange(len(extra))]).astype(np.int32)
    P = len(x)
    if P == 0:
        raise InputError("nothing to answer from: the history and the question are empty")
    T = -(-P // 256) * 256  # few prompt shapes, so few compiles across a sweep
    size = T + -(-max_new_tokens // 64) * 64
    if size > model.cfg.max_seq_len:
        raise CapacityError(f"WC ({cost}) + question ({len(extra)}) + {max_new_tokens} new "
                            f"tokens exceed the base model's context {model.cfg.max_seq_len}")
    xp = np.zeros((1, T, x.shape[1]), x.dtype)
    xp[0, :P] = x
    pp = np.zeros((1, T), np.int32)
    pp[0, :P] = pos
    ss = np.zeros((1, T), np.float32)
    ss[0, :len(sig)] = sig
    gg = np.zeros((1, T), bool)
    gg[0, :len(gist)] = gist
    valid = np.arange(T)[None] < P
    cache = bm.init_cache(model.cfg, 1, size, s.params["embed"].dtype)
    logits, cache = _prefill_embeds(s.params, model.cfg, cache, jnp.asarray(xp),
                                    jnp.asarray(pp), jnp.asarray(ss), jnp.asarray(valid),
                                    jnp.asarray(gg))
    tok = jnp.argmax(logits[:, P - 1], axis=-1).astype(jnp.int32)
    stops = _stop_ids(model)
    out = []
    next_p = p0 + len(extra)
    for i in range(max_new_tokens):
        t = int(tok[0])
        if t in stops:
            break
        out.append(t)
        if i == max_new_tokens - 1:
            break
        tok, cache = _decode_at(s.params, model.cfg, cache, tok, jnp.int32(T + i),
                                jnp.int32(next_p + i))
    return model.tokenizer.decode(out)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _prefill_embeds(params, cfg, cache, x_1xTxD, pos_1xT, sigma_1xT, valid_1xT, gist_1xT):
    ad = params.get("gist_reader")
    return bm.forward(params, cfg, x_1xTxD, pos_1xT, valid_BxT=valid_1xT, sigma_BxT=sigma_1xT,
                      cache=cache, cache_index=0, adapter=ad, adapt_BxT=gist_1xT)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _decode_at(params, cfg, cache, tok_B, slot, pos):
    logits, cache = bm.forward(params, cfg, tok_B[:, None], jnp.full((1, 1), pos, jnp.int32),
                               cache=cache, cache_index=slot)
    return jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32), cache


def _stop_ids(model) -> set:
    stops = set()
    if model.cfg.eos_id is not None:
        stops.add(int(model.cfg.eos_id))
    tok = getattr(model.tokenizer, "token_to_id", None)
    if tok is not None:
        try:
            i = tok("<|endoftext|>")
        except Exception:  # byte tokenizers have no special tokens
            i = None
        if i is not None:
            stops.add(int(i))
    return stops


def make_policy(name: str, base_model, budget: int, checkpoint=None, **kw):
    """The evaluator's MegaContext policies (docs/results.md).

    recency: GistNet gists (trained; MissingResourceError without them), recency focus.
    meanpool: mean-pool gists (no training needed), recency focus.
    lens: GistNet gists + LensNet focus (trained networks needed).
    oracle: GistNet gists (trained), recency focus plus the best single expansion per scored
      block, measured on that block (`OraclePolicy`; an upper bound, ppl/cost only).
    kw: position_mode, rope_damping, chunk, depth, seed (Session arguments).
    """
    if name not in ("recency", "meanpool", "lens", "oracle"):
        raise NotImplementedError(f"unknown MegaContext policy {name!r}")
    def check_budget(depth):
        try:
            wcm.WCConfig(w_max=int(budget), depth=depth)
        except ConfigError as e:
            from mc_jax.eval.policies.registry import NotApplicable

            raise NotApplicable(f"budget {budget}: {e}") from e

    if name == "meanpool":
        check_budget(kw.get("depth", 2))
        gist, _, info = load_nets(base_model, None, need_trained=False, meanpool=True,
                                  depth=kw.get("depth", 2))
        return MegaContextPolicy(name, base_model, budget, gist, None, "recency", **kw)
    gist, lens, info = load_nets(base_model, checkpoint, need_trained=True)
    check_budget(gist.config.depth)
    tc = info.get("train_config", {})
    kw.setdefault("position_mode", tc.get("position_mode", "compact"))
    kw.setdefault("rope_damping", bool(tc.get("rope_damping", False)))
    if name == "oracle":
        return OraclePolicy(base_model, budget, gist, **kw)
    pol = "lens" if name == "lens" else "recency"
    return MegaContextPolicy(name, base_model, budget, gist, lens if pol == "lens" else None,
                             pol, **kw)


# ---------------------------------------------------------------------------------------------
# --show-focus and telemetry (host)


def focus_changes(old, new, K: int = 32):
    """Spans whose level changed between two WCs: [(kind, first token, end, old lvl, new lvl)].

    old/new: [(level, node)] entry lists. Entries beyond the old cursor (the new block) are
    ignored. Adjacent new entries of one level that replaced the same kind of span merge.
    """
    def spans(entries):
        out = {}
        for lvl, node in entries:
            u = K ** max(lvl, 1)
            out[(lvl, node)] = (node * u, (node + 1) * u)
        return out

    so, sn = spans(old), spans(new)
    end_old = max((e for _, e in so.values()), default=0)
    gone = {k: v for k, v in so.items() if k not in sn}
    came = sorted((v, k) for k, v in sn.items() if k not in so and v[1] <= end_old)
    changes = []
    for (a, b), (lvl, _) in came:
        olds = [ol for (ol, _), (oa, ob) in gone.items() if oa < b and ob > a]
        if not olds:
            continue
        ol = olds[0]
        kind = "expand" if lvl < ol else "collapse"
        if changes and changes[-1][0] == kind and changes[-1][2] == a and \
                changes[-1][3] == ol and changes[-1][4] == lvl and (kind == "expand" or lvl == 0):
            changes[-1] = (kind, changes[-1][1], b, ol, lvl)
        else:
            changes.append((kind, a, b, ol, lvl))
    return changes


def _entries(info) -> list[tuple[int, int]]:
    n = int(info.num_entries)
    return list(zip(np.asarray(info.level_E)[:n].tolist(), np.asarray(info.node_E)[:n].tolist()))


def _excerpt(tokenizer, ids, a, b, n=8) -> str:
    t = tokenizer.decode([int(i) for i in ids[a:min(b, a + n)]])
    return " ".join(t.split())[:40]


class FocusPrinter:
    """Turns successive StepInfos into --show-focus lines and telemetry rows."""

    def __init__(self, session: Session, show: bool, telemetry=None, out=None):
        self.s, self.show, self._out = session, show, out
        self.prev = None
        self.tele = open(telemetry, "w") if telemetry else None
        self.t_last = time.perf_counter()
        self.rows = []

    def __call__(self, info, phase: str = "ingest"):
        now = time.perf_counter()
        entries = _entries(info)
        changes = focus_changes(self.prev, entries) if self.prev is not None else []
        self.prev = entries
        acts = int(info.num_actions)
        if acts < 0:
            acts = len(changes)
        row = dict(block=int(info.num_tokens) // 32 - 1, phase=phase,
                   history=int(info.num_tokens), actions=acts, budget_used=int(info.cost),
                   budget=self.s.cfg.budget, cooldown_hits=int(info.cooldown_hits),
                   budget_blocked=int(info.budget_blocked),
                   kv_recompute=int(info.recompute), nll=float(np.mean(info.nll_K))
                   if phase == "score" else None, seconds=now - self.t_last)
        self.t_last = now
        self.rows.append(row)
        if self.tele:
            self.tele.write(json.dumps(row) + "\n")
        if self.show and changes:
            tok = self.s.model.tokenizer
            parts = [f"{k} [{a},{b}) L{o}->L{n} \"{_excerpt(tok, self.s.ids, a, b)}\""
                     for k, a, b, o, n in changes[:4]]
            more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
            print(f"[focus] block {row['block']} @ {row['history']} tok, WC {row['budget_used']}"
                  f"/{row['budget']}: " + "; ".join(parts) + more, file=self._out or sys.stderr)

    def header(self, **kw):
        if self.tele:
            self.tele.write(json.dumps(dict(kind="header", **kw)) + "\n")

    def close(self):
        if self.tele:
            self.tele.close()

    def summary(self) -> dict:
        r = self.rows
        n = max(len(r), 1)
        return dict(blocks=len(r),
                    actions_per_block=sum(x["actions"] for x in r) / n,
                    budget_used_mean=sum(x["budget_used"] for x in r) / n,
                    seconds_per_block=sum(x["seconds"] for x in r) / n)


def time_networks(session: Session, reps: int = 5) -> dict:
    """GistNet (one block) and LensNet (the current WC) time per call, as separate jitted calls
    (inside the step they are fused)."""
    rt, nets = session.rt, session.nets
    gist = jax.jit(lambda n, x: nnx.merge(rt.gist_graph, n["gist"])(1, x))
    x = jnp.zeros((1, 32, rt.base_cfg.d_model), jnp.float32)
    out = {}

    def clock(f, *a):
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(f(*a))
        return (time.perf_counter() - t0) / reps

    out["gistnet_s_per_call"] = clock(gist, nets, x)
    if rt.lens_graph is not None:
        lens = jax.jit(lambda n, st: _lens_scores(rt, n, st)[0])
        out["lensnet_s_per_call"] = clock(lens, nets, session.state)
    else:
        out["lensnet_s_per_call"] = None
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def _session_for_cli(args, model, n_tokens: int, log):
    policy = getattr(args, "policy", "lens") or "lens"
    need = policy == "lens" and args.checkpoint is not None
    gist, lens, info = load_nets(model, args.checkpoint, need_trained=need,
                                 log=log)
    if lens is None and policy == "lens":
        policy = "recency"
    tc = info.get("train_config", {})
    kv_mode = getattr(args, "kv_mode", None) or "exact"
    pos_mode = (getattr(args, "position_mode", None)
                or ("global" if kv_mode == "approx" else tc.get("position_mode", "compact")))
    s = Session(model, args.budget or 1024, gist, lens, policy=policy,
                capacity_tokens=n_tokens, position_mode=pos_mode,
                rope_damping=bool(tc.get("rope_damping", False)), kv_mode=kv_mode)
    log(f"[mc-jax] policy {policy}, budget {s.cfg.budget}, depth {s.cfg.depth}, tree capacity "
        f"{s.cfg.capacity_tokens} tokens, positions {pos_mode}, KV {kv_mode}, networks: "
        f"{info.get('checkpoint') or 'mean-pool'}")
    return s


def _progress(total: int, desc: str):
    try:
        from tqdm import tqdm

        bar = tqdm(total=total, desc=desc, unit="tok", file=sys.stderr, mininterval=1.0)
        return bar.update, bar.close
    except ImportError:
        return (lambda n: None), (lambda: None)


def generate_cli(args) -> int:
    """mc-jax generate --input FILE [--question Q] [--budget W] [--show-focus] ..."""
    from mc_jax.base.loading import load_base
    from mc_jax.base.perplexity import read_text
    from mc_jax.base.sampling import stream_text

    log = lambda m: print(m, file=sys.stderr, flush=True)
    if args.input:
        text = read_text(args.input)
    elif args.prompt is not None:
        text = args.prompt
    else:
        raise InputError("give --input FILE (a long history) or --prompt TEXT")
    if args.question:
        text = text.rstrip() + f"\n\nQuestion: {args.question}\nAnswer:"
    if not text.strip():
        raise InputError("the prompt is empty")
    model = load_base(args.base, dtype=args.dtype)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if len(ids) == 0:
        raise InputError("the input tokenises to nothing")
    n_new = int(args.max_new_tokens)
    s = _session_for_cli(args, model, len(ids) + n_new + 64, log)
    fp = FocusPrinter(s, args.show_focus, args.telemetry)
    if args.telemetry:
        fp.header(**time_networks(s), budget=s.cfg.budget, policy=s.cfg.policy)
    K = 32
    n_full = (len(ids) // K) * K
    t0 = time.perf_counter()
    update, close = _progress(n_full, "ingest")
    s.ingest(ids[:n_full], on_block=fp, progress=update)
    close()
    t_ingest = time.perf_counter() - t0
    log(f"[mc-jax] ingested {n_full} tokens in {t_ingest:.1f}s "
        f"({n_full / max(t_ingest, 1e-9):.0f} tok/s, includes compile)")
    tail = ids[n_full:]
    stops = _stop_ids(model)
    done = [False]

    def tokens():
        given, produced = tail, 0
        while produced < n_new:
            info = s.step(given, n_given=len(given), teacher=False,
                          temperature=args.temperature, top_p=args.top_p)
            fp(info, phase="generate")
            new = np.asarray(info.tokens_K)[len(given):].tolist()
            given = np.zeros((0,), np.int32)
            for t in new:
                if t in stops or produced >= n_new:
                    return
                produced += 1
                yield t

    t1 = time.perf_counter()
    if not args.show_focus:
        sys.stdout.write(text[-200:] if args.input else text)
    out = stream_text(model.tokenizer, tokens(), lambda x: (sys.stdout.write(x),
                                                             sys.stdout.flush()))
    sys.stdout.write("\n")
    t_gen = time.perf_counter() - t1
    summ = fp.summary()
    fp.close()
    log(f"[mc-jax] summary: history {len(s.ids)} tokens, WC budget used "
        f"{int(s.state.wc.total_cost())}/{s.cfg.budget} (mean {summ['budget_used_mean']:.0f}), "
        f"{summ['actions_per_block']:.2f} actions/block over {summ['blocks']} blocks, "
        f"{t_ingest / max(n_full // K, 1) * 1e3:.0f} ms/block ingest, "
        f"{t_gen / max(-(-(len(out) + len(tail)) // K), 1):.2f} s/block generate "
        f"({len(out)} tokens)")
    return 0


def score_cli(args) -> int:
    """mc-jax score --input FILE: teacher-forced streaming NLL under MegaContext."""
    from mc_jax.base.loading import load_base
    from mc_jax.base.perplexity import read_text

    log = lambda m: print(m, file=sys.stderr, flush=True)
    text = read_text(args.input)
    model = load_base(args.base, dtype=args.dtype)
    ids = np.asarray(model.tokenizer.encode(text), np.int32)
    if args.max_tokens:
        ids = ids[:args.max_tokens]
    K = 32
    n = len(ids) // K * K
    if n < 2 * K:
        raise InputError(f"{args.input}: {len(ids)} tokens; scoring needs at least {2 * K}")
    ids = ids[:n]
    s = _session_for_cli(args, model, n + 64, log)
    fp = FocusPrinter(s, False, args.telemetry)
    if args.telemetry:
        fp.header(**time_networks(s), budget=s.cfg.budget, policy=s.cfg.policy)
    nlls = []
    update, close = _progress(n, "score")
    for b in range(n // K):
        info = s.step(ids[b * K:(b + 1) * K], teacher=True)
        fp(info, phase="score")
        update(K)
        if b >= 1:
            nll = float(np.mean(info.nll_K))
            nlls.append(np.asarray(info.nll_K))
            if not args.json:
                print(f"block {b}: nll {nll:.4f} ppl {math.exp(nll):.3f} "
                      f"WC {int(info.cost)}/{s.cfg.budget}")
    close()
    fp.close()
    mean = float(np.mean(np.concatenate(nlls)))
    summ = fp.summary()
    res = dict(tokens=int(n), scored=int(len(nlls) * K), nll=mean, perplexity=math.exp(mean),
               policy=s.cfg.policy, budget=s.cfg.budget, blocks=int(n // K),
               actions_per_block=summ["actions_per_block"],
               seconds_per_block=summ["seconds_per_block"], input=str(args.input),
               position_mode=s.cfg.position_mode, kv_mode=s.cfg.kv_mode,
               kv_recompute_slots_per_block=float(s.state.total_recompute) / max(n // K, 1))
    print(f"tokens {n}  perplexity {res['perplexity']:.4f}  policy {res['policy']}  "
          f"budget {res['budget']}", file=sys.stderr)
    print(json.dumps(res))
    return 0
