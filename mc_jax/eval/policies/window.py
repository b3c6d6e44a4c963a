"""Base-only context policies: the frozen base model sees a fixed selection of the history.

`full` (the whole history; `NotApplicable` when it does not fit the base model's context),
`truncate` (the last W tokens), `sinks` (the first 4 tokens + the most recent W-4, StreamingLLM;
positions compact 0..len-1 as in StreamingLLM). Inputs are padded to one fixed length per budget
(W + K for scoring) with validity masks, so a sweep compiles once per W. Answers are greedy
continuations through `mc_jax.base.sampling.generate_from_cache`.

Shape letters: N document tokens, K block size, T padded sequence length.
"""

from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base import sampling
from mc_jax.base.chat import build_prompt
from mc_jax.errors import InputError
from mc_jax.eval.policies.protocol import K, NotApplicable, blocks_touched, check_blocks

N_SINKS = 4


# ------------------------------------------------------------------------------------------------
# jitted pieces shared by the base-only policies


@functools.partial(jax.jit, static_argnames=("cfg",))
def _block_nll(params, cfg, ids_1xT, pos_1xT, valid_1xT, ctx_len):
    """NLL of the K tokens at [ctx_len, ctx_len + K) of one padded sequence. -> [K]"""
    logits_1xTxV, _ = bm.forward(params, cfg, ids_1xT, pos_1xT, valid_BxT=valid_1xT)
    pred_1xKxV = jax.lax.dynamic_slice_in_dim(logits_1xTxV, ctx_len - 1, K, axis=1)
    tgt_1xK = jax.lax.dynamic_slice_in_dim(ids_1xT, ctx_len, K, axis=1)
    return bm.token_nll(pred_1xKxV, tgt_1xK)[0]


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _cached_chunk(params, cfg, cache, ids_1xT, valid_1xT, index, targets_1xT):
    """One chunk at cache slots (and positions) [index, index+T): per-position NLL of `targets`
    and greedy next token. -> (nll_1xT, greedy_1xT, cache)"""
    T = ids_1xT.shape[1]
    pos_1xT = (index + jnp.arange(T))[None]
    logits_1xTxV, cache = bm.forward(params, cfg, ids_1xT, pos_1xT, valid_BxT=valid_1xT,
                                     cache=cache, cache_index=index)
    nll_1xT = bm.token_nll(logits_1xTxV, targets_1xT)
    return nll_1xT, jnp.argmax(logits_1xTxV, axis=-1).astype(jnp.int32), cache


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def greedy_answer(model, prompt_ids, max_new_tokens: int, pad_to: int, chunk: int = 1024) -> str:
    """Greedy continuation of `prompt_ids` (compact positions 0..P-1) with a KV cache; the stop
    id that ends it is not part of the answer (as in `runtime.answer.answer_after_wc`).

    The prompt is padded to `pad_to` so every prompt of a sweep cell shares one compile, and
    prefilled in chunks of at most `chunk` tokens (fixed chunk shapes, so compiles are shared too).
    """
    cfg, params = model.cfg, model.params
    prompt = bm.check_token_ids(prompt_ids, cfg)
    P = len(prompt)
    if P > pad_to:
        raise InputError(f"prompt of {P} tokens is longer than its padded length {pad_to}")
    T = pad_to
    size = _round_up(T + max_new_tokens, 64)
    if size > cfg.max_seq_len:
        raise NotApplicable(f"prompt + answer need {size} cache slots; the base model has "
                            f"{cfg.max_seq_len}")
    ids = np.zeros(T, np.int32)
    ids[:P] = prompt
    valid = np.arange(T) < P
    cache = bm.init_cache(cfg, 1, size, params["embed"].dtype)
    tok = None
    for s in range(0, P, chunk):
        e = min(s + chunk, T)
        _, greedy, cache = _cached_chunk(params, cfg, cache, jnp.asarray(ids[None, s:e]),
                                         jnp.asarray(valid[None, s:e]), jnp.int32(s),
                                         jnp.zeros((1, e - s), jnp.int32))
        if P - 1 < e:
            tok = greedy[:, P - 1 - s]
    stops = sampling.stop_ids(model)
    out = sampling.generate_from_cache(params, cfg, cache, tok, P, max_new_tokens=max_new_tokens,
                                       key=jax.random.PRNGKey(0),
                                       stop_ids=stops)
    out = list(out)
    if out and out[-1] in stops:
        out = out[:-1]
    return model.tokenizer.decode(out)


# ------------------------------------------------------------------------------------------------
# base-only policies


class WindowPolicy:
    """Keeps a fixed selection of the history (`keep`) and scores [kept || block] in one forward
    padded to W + K, with compact positions."""

    name = "window"

    def __init__(self, model, budget: int, checkpoint=None, **kw):
        if budget < 1:
            raise InputError(f"budget must be >= 1, got {budget}")
        self.model, self.budget = model, int(budget)
        self.last_focus: dict | None = None

    def keep(self, history_N: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def nll_stream(self, ids_N, blocks=None) -> np.ndarray:
        ids_N = bm.check_token_ids(ids_N, self.model.cfg)
        blocks = check_blocks(ids_N, blocks)
        T = self.budget + K
        if T > self.model.cfg.max_seq_len:
            raise NotApplicable(f"budget {self.budget} + {K} exceeds the base model's context "
                                f"{self.model.cfg.max_seq_len}")
        out = np.zeros((len(blocks), K), np.float32)
        for i, b in enumerate(blocks):
            ctx = self.keep(ids_N[:b * K])
            c = len(ctx)
            seq = np.zeros(T, np.int32)
            seq[:c], seq[c:c + K] = ctx, ids_N[b * K:(b + 1) * K]
            valid = np.arange(T) < c + K
            out[i] = np.asarray(_block_nll(self.model.params, self.model.cfg,
                                           jnp.asarray(seq[None]), jnp.asarray(np.arange(T)[None]),
                                           jnp.asarray(valid[None]), jnp.int32(c)))
        return out

    def answer(self, history_ids, question, max_new_tokens: int, *, chat: bool = True,
               answer_prefix=None, gold_blocks=None) -> str:
        """Greedy answer after [head || kept history || tail] (`mc_jax.base.chat.build_prompt`:
        the chat template's user turn around [window || question] and the assistant turn's
        answer prefix; chat=False or no template: [window || question || prefix]). The window is
        chosen from the history alone (a base-only policy has no focus); head and tail sit
        outside the budget W. gold_blocks is ignored. last_focus: the blocks with any token in
        the window raw, no block scores."""
        self.last_focus = None
        hist = bm.check_token_ids(history_ids, self.model.cfg)
        pr = build_prompt(self.model.tokenizer, question, chat=chat, answer_prefix=answer_prefix)
        prompt = pr.around(self.keep(hist))
        out = greedy_answer(self.model, prompt, max_new_tokens,
                            pad_to=self.budget + _round_up(len(pr.head) + len(pr.tail), 64))
        kept_idx = self.keep(np.arange(len(hist)))  # the same selection, of token indices
        self.last_focus = {"raw_blocks": blocks_touched(kept_idx), "block_scores": None}
        return out


class TruncatePolicy(WindowPolicy):
    """The last W tokens of the history."""

    name = "truncate"

    def keep(self, history_N):
        return history_N[max(0, len(history_N) - self.budget):]


class SinksPolicy(WindowPolicy):
    """StreamingLLM: the first 4 tokens (attention sinks) + the most recent W-4 tokens."""

    name = "sinks"

    def __init__(self, model, budget, checkpoint=None, **kw):
        if budget <= N_SINKS:
            raise InputError(f"sinks needs a budget > {N_SINKS}, got {budget}")
        super().__init__(model, budget)

    def keep(self, history_N):
        if len(history_N) <= self.budget:
            return history_N
        return np.concatenate([history_N[:N_SINKS],
                               history_N[len(history_N) - (self.budget - N_SINKS):]])


class FullPolicy:
    """The whole history (what truncation is compared against). The budget is ignored; a history
    longer than `max_len` (default: the base model's context) is `NotApplicable`.

    Streaming scores are one causal forward over the document (token t sees ids[:t] exactly),
    prefilled in chunks with a KV cache; results are memoised per document, so several budgets
    share one forward.
    """

    chunk = 1024

    def __init__(self, model, budget, checkpoint=None, max_len: int | None = None, **kw):
        self.model, self.budget, self.name = model, budget, "full"
        self.max_len = min(max_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
        self._memo: dict[str, np.ndarray] = {}
        self.last_focus: dict | None = None

    def _doc_nll(self, ids_N: np.ndarray) -> np.ndarray:
        digest = hashlib.sha1(ids_N.tobytes()).hexdigest()
        if digest in self._memo:
            return self._memo[digest]
        cfg, params = self.model.cfg, self.model.params
        N = len(ids_N)
        step = min(self.chunk, sampling.bucket(N))
        T = _round_up(N, step)
        ids = np.zeros(T + 1, np.int32)
        ids[:N] = ids_N
        valid = np.arange(T) < N
        cache = bm.init_cache(cfg, 1, T, params["embed"].dtype)
        nll = np.zeros(T, np.float32)
        for s in range(0, T, step):
            n, _, cache = _cached_chunk(params, cfg, cache, jnp.asarray(ids[None, s:s + step]),
                                        jnp.asarray(valid[None, s:s + step]), jnp.int32(s),
                                        jnp.asarray(ids[None, s + 1:s + step + 1]))
            nll[s:s + step] = np.asarray(n[0])
        out = nll[:N - 1]  # out[t-1] = NLL of token t
        self._memo = {digest: out}
        return out

    def nll_stream(self, ids_N, blocks=None) -> np.ndarray:
        ids_N = bm.check_token_ids(ids_N, self.model.cfg)
        blocks = check_blocks(ids_N, blocks)
        if len(ids_N) > self.max_len:
            raise NotApplicable(f"document of {len(ids_N)} tokens exceeds the full-context "
                                f"limit {self.max_len}")
        nll = self._doc_nll(ids_N)
        return np.stack([nll[b * K - 1:(b + 1) * K - 1] for b in blocks])

    def answer(self, history_ids, question, max_new_tokens: int, *, chat: bool = True,
               answer_prefix=None, gold_blocks=None) -> str:
        """Greedy answer after [head || whole history || tail] (see `WindowPolicy.answer`).
        last_focus: every block of the history raw (a partial last one too), no scores."""
        self.last_focus = None
        pr = build_prompt(self.model.tokenizer, question, chat=chat, answer_prefix=answer_prefix)
        hist = bm.check_token_ids(history_ids, self.model.cfg)
        prompt = pr.around(hist)
        if len(prompt) + max_new_tokens > self.max_len:
            raise NotApplicable(f"history + question + answer = {len(prompt) + max_new_tokens} "
                                f"tokens exceed the full-context limit {self.max_len}")
        out = greedy_answer(self.model, prompt, max_new_tokens,
                            pad_to=_round_up(len(prompt), 64), chunk=self.chunk)
        self.last_focus = {"raw_blocks": list(range(-(-len(hist) // K))), "block_scores": None}
        return out
