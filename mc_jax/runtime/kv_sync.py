"""KV-cache sync: bring the runtime's cache up to date with its working context (WC).

The cache holds the materialised WC in slots [0, cost). Every slot carries a content key (first
token of what it shows * 8 + level); the first slot whose key differs from the WC's (or lies past
the cached length) is the first changed slot f, and only [f, cost) is recomputed, in fixed chunks
of C slots under `lax.while_loop` (start rounded down to a multiple of C). This is exact: a slot's
keys/values depend only on the slots at or before it, and a slot's position is a function of the
content before it (compact) or of its own content (global). `sync_cache_approx` (kv_mode
"approx", global positions) instead moves the cached rows of unchanged entries to their new slots
and recomputes only the chunks that hold new content.

Letters: K block size, W WC budget, S cache slots (W rounded up to C), C recompute chunk,
E entry rows (W + 1), V vocab, D d_model.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mc_jax.base import base_model as bm
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.runtime.state import DecodeState, Runtime


def embed_fn(params):
    return lambda ids: bm.embed_tokens(params, ids)


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


def gist_slots_of(key_S):
    """bool [S]: the slots holding a gist (level > 0 in the content key)."""
    return (key_S >= 0) & (key_S % 8 > 0)


def materialised_inputs(rt: Runtime, params, state: DecodeState):
    """x [S, D], positions [S], sigma [S] or None, valid [S], keys [S], next position."""
    cfg, wcfg, S = rt.cfg, rt.cfg.wcfg, rt.cfg.cache_slots
    m = mat.materialise_tree(state.wc, state.tree, embed_fn(params), wcfg, cfg.position_mode)
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
    x_SxD, pos_S, sigma_S, valid_S, key_S, next_pos = materialised_inputs(rt, params, state)
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
    logits = jnp.where(recomputed > 0, bm.lm_head(params, bcfg, h_last), state.last_logits_V)
    state = state.replace(cache=cache, cache_key_S=jnp.where(s < cost, key_S, -1),
                          kv_len=cost, last_logits_V=logits,
                          total_recompute=state.total_recompute + recomputed)
    return state, recomputed.astype(jnp.int32), next_pos


def sync_cache_approx(rt: Runtime, params, state: DecodeState):
    """Approximate sync (global positions): reuse every cached row whose content key is still in
    the WC, moved to its new slot; recompute only the C-slot chunks that contain new content (and
    the chunk of the last slot if its logit is not the stored one). -> like `sync_cache`."""
    bcfg, C, S = rt.base_cfg, rt.cfg.chunk, rt.cfg.cache_slots
    x_SxD, pos_S, sigma_S, valid_S, key_S, next_pos = materialised_inputs(rt, params, state)
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
    logits = jnp.where(keep_last, state.last_logits_V, bm.lm_head(params, bcfg, h_last))
    state = state.replace(cache=cache, cache_key_S=jnp.where(s < cost, key_S, -1),
                          kv_len=cost, last_logits_V=logits,
                          total_recompute=state.total_recompute + recomputed)
    return state, recomputed, next_pos


def sync(rt: Runtime, params, state: DecodeState):
    """The sync of the runtime's kv_mode. -> (state, slots recomputed, next position)."""
    if rt.cfg.kv_mode == "approx":
        return sync_cache_approx(rt, params, state)
    return sync_cache(rt, params, state)
