"""Working contexts for training: sampled as per-block level assignments, packed for the base model.

A training sequence has C history tokens (a whole number of blocks, so the cursor is block-aligned)
followed by H horizon tokens. A working context (WC) over it is described by `level_N` (N = C / K
blocks): level_N[b] = 0 if block b is raw tokens, l >= 1 if it is inside a level-l gist, and -1 if
it is not covered (the recent-window baseline drops the oldest history). Alignment is by
construction: a level-l assignment is uniform over the K^(l-1) blocks of one level-l node. Entry
costs: a LOD0 block 32, any gist 1, so cost = sum over entries.

Everything is static-shape and vmappable: sampling (random legal mixtures plus the all-LOD0
recent window), single-edit slates for LensNet targets, and packing
[WC slots (left-padded to W) || H horizon tokens] into embeddings, positions, Gaussian-RoPE sigma
and validity for one base-model forward.

Letters: N blocks, K block size, D d_model, W budget (WC slots), H horizon, E edits, L levels.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mc_jax.core import working_context as wcm
from mc_jax.core.working_context import COLLAPSE, EXPAND
from mc_jax.errors import ConfigError

NOT_COVERED = -1
# A slate entry is a block index + an edit kind, the core's `EXPAND` (a gist opens: LOD1 -> LOD0
# block, or level l -> its K children) or `COLLAPSE` (a LOD0 block -> its LOD1 gist, or K sibling
# level-l gists -> their parent).


@dataclasses.dataclass(frozen=True)
class PackConfig:
    """Static shape of one packed training forward."""

    seq_blocks: int          # N: blocks of history before the cursor (C = N * K)
    budget: int              # W: WC budget in slots
    horizon: int             # H: teacher-forced tokens after the cursor
    depth: int = 2           # gist levels
    block_size: int = 32     # K
    protect_blocks: int = 1  # newest blocks that always stay LOD0
    position_mode: str = "compact"  # compact | global
    rope_damping: bool = False      # Gaussian RoPE damping for gists (global mode)
    edit_headroom: bool = True      # sample mixtures within W - (K - 1) so any expansion fits

    def __post_init__(self):
        if self.position_mode not in ("compact", "global"):
            raise ConfigError(f"position_mode must be 'compact' or 'global', "
                              f"got {self.position_mode!r}")
        if self.protect_blocks * self.block_size > self.budget:
            raise ConfigError(f"{self.protect_blocks} protected LOD0 blocks need "
                              f"{self.protect_blocks * self.block_size} slots > budget "
                              f"{self.budget}")
        if self.min_full_cost > self.mixture_budget:
            raise ConfigError(
                f"a WC covering {self.seq_blocks * self.block_size} tokens needs at least "
                f"{self.min_full_cost} slots (everything collapsed to the top level, newest "
                f"{self.protect_blocks} block(s) raw), more than the budget "
                f"{self.mixture_budget}: raise the budget or the depth, or shorten the sequence")

    @property
    def seq_len(self) -> int:
        return self.seq_blocks * self.block_size

    @property
    def mixture_budget(self) -> int:
        return self.budget - (self.block_size - 1 if self.edit_headroom else 0)

    @property
    def packed_len(self) -> int:
        return self.budget + self.horizon

    def top_group_blocks(self, level: int) -> int:
        return self.block_size ** (level - 1)

    @property
    def min_full_cost(self) -> int:
        """Cheapest full-coverage WC: complete top-level nodes, LOD1 otherwise, protected LOD0."""
        K, N, P = self.block_size, self.seq_blocks, self.protect_blocks
        free = N - P
        cost, covered = 0, 0
        for level in range(self.depth, 0, -1):
            g = self.top_group_blocks(level)
            n_nodes = (free - covered) // g
            cost += n_nodes
            covered += n_nodes * g
        return cost + P * K


def entry_starts(level_N: jax.Array, cfg: PackConfig) -> jax.Array:
    """True at the first block of every entry (the block that carries the entry's slot)."""
    return wcm.level_entry_starts(level_N, cfg.block_size, cfg.depth)


def entry_cost(level_N: jax.Array, cfg: PackConfig) -> jax.Array:
    """Slots each block's entry takes, on the entry's first block (0 elsewhere)."""
    start = entry_starts(level_N, cfg)
    return jnp.where(start, jnp.where(level_N == 0, cfg.block_size, 1), 0)


def wc_cost(level_N, cfg: PackConfig):
    return jnp.sum(entry_cost(level_N, cfg))


def recent_window(cfg: PackConfig) -> jax.Array:
    """The all-LOD0 recent-window baseline: newest W // K blocks raw, older ones not covered."""
    n_raw = min(cfg.budget // cfg.block_size, cfg.seq_blocks)
    b = jnp.arange(cfg.seq_blocks)
    return jnp.where(b >= cfg.seq_blocks - n_raw, 0, NOT_COVERED).astype(jnp.int32)


def substitution_window(key, cfg: PackConfig, recent: int = 0) -> jax.Array:
    """The recent window with one unprotected block, drawn uniformly, replaced by its LOD1 gist.

    recent > 0: draw among the newest `recent` unprotected blocks only."""
    n_raw = min(cfg.budget // cfg.block_size, cfg.seq_blocks)
    lo, hi = cfg.seq_blocks - n_raw, cfg.seq_blocks - cfg.protect_blocks
    if recent > 0:
        lo = max(lo, hi - recent)
    j = jax.random.randint(key, (), lo, max(hi, lo + 1))
    lv = recent_window(cfg)
    return jnp.where((jnp.arange(cfg.seq_blocks) == j) & (hi > lo), 1, lv).astype(jnp.int32)


def sample_mixture(key, cfg: PackConfig) -> jax.Array:
    """A random legal full-coverage WC within the mixture budget.

    Complete top-level nodes (outside the protected newest blocks) are kept as level-l gists with
    a random probability per WC; the remaining blocks start at LOD1; then LOD0 expansions are
    added in a random order (half the WCs prefer recent blocks, like the recency policy) while a
    randomly drawn share of the free budget lasts. Higher levels are opened the same way.
    """
    K, N, P, D = cfg.block_size, cfg.seq_blocks, cfg.protect_blocks, cfg.depth
    k_keep, k_frac, k_order, k_recent = jax.random.split(key, 4)
    b = jnp.arange(N)
    protected = b >= N - P
    level = jnp.where(protected, 0, 1).astype(jnp.int32)
    # top-down: complete level-l nodes before the protected region may stay gists at level l
    keep_p = jax.random.uniform(k_keep, (D + 1,))
    claimed = protected
    for lv in range(D, 1, -1):
        g = cfg.top_group_blocks(lv)
        node = b // g
        node_complete = (node + 1) * g <= N - P
        keep_node = jax.random.uniform(jax.random.fold_in(k_keep, lv), (N // g + 1,)) < keep_p[lv]
        take = node_complete & keep_node[node] & ~claimed
        # a node is taken whole only if none of its blocks is claimed by a higher level
        level = jnp.where(take, lv, level)
        claimed = claimed | take
    # the budget must hold: if the kept structure is still too costly, collapse greedily
    level = _collapse_to_fit(level, cfg)
    free = cfg.mixture_budget - wc_cost(level, cfg)
    # expansions: open LOD1 blocks to LOD0 in a random order (or newest first), 31 slots each
    frac = jax.random.uniform(k_frac)
    recent_first = jax.random.bernoulli(k_recent)
    prio = jnp.where(recent_first, b.astype(jnp.float32) / N,
                     jax.random.uniform(k_order, (N,)))
    cand = level == 1
    prio = jnp.where(cand, prio, -jnp.inf)
    order = jnp.argsort(-prio)
    rank = jnp.zeros((N,), jnp.int32).at[order].set(jnp.arange(N, dtype=jnp.int32))
    n_open = jnp.floor(frac * free / (K - 1)).astype(jnp.int32)
    open_ = cand & (rank < n_open)
    return jnp.where(open_, 0, level).astype(jnp.int32)


def _collapse_to_fit(level_N, cfg: PackConfig):
    """Collapse complete LOD1 groups to higher levels, oldest first, until the budget holds."""
    b = jnp.arange(cfg.seq_blocks)
    for lv in range(2, cfg.depth + 1):
        g = cfg.top_group_blocks(lv)
        node = b // g
        n_nodes = cfg.seq_blocks // g + 1
        all_lower = jax.ops.segment_min(jnp.where(level_N == lv - 1, 1, 0), node, n_nodes)
        complete = (node + 1) * g <= cfg.seq_blocks - cfg.protect_blocks

        def body(i, lvl):
            over = wc_cost(lvl, cfg) > cfg.mixture_budget
            can = (node == i) & complete & (all_lower[i] == 1)
            return jnp.where(over & can, lv, lvl)

        level_N = jax.lax.fori_loop(0, n_nodes, body, level_N)
    return level_N


# ----------------------------------------------------------------------------------------------
# single-edit slates (LensNet targets)

def legal_edits(level_N: jax.Array, cfg: PackConfig):
    """Per block b, whether EXPAND / COLLAPSE of the entry that starts at b is legal.

    EXPAND at b: b starts a gist entry (level >= 1), and the budget allows +K-1.
    COLLAPSE at b: b is an unprotected LOD0 block (-> LOD1), or b starts a complete node of K
    sibling entries all at level l >= 1 (-> level l + 1, l + 1 <= depth).
    """
    K, N = cfg.block_size, cfg.seq_blocks
    start = entry_starts(level_N, cfg)
    cost = wc_cost(level_N, cfg)
    b = jnp.arange(N)
    fits = cost + K - 1 <= cfg.budget
    expand = start & (level_N >= 1) & fits
    unprotected = b < N - cfg.protect_blocks
    collapse = start & (level_N == 0) & unprotected
    for lv in range(1, cfg.depth):
        g = cfg.top_group_blocks(lv + 1)
        node = b // g
        n_nodes = N // g + 1
        all_lv = jax.ops.segment_min(jnp.where(level_N == lv, 1, 0), node, n_nodes)[node]
        complete = ((node + 1) * g <= N) & ((node + 1) * g <= N - cfg.protect_blocks)
        collapse = collapse | ((b % g == 0) & (all_lv == 1) & complete)
    return expand, collapse


def apply_edit(level_N: jax.Array, block, kind, cfg: PackConfig) -> jax.Array:
    """The WC after one legal edit at the entry starting at `block`."""
    b = jnp.arange(cfg.seq_blocks)
    lv = level_N[block]
    # EXPAND: level lv -> lv - 1 over the entry's span (its K children, or the raw block)
    span_e = jnp.asarray([1] + [cfg.top_group_blocks(l) for l in range(1, cfg.depth + 1)])[
        jnp.clip(lv, 0, cfg.depth)]
    in_entry = (b >= block) & (b < block + span_e)
    expanded = jnp.where(in_entry, lv - 1, level_N)
    # COLLAPSE: LOD0 -> 1 for one block; a level-l group of K siblings -> l + 1
    span_c = jnp.asarray([1] + [cfg.top_group_blocks(l + 1) for l in range(1, cfg.depth + 1)])[
        jnp.clip(lv, 0, cfg.depth)]
    in_group = (b >= block) & (b < block + span_c)
    collapsed = jnp.where(in_group, lv + 1, level_N)
    return jnp.where(kind == EXPAND, expanded, collapsed).astype(jnp.int32)


def sample_edits(key, level_N, n_edits: int, cfg: PackConfig):
    """Up to n_edits distinct legal edits, uniformly. Returns blocks_E, kinds_E, valid_E."""
    expand, collapse = legal_edits(level_N, cfg)
    legal_2N = jnp.concatenate([expand, collapse])
    g = jax.random.gumbel(key, legal_2N.shape)
    score = jnp.where(legal_2N, g, -jnp.inf)
    top, idx = jax.lax.top_k(score, n_edits)
    kinds = jnp.where(idx >= cfg.seq_blocks, COLLAPSE, EXPAND).astype(jnp.int32)
    blocks = idx % cfg.seq_blocks
    return blocks, kinds, jnp.isfinite(top)


# ----------------------------------------------------------------------------------------------
# packing

def _first_slots(level_N: jax.Array, cfg: PackConfig):
    """(slot of each entry's first position [N] with the WC right-aligned in W slots, WC cost)."""
    cost_N = entry_cost(level_N, cfg)
    total = jnp.sum(cost_N)
    return cfg.budget - total + jnp.cumsum(cost_N) - cost_N, total


def pack(level_N: jax.Array, tok_emb_NxKxD: jax.Array, gists: tuple, horizon_emb_HxD: jax.Array,
         cfg: PackConfig):
    """[WC || horizon] as base-model inputs, WC right-aligned in W slots (left padding).

    gists: level l = 1..depth arrays [N // K^(l-1), D] (complete nodes only).
    Returns x_PxD, positions_P (float), sigma_P, valid_P, where P = W + H; the logit at slot
    W - 1 + h predicts horizon token h.
    """
    K, N, W, H = cfg.block_size, cfg.seq_blocks, cfg.budget, cfg.horizon
    D = tok_emb_NxKxD.shape[-1]
    first_slot_N, total = _first_slots(level_N, cfg)
    dump = W + H  # out-of-range scatter index (dropped)
    b = jnp.arange(N)
    start = entry_starts(level_N, cfg)

    # token candidates: block b's K tokens go to K consecutive slots when the block is LOD0
    is_raw = start & (level_N == 0)
    tok_slot_NxK = jnp.where(is_raw[:, None], first_slot_N[:, None] + jnp.arange(K)[None, :], dump)
    tok_pos_NxK = (b[:, None] * K + jnp.arange(K)[None, :]).astype(jnp.float32)
    srcs, slots, poss, sigmas = [tok_emb_NxKxD.reshape(N * K, D)], [tok_slot_NxK.reshape(-1)], \
        [tok_pos_NxK.reshape(-1)], [jnp.zeros((N * K,))]
    for lv in range(1, cfg.depth + 1):
        g = cfg.top_group_blocks(lv)
        n_nodes = gists[lv - 1].shape[0]
        node_first_block = jnp.arange(n_nodes) * g
        safe = jnp.clip(node_first_block, 0, N - 1)
        here = (node_first_block < N) & start[safe] & (level_N[safe] == lv)
        srcs.append(gists[lv - 1].astype(tok_emb_NxKxD.dtype))
        slots.append(jnp.where(here, first_slot_N[safe], dump))
        span = g * K
        # the runtime's gist position (`working_context.materialise`): first token + span // 2
        poss.append((node_first_block * K + span // 2).astype(jnp.float32))
        sigmas.append(jnp.full((n_nodes,), float(span)))
    src = jnp.concatenate(srcs)
    slot = jnp.concatenate(slots)
    pos = jnp.concatenate(poss)
    sig = jnp.concatenate(sigmas)

    x = jnp.zeros((W + H, D), tok_emb_NxKxD.dtype).at[slot].set(src, mode="drop")
    gpos = jnp.zeros((W + H,), jnp.float32).at[slot].set(pos, mode="drop")
    gsig = jnp.zeros((W + H,), jnp.float32).at[slot].set(sig, mode="drop")
    x = x.at[W:].set(horizon_emb_HxD)
    slots_P = jnp.arange(W + H)
    valid = slots_P >= W - total
    compact = (slots_P - (W - total)).astype(jnp.float32)
    horizon_global = (N * K + jnp.arange(H)).astype(jnp.float32)
    gpos = gpos.at[W:].set(horizon_global)
    positions = compact if cfg.position_mode == "compact" else gpos
    positions = jnp.where(valid, positions, 0.0)
    sigma = jnp.where(valid, gsig, 0.0) if cfg.rope_damping else jnp.zeros((W + H,))
    return x, positions, sigma, valid


def gist_slots(level_N: jax.Array, cfg: PackConfig) -> jax.Array:
    """[W + H] bool: the slots of `pack(level_N, ...)` that hold a gist (where a gist reader
    adapter applies)."""
    P = cfg.budget + cfg.horizon
    first_slot_N, _ = _first_slots(level_N, cfg)
    is_gist = entry_starts(level_N, cfg) & (level_N >= 1)
    return jnp.zeros((P,), bool).at[jnp.where(is_gist, first_slot_N, P)].set(True, mode="drop")


def pack_many(levels_BxN: jax.Array, tok_emb_NxKxD, gists: tuple, horizon_emb_HxD,
              cfg: PackConfig):
    """`pack` for a batch of level assignments of one sequence, plus each row's `gist_slots`:
    (x, positions, sigma, valid, gist_mask), each with a leading batch axis."""
    x, pos, sig, valid = jax.vmap(lambda lv: pack(lv, tok_emb_NxKxD, gists, horizon_emb_HxD,
                                                  cfg))(levels_BxN)
    return x, pos, sig, valid, jax.vmap(lambda lv: gist_slots(lv, cfg))(levels_BxN)


