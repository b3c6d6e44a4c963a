"""A greedy answer after a session's working context: [WC of the ingested history || tail (a
partial block) || question], prefilled once from the materialised WC (gists included) into a
fresh cache, then continued by `mc_jax.base.sampling.generate_from_cache`."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base import sampling
from mc_jax.errors import CapacityError, InputError
from mc_jax.runtime.kv_sync import gist_slots_of, materialised_inputs


@functools.partial(jax.jit, static_argnames=("rt",))
def wc_inputs(rt, params, state):
    """The materialised WC: x [S, D], positions [S], sigma [S] (zeros without damping), valid
    [S], gist slots [S], next position."""
    x, pos, sigma, valid, key, next_pos = materialised_inputs(rt, params, state)
    sigma = jnp.zeros(pos.shape, jnp.float32) if sigma is None else sigma
    return x, pos, sigma, valid, gist_slots_of(key), next_pos


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _prefill_embeds(params, cfg, cache, x_1xTxD, pos_1xT, sigma_1xT, valid_1xT, gist_1xT):
    ad = params.get("gist_reader")
    return bm.forward(params, cfg, x_1xTxD, pos_1xT, valid_BxT=valid_1xT, sigma_BxT=sigma_1xT,
                      cache=cache, cache_index=0, adapter=ad, adapt_BxT=gist_1xT)


def answer_after_wc(s, tail_ids, question_ids, max_new_tokens: int, head_ids=()) -> str:
    """Greedy answer after [head || WC of the ingested history || tail (partial block) ||
    question] of the Session `s`; the head (a chat template's opening of the user turn), tail and
    question sit outside the budget, in a fresh cache sized to fit. The head takes positions
    0..H-1 and every WC position moves up by H (RoPE sees the same relative distances within the
    WC). The stop id that ends the answer is not part of it."""
    model, rt = s.model, s.rt
    x_SxD, pos_S, sig_S, valid_S, gist_S, next_pos = jax.device_get(
        wc_inputs(rt, s.params, s.state))
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
    head = np.asarray(head_ids, np.int32).reshape(-1)
    H = len(head)
    if H:
        h_emb = np.asarray(bm.embed_tokens(s.params, jnp.asarray(head))).astype(x.dtype)
        x = np.concatenate([h_emb, x])
        pos = np.concatenate([np.arange(H), pos + H]).astype(np.int32)
        sig = np.concatenate([np.zeros(H, sig.dtype), sig])
        gist = np.concatenate([np.zeros(H, bool), gist])
        p0 += H
    P = len(x)
    if P == 0:
        raise InputError("nothing to answer from: the history and the question are empty")
    T = -(-P // 256) * 256  # few prompt shapes, so few compiles across a sweep
    size = T + -(-max_new_tokens // 64) * 64
    if size > model.cfg.max_seq_len:
        raise CapacityError(f"WC ({cost}) + question ({H + len(extra)}) + {max_new_tokens} new "
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
    stops = sampling.stop_ids(model)
    # the new tokens go to slots T, T+1, ... (after the padded prompt) at positions p0 + len(extra)
    out = list(sampling.generate_from_cache(
        s.params, model.cfg, cache, tok, T, max_new_tokens=max_new_tokens,
        key=jax.random.PRNGKey(0), stop_ids=stops, pos=p0 + len(extra)))
    if out and out[-1] in stops:
        out.pop()
    return model.tokenizer.decode(out)


def answer_question(s, pending_ids, prompt, max_new_tokens: int, refocus=None) -> str:
    """Question-aware greedy answer of the Session `s` (its history ingested up to a block
    boundary, `pending_ids` the partial block after it) to `prompt` (`mc_jax.base.chat.
    AnswerPrompt`): the first whole blocks of [pending || prompt.tail] (the question's, at most
    the runtime's protected_blocks of them) are ingested through the session, so focus refocuses
    with the question in view, and they are the newest protected blocks, which stay raw (LOD0):
    the question is never folded into a gist. Whatever is left of the tail (a partial block, or
    blocks beyond protected_blocks) follows the WC raw, outside the budget, with prompt.head
    before the WC (`answer_after_wc`). The session's state is restored afterwards: the question
    does not become history.

    refocus: an optional callable `refocus(s)`, called after the question's blocks are ingested
    and before the WC is read; it may replace the WC (`s.state = s.state.replace(wc=new_wc)`,
    a legal WC over the same tree), e.g. to keep blocks that match the question raw. It must
    not advance the session (no ingest/step); the state is restored afterwards all the same."""
    K, P = s.cfg.block_size, s.cfg.protected_blocks
    if len(s.ids) % K:
        raise InputError("answer_question needs a session at a block boundary")
    post = np.concatenate([np.asarray(pending_ids, np.int32).reshape(-1),
                           np.asarray(prompt.tail, np.int32)])
    n_in = min(len(post) // K, P) * K
    # the ingest step donates its state (and a refocus hook might): keep a copy to restore
    copy = n_in or refocus is not None
    saved = (jax.tree.map(lambda a: jnp.array(a, copy=True) if isinstance(a, jax.Array) else a,
                          s.state) if copy else s.state, list(s.ids))
    try:
        if n_in:
            s.ingest(post[:n_in])
        if refocus is not None:
            refocus(s)
        return answer_after_wc(s, post[n_in:], np.zeros(0, np.int32), max_new_tokens,
                               head_ids=prompt.head)
    finally:
        s.state, s.ids = saved
