"""The runtime's block step: one jit-compiled step per K-token block over histories far longer
than W (SPEC section 2, "Runtime loop").

1. sync: bring the KV cache up to date with the working context (`mc_jax.runtime.kv_sync`).
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
state compiles once per (Runtime, capacity) and per-block cost is flat in the history.

Letters: K block size, W WC budget, S cache slots, E entry rows (W + 1), V vocab, D d_model,
N blocks per ingest call.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import sample_token
from mc_jax.core import focus as fm
from mc_jax.core import tree as tr
from mc_jax.core import lens_features as lf
from mc_jax.core import working_context as wcm
from mc_jax.runtime import kv_sync
from mc_jax.runtime.state import DecodeState, Runtime, StepInfo


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


def lens_scores(rt: Runtime, nets, state: DecodeState):
    """LensNet u [E] for the WC (open block masked; inputs from `core.lens_features`, the
    builder training uses too), plus new latents."""
    lens = nnx.merge(rt.lens_graph, nets["lens"])
    f = lf.from_working_context(state.wc, state.tree, rt.cfg.wcfg, lens.config.n_tail)
    prev = state.latents if rt.lens_incremental else None
    out = lf.score(lens, f, prev)
    latents = out.latents if rt.lens_incremental else state.latents
    return out.u, latents


def ingest_and_refocus(rt: Runtime, params, nets, state: DecodeState, toks_K):
    """Append the finished block to the tree and the WC, then refocus. -> (state, log parts)."""
    cfg, wcfg, K = rt.cfg, rt.cfg.wcfg, rt.cfg.block_size
    gist_fn = lambda level, c: nnx.merge(rt.gist_graph, nets["gist"])(level, c)
    tree = tr.append_tokens(state.tree, toks_K, rt.tcfg, kv_sync.embed_fn(params), gist_fn)
    wc = wcm.append(state.wc, K, wcfg)
    state = state.replace(tree=tree, wc=wc)
    if cfg.policy == "lens":
        u_E, latents = lens_scores(rt, nets, state)
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
    state, recompute, next_pos = kv_sync.sync(rt, params, state)
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
    state, parts = ingest_and_refocus(rt, params, nets, state, toks)
    return state, _info(state, toks, nll, recompute, parts)


def ingest_blocks(rt: Runtime, params, nets, state: DecodeState, ids_NxK, valid_N):
    """Ingest N whole blocks without running the base model (tree + WC + refocus per block);
    blocks with valid_N False are skipped. -> (state, StepInfo stacked over N)."""
    K = rt.cfg.block_size

    def one(state, xs):
        ids_K, ok = xs

        def run(state):
            st, parts = ingest_and_refocus(rt, params, nets, state, ids_K)
            return st, _info(st, ids_K, jnp.zeros((K,), jnp.float32), jnp.int32(0), parts)

        def skip(state):
            z = jnp.int32(0)
            return state, _info(state, ids_K, jnp.zeros((K,), jnp.float32), z, (z, z, z))

        return jax.lax.cond(ok, run, skip, state)

    return jax.lax.scan(one, state, (ids_NxK, valid_N))


# the jitted entry points (Runtime is static: equal Runtimes share one compile)


@functools.partial(jax.jit, static_argnames=("rt", "teacher"), donate_argnames=("state",))
def jit_step(rt, params, nets, state, ids_K, n_given, temperature, top_p, teacher):
    return block_step(rt, params, nets, state, ids_K, n_given, temperature, top_p,
                      teacher=teacher)


@functools.partial(jax.jit, static_argnames=("rt",), donate_argnames=("state",))
def jit_ingest(rt, params, nets, state, ids_NxK, valid_N):
    return ingest_blocks(rt, params, nets, state, ids_NxK, valid_N)


@functools.partial(jax.jit, static_argnames=("rt",), donate_argnames=("state",))
def jit_sync(rt, params, state):
    state, recompute, next_pos = kv_sync.sync(rt, params, state)
    return state, recompute, next_pos
