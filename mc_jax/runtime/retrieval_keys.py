"""Retrieval keys in the runtime (issue 19, item 1): the base's own pre-RoPE keys of the history,
kept per block beside the tree so that a question can find its blocks without re-reading them.

InfLLM's way, measured in ../shared/RETRIEVAL.md and experiments/retrieval_heads: the history
is cut into windows of `window` tokens (a multiple of the block size); each window runs through
the first layers of the frozen base alone, after a short prefix (the chat template's user-turn
opening, an attention sink), at compact positions; the keys of its tokens are kept BEFORE RoPE.
A question's tokens run in their own window after the last `window - 64` history tokens, also
before RoPE, and are then rotated to one fixed distance `delta`. Score of a block for one head:
the softmax attention mass over all stored keys that falls on the block's tokens, summed over
the question's tokens (`head_scores`), and the largest logit excess (`head_stats`).

`KeyStore` keeps them for a stream: `Session(retrieval_heads=...)` fills it as blocks arrive (a
window when its last block is ingested, the trailing partial window on demand), in host memory:
(layers read) x (KV heads read) x head_dim float32 per token (SmolLM2's three heads: 2 layers x
1 KV head x 64 = 512 bytes). Why per-token keys and not summaries:
experiments/retrieval_heads/README.md (mean keys, Quest bounds, InfLLM representatives and
top-down LOD2 search all lost the gold block far more often than per-token keys).

Letters: L layers, n blocks, K block size, G KV heads, N query heads, F head dim, T tokens.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm

# (layer, query head) pairs, from experiments/retrieval_heads (see its README for the probe)
HEADS: tuple[tuple[int, int], ...] = ((14, 3), (17, 3), (17, 5))
WINDOW, DELTA = 512, 512


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


def head_stats(q, k, heads, cfg, delta: int = DELTA, layer_index=None, kv_index=None):
    """(mass [H, n], excess [H, n]) per head of `heads` (see `_head_stats`; shapes as in
    `head_scores`; kv_index: the KV heads k holds, in order, when not all of them)."""
    where = {layer: i for i, layer in enumerate(layer_index or range(q.shape[0]))}
    group = cfg.n_heads // cfg.n_kv_heads
    kv_at = {g: j for j, g in enumerate(kv_index or range(cfg.n_kv_heads))}
    mass, excess = [], []
    for layer, h in heads:
        i = where[layer]
        m, e = _head_stats(jnp.asarray(q[i, :, h]), jnp.asarray(k[i, :, :, kv_at[h // group]]),
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
        out.append(np.asarray(_head_mass(jnp.asarray(q[i, :, h]),
                                         jnp.asarray(k[i, :, :, h // group]),
                                         float(delta), float(cfg.rope_base))))
    return np.stack(out)


def kv_heads_of(heads, cfg) -> list[int]:
    """The KV heads (sorted) that the (layer, query head) pairs read."""
    group = cfg.n_heads // cfg.n_kv_heads
    return sorted({int(h) // group for _, h in heads})


class KeyStore:
    """Pre-RoPE keys [len(layers), n, K, len(kv_heads), F] of a stream's complete blocks: the
    layers and the KV heads the `heads` read (`kv_heads_of`), computed window by window exactly
    as `history_keys` computes them at once (and then selects)."""

    def __init__(self, model, heads, *, window: int = WINDOW, prefix=(), block_size: int = 32):
        if window % block_size:
            raise ValueError(f"retrieval window {window} is not a multiple of the block size "
                             f"{block_size}")
        self.model, self.window, self.K = model, int(window), int(block_size)
        self.heads = tuple((int(a), int(b)) for a, b in heads)
        self.layers = sorted({layer for layer, _ in self.heads})
        self.kv_heads = kv_heads_of(self.heads, model.cfg)
        self.prefix = np.asarray(prefix, np.int32)
        self.reset()

    def reset(self) -> None:
        self._done: list[np.ndarray] = []  # complete windows, [L, window, G_sel, F] each
        self._partial: tuple[int, np.ndarray] | None = None

    def _window(self, chunk) -> np.ndarray:
        ids = np.asarray(chunk, np.int32)
        P, W, cfg = len(self.prefix), self.window, self.model.cfg
        x = np.zeros(P + W, np.int32)
        x[:P], x[P:P + len(ids)] = self.prefix, ids
        valid = np.arange(P + W) < P + len(ids)
        _, k = _window_qk(self.model.params, cfg, jnp.asarray(x[None]), jnp.asarray(valid[None]),
                          self.layers[-1] + 1)
        return np.asarray(k)[self.layers, P:P + len(ids)][:, :, self.kv_heads]

    def update(self, ids) -> None:
        """Compute the windows that the stream `ids` (all its tokens so far) has completed."""
        ids = np.asarray(ids)
        while (len(self._done) + 1) * self.window <= len(ids):
            s = len(self._done) * self.window
            self._done.append(self._window(ids[s:s + self.window]))
            self._partial = None

    def keys(self, ids, n_blocks: int | None = None) -> np.ndarray:
        """[L, n, K, G_sel, F] for the first n_blocks (default: all complete) blocks of `ids`."""
        ids = np.asarray(ids)
        self.update(ids)
        n = len(ids) // self.K if n_blocks is None else int(n_blocks)
        if n * self.K > len(ids):
            raise ValueError(f"{n} blocks asked of a stream of {len(ids)} tokens")
        s = len(self._done) * self.window
        parts = self._done[:]
        if n * self.K > s:
            m = len(ids) // self.K * self.K - s  # the trailing partial window's whole blocks
            if self._partial is None or self._partial[0] != m:
                self._partial = (m, self._window(ids[s:s + m]))
            parts.append(self._partial[1])
        G, F = len(self.kv_heads), self.model.cfg.head_dim
        flat = (np.concatenate(parts, axis=1) if parts else
                np.zeros((len(self.layers), 0, G, F), np.float32))
        return flat[:, :n * self.K].reshape(len(self.layers), n, self.K, G, F)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self._done) + (self._partial[1].nbytes if self._partial
                                                    else 0)
