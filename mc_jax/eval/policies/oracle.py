"""Oracle focus: the best single expansion per scored block, found by measuring every candidate
on the block it is scored on (`OraclePolicy`, an upper bound for one expansion per block; SPEC
section 4). Not a runnable policy: it reads the tokens it scores.

Letters: K block size, W WC budget, S cache slots, D d_model.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.core import working_context as wcm
from mc_jax.eval.policies.megacontext import MegaContextPolicy, trained_networks
from mc_jax.eval.policies.protocol import NotApplicable
from mc_jax.runtime.kv_sync import gist_slots_of, materialised_inputs
from mc_jax.runtime.session import Session
from mc_jax.runtime.state import DecodeState, Runtime


def oracle_wc(wc: wcm.WorkingContext, e, wcfg: wcm.WCConfig, incoming: int | None = None):
    """The WC with entry e expanded (LOD1 -> its raw block; LOD2 -> its K LOD1 gists), after
    collapsing the oldest collapsible raw blocks that the expansion needs room for (at most two;
    room means cost + K - 1 + incoming <= W; incoming defaults to one block). Collapsing a raw
    block keeps the entry count, so e still names the same entry. -> (wc, ok); ok False (wc
    unchanged apart from those collapses) when e is not expandable or no room can be made."""
    K = wcfg.block_size
    incoming = K if incoming is None else incoming

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
    [S, S + K) with positions continuing the WC's. With wc = state.wc this is what the runtime's
    `block_step` computes through the cache."""
    S, K = rt.cfg.cache_slots, rt.cfg.block_size
    st = state.replace(wc=wc)
    x, pos, sigma, valid, key, next_pos = materialised_inputs(rt, params, st)
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
    logits_KxV = bm.lm_head(params, rt.base_cfg, rows_KxD)
    return bm.token_nll(logits_KxV[None], ids_K[None])[0]


@functools.partial(jax.jit, static_argnames=("rt",))
def jit_oracle_candidate(rt, params, state, ids_K, e):
    """(NLL [K] of ids_K after the WC with entry e expanded, ok, that WC)."""
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

    The minimum over ~20 candidates measured on the same K tokens is also biased low by chance.
    `stats()["heldout_gain_nats"]` separates the two: the candidate (or the unchanged WC) is
    chosen by the block's first K/2 tokens and the gain over recency is counted on the last K/2
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

    def answer(self, history_ids, question, max_new_tokens: int, *, chat: bool = True,
               answer_prefix=None, gold_blocks=None) -> str:
        self.last_focus = None
        raise NotApplicable("the oracle picks its focus by the NLL of the tokens it scores; it "
                            "does not know an answer's tokens in advance")


def make_oracle_policy(base_model, budget: int, checkpoint=None, **kw) -> OraclePolicy:
    """The evaluator's `oracle` over trained GistNet gists (MissingResourceError without them):
    recency focus plus the best single expansion per scored block, measured on that block.
    kw: Session arguments, as for `make_megacontext_policy`."""
    gist, _, kw = trained_networks(base_model, budget, checkpoint, kw)
    return OraclePolicy(base_model, budget, gist, **kw)
