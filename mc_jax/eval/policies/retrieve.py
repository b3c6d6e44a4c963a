"""`retrieve`: training-free finding with the base's own attention (issue 19, item 5; InfLLM's
way, measured in ../shared/RETRIEVAL.md and experiments/retrieval_heads).

Keys: the history is cut into windows of `window` tokens; each window is run through the first
layers of the frozen base alone, after the chat template's user-turn opening (a sink), at
compact positions, and the keys of its tokens are kept BEFORE RoPE. Queries: the question's
tokens, run in their own window after the last `window - 64` history tokens, also before RoPE,
then rotated to one fixed distance `delta`. Score of a block for one head: the softmax attention
mass over all stored keys that falls on the block's tokens, summed over the question's tokens;
the policy sums it over the selected heads (`HEADS`, chosen by the probe in
experiments/retrieval_heads on cases the evaluation never uses).

The policy: the `top` best blocks (default 1) and their neighbours (a fact that straddles a block
boundary spans two) are made raw by `core.focus.keep_blocks_raw`, best first; the rest of the WC
stays recency's (GistNet gists). Why one: on probe-seed niah_multikey cases (not evaluation
cases) `top=2` kept a distractor needle's block beside the gold one in 2 of 2 cases, and the base
read the distractor's number once (experiments/retrieval_heads/README.md). Cost: a forward of the first max(layer)+1 layers over the whole history
per answer, which the MegaContext runtime would do once per block while ingesting (issue 19,
item 1); here it is recomputed per answer and memoised per history.

Letters: L layers, n blocks, K block size, G KV heads, N query heads, F head dim, T tokens.
"""
from __future__ import annotations

import functools
import hashlib

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.eval.policies.retrieval import RetrievalPolicy, make_gists

# (layer, query head) pairs, from experiments/retrieval_heads (see its README for the probe)
HEADS: tuple[tuple[int, int], ...] = ((14, 3), (17, 3), (17, 5))
WINDOW, DELTA = 512, 512
_KEYS: dict = {}  # the last history's keys (one entry), memoised across policy instances


@functools.partial(jax.jit, static_argnames=("cfg", "n_layers"))
def _window_qk(params, cfg, ids_1xT, valid_1xT, n_layers):
    T = ids_1xT.shape[1]
    q, k = bm.layer_qk(params, cfg, ids_1xT, jnp.arange(T)[None], n_layers, valid_BxT=valid_1xT)
    return q[:, 0], k[:, 0]


def history_keys(model, ids, n_layers: int, *, window: int = WINDOW, prefix=(), K: int = 32):
    """Pre-RoPE keys [n_layers, n, K, G, F] of the complete blocks of `ids`, each `window`-token
    window run alone after `prefix` (one compile: every window is padded to the same length)."""
    ids = np.asarray(ids, np.int32)
    n = len(ids) // K
    pre = np.asarray(prefix, np.int32)
    P, cfg = len(pre), model.cfg
    out = np.zeros((n_layers, n * K, cfg.n_kv_heads, cfg.head_dim), np.float32)
    for s in range(0, n * K, window):
        chunk = ids[s:min(s + window, n * K)]
        x = np.zeros(P + window, np.int32)
        x[:P], x[P:P + len(chunk)] = pre, chunk
        valid = np.arange(P + window) < P + len(chunk)
        _, k = _window_qk(model.params, cfg, jnp.asarray(x[None]), jnp.asarray(valid[None]),
                          n_layers)
        out[:, s:s + len(chunk)] = np.asarray(k)[:, P:P + len(chunk)]
    return out.reshape(n_layers, n, K, cfg.n_kv_heads, cfg.head_dim)


def question_queries(model, context_ids, question_ids, n_layers: int, *, window: int = WINDOW,
                     prefix=()):
    """Pre-RoPE queries [n_layers, Tq, N, F] of the question's tokens, run after `prefix` and
    the last `window - 64` context tokens (padded to a fixed length: one compile)."""
    q_ids = np.asarray(question_ids, np.int32).reshape(-1)
    ctx = np.asarray(context_ids, np.int32)[-(window - 64):]
    seq = np.concatenate([np.asarray(prefix, np.int32), ctx, q_ids])
    T = -(-len(seq) // 128) * 128
    x = np.zeros(T, np.int32)
    x[:len(seq)] = seq
    valid = np.arange(T) < len(seq)
    q, _ = _window_qk(model.params, model.cfg, jnp.asarray(x[None]), jnp.asarray(valid[None]),
                      n_layers)
    return np.asarray(q)[:, len(seq) - len(q_ids):len(seq)]


@functools.partial(jax.jit, static_argnames=("rope_base",))
def _head_mass(q_TxF, k_nxKxF, delta, rope_base):
    """Attention mass per block [n] of one head: q rotated to distance delta, keys unrotated."""
    F = q_TxF.shape[-1]
    cos, sin = bm.rope_tables(jnp.full((1, q_TxF.shape[0]), delta), None, F, rope_base)
    qd = bm.apply_rope(q_TxF[None, :, None, :], cos, sin)[0, :, 0]
    n, K = k_nxKxF.shape[:2]
    s = jnp.einsum("tf,jf->tj", qd, k_nxKxF.reshape(n * K, F)) / jnp.sqrt(F)
    p = jax.nn.softmax(s, axis=-1)
    return p.reshape(-1, n, K).sum(axis=(0, 2))


@functools.partial(jax.jit, static_argnames=("rope_base",))
def _head_stats(q_TxF, k_nxKxF, delta, rope_base):
    """(mass [n], excess [n]) of one head: `_head_mass`, and per block the largest logit over
    its tokens and the question's tokens minus that question token's largest logit (<= 0)."""
    F = q_TxF.shape[-1]
    cos, sin = bm.rope_tables(jnp.full((1, q_TxF.shape[0]), delta), None, F, rope_base)
    qd = bm.apply_rope(q_TxF[None, :, None, :], cos, sin)[0, :, 0]
    n, K = k_nxKxF.shape[:2]
    s = jnp.einsum("tf,jf->tj", qd, k_nxKxF.reshape(n * K, F)) / jnp.sqrt(F)
    mass = jax.nn.softmax(s, axis=-1).reshape(-1, n, K).sum(axis=(0, 2))
    excess = (s - s.max(axis=-1, keepdims=True)).reshape(-1, n, K).max(axis=(0, 2))
    return mass, excess


def head_stats(q, k, heads, cfg, delta: int = DELTA, layer_index=None):
    """(mass [H, n], excess [H, n]) per head of `heads` (see `_head_stats`; shapes as in
    `head_scores`)."""
    where = {layer: i for i, layer in enumerate(layer_index or range(q.shape[0]))}
    group = cfg.n_heads // cfg.n_kv_heads
    mass, excess = [], []
    for layer, h in heads:
        i = where[layer]
        m, e = _head_stats(jnp.asarray(q[i, :, h]), jnp.asarray(k[i, :, :, h // group]),
                           float(delta), float(cfg.rope_base))
        mass.append(np.asarray(m))
        excess.append(np.asarray(e))
    return np.stack(mass), np.stack(excess)


def head_scores(q, k, heads, cfg, delta: int = DELTA, layer_index=None) -> np.ndarray:
    """[len(heads), n]: each head's attention mass per block. q [L, Tq, N, F], k [L, n, K, G, F]
    (layer l of q/k is layer `layer_index[l]` of the base, default l)."""
    where = {layer: i for i, layer in enumerate(layer_index or range(q.shape[0]))}
    group = cfg.n_heads // cfg.n_kv_heads
    out = []
    for layer, h in heads:
        i = where[layer]
        out.append(np.asarray(_head_mass(jnp.asarray(q[i, :, h]), jnp.asarray(k[i, :, :, h // group]),
                                         float(delta), float(cfg.rope_base))))
    return np.stack(out)


def with_neighbours(ranked, top: int, n: int) -> list[int]:
    """The `top` best blocks, each followed by its right then left neighbour (within [0, n))."""
    out: list[int] = []
    for b in ranked[:top]:
        for c in (b, b + 1, b - 1):
            if 0 <= c < n and c not in out:
                out.append(int(c))
    return out


class RetrievePolicy(RetrievalPolicy):
    """`retrieve`: the base's attention from the question finds the blocks (see the module
    docstring); they and their neighbours are kept raw, the rest recency gists."""

    def __init__(self, base_model, budget, gist_model, *, heads=HEADS, top: int = 1,
                 window: int = WINDOW, delta: int = DELTA, **kw):
        super().__init__("retrieve", base_model, budget, gist_model, **kw)
        self.heads = tuple((int(a), int(b)) for a, b in heads)
        self.top, self.window, self.delta = int(top), int(window), int(delta)
        self._layers = sorted({layer for layer, _ in self.heads})

    def _prefix(self):
        from mc_jax.base.chat import build_prompt

        try:
            return build_prompt(self.model.tokenizer, "?", chat=True).head
        except Exception:  # no chat template: no sink prefix
            return np.zeros(0, np.int32)

    def block_stats(self, history_ids, question_ids):
        """(mass [H, n], excess [H, n]) per selected head and complete history block
        (`head_stats`; the history's keys are memoised per history)."""
        K = self.K
        n_layers = self._layers[-1] + 1
        digest = (hashlib.sha1(np.asarray(history_ids, np.int32).tobytes()).hexdigest(),
                  id(self.model.params), tuple(self._layers), self.window)
        if digest not in _KEYS:  # shared by the policies of every budget (a sweep's W loop)
            k = history_keys(self.model, history_ids, n_layers, window=self.window,
                             prefix=self._prefix(), K=K)
            _KEYS.clear()
            _KEYS[digest] = k[self._layers]  # keep the selected layers only
        k = _KEYS[digest]
        q = question_queries(self.model, np.asarray(history_ids)[:len(history_ids) // K * K],
                             question_ids, n_layers, window=self.window, prefix=self._prefix())
        return head_stats(q[self._layers], k, self.heads, self.model.cfg, self.delta,
                          layer_index=self._layers)

    def block_scores(self, history_ids, question_ids) -> np.ndarray:
        """Summed attention mass per complete history block [n] (memoised per history)."""
        return self.block_stats(history_ids, question_ids)[0].sum(axis=0)

    def rank(self, blocks_BxK, question_ids, gold_blocks):
        scores = self.block_scores(np.asarray(blocks_BxK).reshape(-1), question_ids)
        order = [int(b) for b in np.argsort(-scores, kind="stable")]
        return with_neighbours(order, self.top, len(scores)), scores.astype(np.float32)


def make_retrieve_policy(base_model, budget: int, checkpoint=None, *, gists: str = "trained",
                         **kw) -> RetrievePolicy:
    """The evaluator's `retrieve`. kw: heads, top, window, delta, and Session arguments."""
    own = {k: kw.pop(k) for k in ("heads", "top", "window", "delta") if k in kw}
    gist, kw = make_gists(base_model, budget, checkpoint, gists, kw)
    return RetrievePolicy(base_model, budget, gist, **own, **kw)


