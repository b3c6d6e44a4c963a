"""Context policies compared by the evaluation sweeps, all at one working-context budget W.

A policy decides what the frozen base model sees of a long history. Every policy has the same
two methods, so an evaluator never knows which one it drives:

- `nll_stream(ids_N, blocks=None) -> nll_BxK` (float32 numpy): teacher-forced streaming. The
  document is cut into K=32-token blocks; block b covers tokens [32b, 32b+32). To score block b the
  policy builds its context from the history ids[:32b] only, runs one forward of
  [context || block b], and returns the NLL of each of the block's 32 tokens (token 32b+j is
  predicted from the context plus block tokens < j). `blocks` lists the blocks to score (each
  >= 1 and complete; default: every complete block from 1). This is how the MegaContext runtime
  scores a block (refocus once per block), so base-only and MegaContext policies are comparable.
- `answer(history_ids, question_ids, max_new_tokens) -> str`: greedy generation after
  [policy's context of the history || question].

Base-only policies (this file): `full` (the whole history; `NotApplicable` when it does not fit the
base model's context), `truncate` (the last W tokens), `sinks` (the first 4 tokens + the most recent
W-4, StreamingLLM; positions compact 0..len-1 as in StreamingLLM). Inputs are padded to one fixed
length per budget (W + 32 for scoring) with validity masks, so a sweep compiles once per W.

MegaContext policies (`recency`, `meanpool`, `lens`, `oracle`) come from the runtime:
`mc_jax.runtime.decode.make_policy(name, base_model, budget, checkpoint=None, **kw)` must return an object
with the same two methods. While it does not exist the adapter raises `Unavailable`, and the sweep
records an "unavailable: <reason>" row instead of a number.

Shape letters: N document tokens, B scored blocks, K block size (32), T padded sequence length.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base import sampling
from mc_jax.errors import InputError, MissingResourceError

K = 32
N_SINKS = 4
MC_POLICIES = ("recency", "meanpool", "lens", "oracle")


class NotApplicable(Exception):
    """The policy cannot run this case (e.g. full context longer than the base model's context)."""


class Unavailable(Exception):
    """The policy's implementation (or its trained networks) does not exist yet."""


class Policy(Protocol):
    name: str
    budget: int

    def nll_stream(self, ids_N: np.ndarray, blocks: Sequence[int] | None = None) -> np.ndarray:
        ...

    def answer(self, history_ids, question_ids, max_new_tokens: int) -> str:
        ...


_POLICIES: dict[str, Callable[..., Policy]] = {}


def register_policy(name: str):
    def deco(factory):
        _POLICIES[name] = factory
        return factory
    return deco


def policy_names() -> list[str]:
    return sorted(_POLICIES)


def make_policy(name: str, model, budget: int, checkpoint=None, **kw) -> Policy:
    """Build policy `name` at budget W; raises `Unavailable` for a policy that cannot exist yet."""
    if name not in _POLICIES:
        raise InputError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    return _POLICIES[name](model, budget, checkpoint=checkpoint, **kw)


def default_blocks(n_tokens: int) -> list[int]:
    return list(range(1, n_tokens // K))


def check_blocks(ids_N: np.ndarray, blocks) -> list[int]:
    blocks = default_blocks(len(ids_N)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if b < 1 or (b + 1) * K > len(ids_N)]
    if bad:
        raise InputError(f"blocks {bad[:5]} cannot be scored in a document of {len(ids_N)} tokens: "
                         f"a scored block needs >= 1 block of history and all {K} of its tokens")
    return blocks


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
    """Greedy continuation of `prompt_ids` (compact positions 0..P-1) with a KV cache.

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
    out: list[int] = []
    stops = {i for i in (cfg.eos_id, getattr(model.tokenizer, "eos_id", None)) if i is not None}
    key = jax.random.PRNGKey(0)
    for i in range(max_new_tokens):
        t = int(tok[0])
        out.append(t)
        if t in stops or i == max_new_tokens - 1:
            break
        tok, cache = sampling.decode_step(params, cfg, cache, tok, jnp.int32(P + i), key,
                                          jnp.float32(0.0), jnp.float32(1.0))
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

    def answer(self, history_ids, question_ids, max_new_tokens: int) -> str:
        hist = bm.check_token_ids(history_ids, self.model.cfg)
        q = list(question_ids)
        prompt = np.concatenate([self.keep(hist), np.asarray(q, np.int32)])
        return greedy_answer(self.model, prompt, max_new_tokens,
                             pad_to=self.budget + _round_up(len(q), 64))


@register_policy("truncate")
class TruncatePolicy(WindowPolicy):
    """The last W tokens of the history."""

    name = "truncate"

    def keep(self, history_N):
        return history_N[max(0, len(history_N) - self.budget):]


@register_policy("sinks")
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


@register_policy("full")
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

    def answer(self, history_ids, question_ids, max_new_tokens: int) -> str:
        prompt = np.concatenate([bm.check_token_ids(history_ids, self.model.cfg),
                                 np.asarray(list(question_ids), np.int32)])
        if len(prompt) + max_new_tokens > self.max_len:
            raise NotApplicable(f"history + question + answer = {len(prompt) + max_new_tokens} "
                                f"tokens exceed the full-context limit {self.max_len}")
        return greedy_answer(self.model, prompt, max_new_tokens,
                             pad_to=_round_up(len(prompt), 64), chunk=self.chunk)


# ------------------------------------------------------------------------------------------------
# MegaContext policies: adapters over the runtime (mc_jax.runtime.decode)


def runtime_function(name: str, modules=("mc_jax.runtime.decode",)):
    """Find `name` in the runtime modules, or raise `Unavailable` saying what is missing."""
    reasons = []
    for mod_name in modules:
        try:
            mod = importlib.import_module(mod_name)
        except ImportError as e:
            reasons.append(f"{mod_name} not importable ({e})")
            continue
        fn = getattr(mod, name, None)
        if fn is not None:
            return fn
        reasons.append(f"{mod_name} has no {name}()")
    raise Unavailable("; ".join(reasons))


def _mc_factory(policy_name: str):
    def factory(model, budget, checkpoint=None, **kw):
        make = runtime_function("make_policy")
        try:
            return make(policy_name, model, budget, checkpoint=checkpoint, **kw)
        except (NotImplementedError, MissingResourceError) as e:
            raise Unavailable(f"mc_jax.runtime.decode.make_policy({policy_name!r}): {e}") from e
    factory.__doc__ = f"MegaContext policy {policy_name!r} from mc_jax.runtime.decode.make_policy."
    return factory


for _name in MC_POLICIES:
    register_policy(_name)(_mc_factory(_name))
