"""The MegaContext tree: LOD0 token ids plus one padded gist array per level, with counts.

Gist i at level l covers tokens [i*K^l, (i+1)*K^l). The tree is append-only: completing a
K-token block computes its LOD1 gist, completing K LOD1 gists computes their LOD2 gist, and so
on up to `depth`. Every array has a fixed capacity, so every function here is static-shape and
jit-able, and `jax.vmap` over a batch of trees gives independent streams.

Letters: T tokens, K block size (32), N items, D gist width, L levels.

Errors inside jit cannot raise, so the pure functions leave the tree unchanged and set a sticky
bit in `Tree.error`; `check_tree` (host side) turns it into a `CapacityError`. Nothing already
appended is ever lost.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.errors import CapacityError, ConfigError, McJaxError

GistFn = Callable[[int, jax.Array], jax.Array]  # gist_fn(level, children_NxKxD) -> gists_NxD
EmbedFn = Callable[[jax.Array], jax.Array]  # embed_fn(ids_...) -> x_...xD

ERR_CAPACITY = 1  # an append would pass capacity_tokens; the tree was left unchanged
ERR_MISALIGNED = 2  # append_blocks on a tree whose open block is not empty; left unchanged


class TokenDtypeError(McJaxError, TypeError):
    """Token ids that are not int32."""


@dataclasses.dataclass(frozen=True)
class TreeConfig:
    """Static shape of a tree. Level l >= 1 holds at most capacity_blocks // K^(l-1) gists."""

    d: int
    capacity_blocks: int
    depth: int = 2
    block_size: int = 32
    dtype: str = "float32"

    def __post_init__(self):
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        if self.block_size < 2:
            raise ConfigError(f"block_size must be >= 2, got {self.block_size}")
        if self.capacity_blocks < 1:
            raise ConfigError(f"capacity_blocks must be >= 1, got {self.capacity_blocks}")
        if self.d < 1:
            raise ConfigError(f"d must be >= 1, got {self.d}")
        jnp.dtype(self.dtype)  # raises TypeError for an unknown dtype name

    @property
    def capacity_tokens(self) -> int:
        return self.capacity_blocks * self.block_size

    def level_capacity(self, level: int) -> int:
        """Rows of the gist array of `level` (>= 1): the complete nodes capacity allows, but
        at least K, so a K-row slice of children is always in bounds."""
        return max(self.block_size, self.capacity_blocks // self.block_size ** (level - 1))

    def span(self, level: int) -> int:
        """Tokens covered by one node of `level` (level 0 = one block)."""
        return self.block_size ** max(level, 1)


@flax.struct.dataclass
class Tree:
    """Array state of one history. `tokens_T` has K spare slots so K-wide writes never clamp."""

    tokens_T: jax.Array  # int32 [capacity_tokens + K]
    num_tokens: jax.Array  # int32 []
    gists: tuple  # level l=1..depth: [level_capacity(l), D]
    error: jax.Array  # int32 [] sticky ERR_* bits

    def counts(self, block_size: int = 32) -> jax.Array:
        """Completed gists per level, int32 [depth]; count_l = num_tokens // K^l."""
        depth = len(self.gists)
        spans = jnp.asarray([block_size ** l for l in range(1, depth + 1)], jnp.int32)
        return self.num_tokens // spans


def mean_pool_gist_fn(level: int, children_NxKxD: jax.Array) -> jax.Array:
    """Baseline gist: the mean of the K children (token embeddings or child gists)."""
    del level
    return jnp.mean(children_NxKxD, axis=-2)


def init_tree(cfg: TreeConfig) -> Tree:
    dtype = jnp.dtype(cfg.dtype)
    return Tree(
        tokens_T=jnp.zeros((cfg.capacity_tokens + cfg.block_size,), jnp.int32),
        num_tokens=jnp.zeros((), jnp.int32),
        gists=tuple(jnp.zeros((cfg.level_capacity(l), cfg.d), dtype)
                    for l in range(1, cfg.depth + 1)),
        error=jnp.zeros((), jnp.int32),
    )


def _check_ids(ids) -> None:
    dtype = getattr(ids, "dtype", None)
    if dtype is None or jnp.dtype(dtype) != jnp.int32:
        raise TokenDtypeError(
            f"token ids must be int32, got {dtype}; convert with jnp.asarray(ids, jnp.int32)")


def append_tokens(tree: Tree, ids_N: jax.Array, cfg: TreeConfig, embed_fn: EmbedFn,
                  gist_fn: GistFn, n=None) -> Tree:
    """Append the first `n` (default N, traced ok) of ids_N, N <= K static.

    At most one block completes; its LOD1 gist is computed, and each level l whose K-th child
    just completed gets its gist too. Cost is independent of the tree's capacity (dynamic
    slices only). Past capacity: unchanged tree, ERR_CAPACITY set.
    """
    _check_ids(ids_N)
    K = cfg.block_size
    N = ids_N.shape[0]
    if N > K:
        raise ValueError(f"append_tokens takes at most K={K} tokens per call, got {N}; "
                         "use append_blocks for many whole blocks")
    n = jnp.asarray(N if n is None else n, jnp.int32)
    t0 = tree.num_tokens
    fits = (n >= 0) & (n <= N) & (t0 + n <= cfg.capacity_tokens)
    n = jnp.where(fits, n, 0)

    window_K = jax.lax.dynamic_slice(tree.tokens_T, (t0,), (K,))
    ids_K = jnp.pad(ids_N, (0, K - N))
    window_K = jnp.where(jnp.arange(K) < n, ids_K, window_K)
    tokens_T = jax.lax.dynamic_update_slice(tree.tokens_T, window_K, (t0,))
    t1 = t0 + n

    gists = list(tree.gists)
    completed = (t0 // K) < (t1 // K)  # one block at most, since n <= K
    child = t0 // K  # index of the completing node at the current level
    children_KxD = embed_fn(jax.lax.dynamic_slice(tokens_T, (child * K,), (K,)))
    for level in range(1, cfg.depth + 1):
        rows = gists[level - 1]
        children_1xKxD = children_KxD[None].astype(rows.dtype)
        new_1xD = jax.lax.cond(
            completed,
            lambda c, lv=level: gist_fn(lv, c).astype(rows.dtype),
            lambda c: jnp.zeros((1, rows.shape[1]), rows.dtype),
            children_1xKxD)
        old_1xD = jax.lax.dynamic_slice(rows, (child, 0), (1, rows.shape[1]))
        rows = jax.lax.dynamic_update_slice(rows, jnp.where(completed, new_1xD, old_1xD),
                                            (child, 0))
        gists[level - 1] = rows
        if level < cfg.depth:
            completed = completed & (child % K == K - 1)
            child = child // K
            children_KxD = jax.lax.dynamic_slice(rows, (child * K, 0), (K, rows.shape[1]))
    return Tree(tokens_T=tokens_T, num_tokens=t1, gists=tuple(gists),
                error=tree.error | jnp.where(fits, 0, ERR_CAPACITY))


def append_blocks(tree: Tree, ids_NxK: jax.Array, cfg: TreeConfig, embed_fn: EmbedFn,
                  gist_fn: GistFn) -> Tree:
    """Append N whole blocks at once, vectorised (N static). The open block must be empty.

    All N LOD1 gists come from one gist_fn call; level l >= 2 recomputes only the parents
    that complete, gathered by index. Misaligned or past capacity: unchanged tree + error bit.
    """
    _check_ids(ids_NxK)
    K = cfg.block_size
    N = ids_NxK.shape[0]
    if ids_NxK.ndim != 2 or ids_NxK.shape[1] != K:
        raise ValueError(f"append_blocks wants ids of shape [N, {K}], got {ids_NxK.shape}")
    t0 = tree.num_tokens
    aligned = t0 % K == 0
    fits = t0 + N * K <= cfg.capacity_tokens
    ok = aligned & fits
    err = jnp.where(aligned, 0, ERR_MISALIGNED) | jnp.where(fits, 0, ERR_CAPACITY)

    if N > cfg.capacity_blocks:
        raise CapacityError(f"{N} blocks cannot fit a tree of {cfg.capacity_blocks} blocks; "
                            "raise TreeConfig.capacity_blocks")
    flat_T = ids_NxK.reshape(-1)
    old_T = jax.lax.dynamic_slice(tree.tokens_T, (t0,), (N * K,))
    tokens_T = jax.lax.dynamic_update_slice(tree.tokens_T, jnp.where(ok, flat_T, old_T), (t0,))

    gists = list(tree.gists)
    start = t0 // K  # first new node at level 1
    new_NxD = gist_fn(1, embed_fn(ids_NxK)).astype(gists[0].dtype)
    idx_N = start + jnp.arange(N)
    rows = gists[0]
    gists[0] = rows.at[jnp.where(ok, idx_N, rows.shape[0])].set(new_NxD, mode="drop")
    n_prev_new, prev_start, prev_end = N, start, start + N
    for level in range(2, cfg.depth + 1):
        m = (K - 1 + n_prev_new) // K  # static bound on parents completed at this level
        first = prev_start // K
        end = prev_end // K  # parents complete iff all K children exist
        parent_M = first + jnp.arange(m)
        child_idx_MxK = parent_M[:, None] * K + jnp.arange(K)[None, :]
        below = gists[level - 2]
        children_MxKxD = below[jnp.clip(child_idx_MxK, 0, below.shape[0] - 1)]
        new_MxD = gist_fn(level, children_MxKxD).astype(gists[level - 1].dtype)
        rows = gists[level - 1]
        write = ok & (parent_M < end)
        gists[level - 1] = rows.at[jnp.where(write, parent_M, rows.shape[0])].set(
            new_MxD, mode="drop")
        n_prev_new, prev_start, prev_end = m, first, end
    return Tree(tokens_T=tokens_T, num_tokens=jnp.where(ok, t0 + N * K, t0),
                gists=tuple(gists), error=tree.error | err)


def build_tree(ids_T: jax.Array, cfg: TreeConfig, embed_fn: EmbedFn, gist_fn: GistFn) -> Tree:
    """Build a whole tree from T tokens in one vectorised pass (training; differentiable).

    Each level is one gist_fn call over all its complete nodes. Trailing tokens (T % K) form
    the open block.
    """
    _check_ids(ids_T)
    K = cfg.block_size
    T = ids_T.shape[0]
    if T > cfg.capacity_tokens:
        raise CapacityError(f"{T} tokens exceed the tree capacity of {cfg.capacity_tokens} "
                            "tokens; raise TreeConfig.capacity_blocks")
    tree = init_tree(cfg)
    tokens_T = tree.tokens_T.at[:T].set(ids_T)
    gists = list(tree.gists)
    n = T // K
    below = embed_fn(ids_T[:n * K].reshape(n, K)) if n else None
    for level in range(1, cfg.depth + 1):
        if n == 0:
            break
        below = gist_fn(level, below).astype(gists[level - 1].dtype)
        gists[level - 1] = gists[level - 1].at[:n].set(below)
        n = n // K
        below = below[:n * K].reshape(n, K, cfg.d)
    return Tree(tokens_T=tokens_T, num_tokens=jnp.asarray(T, jnp.int32), gists=tuple(gists),
                error=tree.error)


def check_tree(tree: Tree, cfg: TreeConfig | None = None) -> Tree:
    """Host side: raise for any error bit set by a jitted append; returns the tree otherwise."""
    err = np.asarray(jax.device_get(tree.error))
    if np.any(err & ERR_CAPACITY):
        cap = f" of {cfg.capacity_tokens} tokens" if cfg else ""
        raise CapacityError(f"append would pass the tree capacity{cap} "
                            f"(tree holds {np.asarray(tree.num_tokens)} tokens); nothing was "
                            "appended by that call. Raise TreeConfig.capacity_blocks, or page "
                            "the tree to host memory (mc_jax.core.tree_store.HostTree)")
    if np.any(err & ERR_MISALIGNED):
        raise ValueError("append_blocks needs an empty open block (num_tokens % K == 0); "
                         "finish the open block with append_tokens first")
    return tree


def clear_error(tree: Tree) -> Tree:
    """Reset the sticky error bits (after the caller has handled them)."""
    return tree.replace(error=jnp.zeros_like(tree.error))


def token_ids(tree: Tree) -> np.ndarray:
    """Host copy of the appended token ids."""
    h = jax.device_get(tree)
    return np.asarray(h.tokens_T)[:int(h.num_tokens)]
