"""The working context (WC): a padded, time-ordered entry table over the tree, and its moves.

An entry is a LOD0 block (the K raw tokens of block i, cost K) or a gist (level l >= 1, node i,
covering tokens [i*K^l, (i+1)*K^l), cost 1). The newest, still-open block is always the last
valid entry: level 0, node = num_tokens // K, cost = num_tokens % K (0 right after a block
completes). Valid entries sit at rows [0, num_entries); padding rows are all zero.

Everything here is a pure, static-shape function (gathers, scatters, cumsums over the E_max
rows), so it jit-compiles once per `WCConfig`. Errors inside jit leave the WC unchanged and set
a sticky bit in `WorkingContext.error`; `check_wc` raises them on the host.

Letters: E entry rows (E_max = w_max + 1), W slots (w_max), K block size, D gist width.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.errors import CapacityError, ConfigError, McJaxError

AGE_MAX = 1 << 20  # "never edited"; steps-since-edit saturates here

ERR_BUDGET = 1  # an append would pass w_max; WC unchanged (run the allocator first)
ERR_NO_ROOM = 2  # the allocator found no legal collapse to make room (config error)
ERR_ILLEGAL = 4  # an illegal move was requested; WC unchanged
ERR_HISTORY = 8  # recency build: the history cannot fit the budget even fully collapsed

EXPAND = 1
COLLAPSE = 2

MODES = ("compact", "global")


class IllegalActionError(McJaxError, ValueError):
    """An expand/collapse request that SPEC section 2 does not allow."""


@dataclasses.dataclass(frozen=True)
class WCConfig:
    """Static WC shape and policy.

    w_max: budget in base-model positions (also the slot count W).
    protected_blocks: the newest complete blocks that always stay LOD0 (the open block is
      always LOD0 as well).
    max_tokens: the longest history this WC must hold (usually the tree capacity). When set,
      a budget that cannot hold it fully collapsed (plus the open block and one incoming block)
      is a ConfigError here, at config time.
    """

    w_max: int
    depth: int = 2
    block_size: int = 32
    protected_blocks: int = 1
    max_tokens: int | None = None

    def __post_init__(self):
        K = self.block_size
        if self.depth < 1:
            raise ConfigError(f"depth must be >= 1, got {self.depth}")
        if K < 2:
            raise ConfigError(f"block_size must be >= 2, got {K}")
        if self.protected_blocks < 0:
            raise ConfigError(f"protected_blocks must be >= 0, got {self.protected_blocks}")
        floor = K * self.protected_blocks + 2 * K - 1
        if self.w_max < floor:
            raise ConfigError(
                f"w_max={self.w_max} is too small: {self.protected_blocks} protected blocks, "
                f"the open block and one incoming block need {floor} positions")
        if self.max_tokens is not None:
            need = required_budget(self.max_tokens, self)
            if need > self.w_max:
                raise ConfigError(
                    f"a history of {self.max_tokens} tokens cannot be held in w_max={self.w_max}"
                    f" at depth {self.depth}: fully collapsed (top-level gists of "
                    f"{K ** self.depth} tokens each) it needs up to {need} positions. Raise "
                    "w_max or depth, lower protected_blocks, or shorten the history")

    @property
    def max_entries(self) -> int:
        """E_max: every entry but the open one costs >= 1, so w_max + 1 rows always suffice."""
        return self.w_max + 1


def min_cost(num_tokens: int, cfg: WCConfig) -> int:
    """Cost of the most collapsed legal WC for a history (host side, exact)."""
    K, d = cfg.block_size, cfg.depth
    nb, r = divmod(int(num_tokens), K)
    p = min(cfg.protected_blocks, nb)
    m = nb - p
    digits = sum((m // K ** (l - 1)) % K for l in range(1, d))
    return K * p + r + m // K ** (d - 1) + digits


def required_budget(max_tokens: int, cfg: WCConfig) -> int:
    """A budget that holds any history up to max_tokens fully collapsed, plus one incoming
    block: K*P (protected) + (K-1) (open) + K (incoming) + top-level gists + (K-1) per lower
    level. Sufficient (a safe upper bound on the exact maximum)."""
    K, d = cfg.block_size, cfg.depth
    nb = -(-int(max_tokens) // K)
    top = -(-nb // K ** (d - 1))
    return K * cfg.protected_blocks + (K - 1) + K + top + (K - 1) * (d - 1)


@flax.struct.dataclass
class WorkingContext:
    level_E: jax.Array  # int32
    node_E: jax.Array  # int32, node index at its level
    cost_E: jax.Array  # int32, 0 for padding
    valid_E: jax.Array  # bool
    age_E: jax.Array  # int32, refocus steps since last edit (AGE_MAX = never edited)
    num_entries: jax.Array  # int32 []
    num_tokens: jax.Array  # int32 [], the cursor
    error: jax.Array  # int32 [], sticky ERR_* bits

    def total_cost(self) -> jax.Array:
        return jnp.sum(self.cost_E)


def _pow(K, level):
    """K**level for a traced int level (level <= 6)."""
    out = jnp.ones_like(level)
    for _ in range(6):
        out = jnp.where(level > 0, out * K, out)
        level = level - 1
    return out


def _canonical(level, node, valid, age, num_tokens, K):
    """Zero the padding rows and recompute costs from (level, node)."""
    open_node = num_tokens // K
    cost = jnp.where(level > 0, 1, jnp.where(node == open_node, num_tokens % K, K))
    z = jnp.zeros_like(level)
    return (jnp.where(valid, level, z), jnp.where(valid, node, z),
            jnp.where(valid, cost, z), jnp.where(valid, age, z))


def _make(level, node, valid, age, num_tokens, error, K) -> WorkingContext:
    level, node, cost, age = _canonical(level, node, valid, age, num_tokens, K)
    return WorkingContext(level_E=level, node_E=node, cost_E=cost, valid_E=valid, age_E=age,
                          num_entries=jnp.sum(valid).astype(jnp.int32),
                          num_tokens=jnp.asarray(num_tokens, jnp.int32),
                          error=jnp.asarray(error, jnp.int32))


# ----------------------------------------------------------------------------- recency build

def build_recency(num_tokens, cfg: WCConfig, budget=None) -> WorkingContext:
    """First WC for a history: newest blocks LOD0, then LOD1, ..., oldest at the top level.

    The result has the most LOD0 blocks that fit `budget` (default w_max), then the most LOD1
    gists, and so on: exactly what expanding the newest gist of the fully collapsed WC, again
    and again while the budget allows, gives. Computed in closed form: one boundary per level,
    found by a binary search (cost is strictly monotone in each boundary). A history that
    cannot fit sets ERR_HISTORY (and returns the fully collapsed WC).
    """
    K, d, E = cfg.block_size, cfg.depth, cfg.max_entries
    T = jnp.asarray(num_tokens, jnp.int32)
    B = jnp.asarray(cfg.w_max if budget is None else budget, jnp.int32)
    nb, r = T // K, T % K
    p = jnp.minimum(cfg.protected_blocks, nb)
    g = [1] + [K ** (l - 1) for l in range(1, d + 1)]  # blocks per node; g[0]=1 for LOD0

    def mc(c):  # min cover cost of blocks [0, c)
        out = c // g[d]
        for l in range(1, d):
            out = out + (c // g[l]) % K
        return out

    def smallest(hi, feasible):  # smallest k in [0, hi] with feasible(k); feasible is monotone
        def body(_, lh):
            lo, hi = lh
            mid = (lo + hi) // 2
            ok = feasible(mid)
            return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)
        return jax.lax.fori_loop(0, 32, body, (jnp.zeros_like(hi), hi))[1]

    budget_blocks = B - r
    fits = K * p + mc(nb - p) <= budget_blocks
    c0 = smallest(nb - p, lambda c: K * (nb - c) + mc(c) <= budget_blocks)
    c0 = jnp.where(fits, c0, nb - p)
    cs = [c0]
    fixed = K * (nb - c0)
    for l in range(1, d):
        unit = K ** l
        prev = cs[-1]
        k_hi = prev // unit
        k = smallest(k_hi, lambda k, prev=prev, fixed=fixed, l=l:
                     fixed + (prev - k * unit) // g[l] + mc(k * unit) <= budget_blocks)
        c = k * unit
        fixed = fixed + (prev - c) // g[l]
        cs.append(c)
    # runs, oldest first: level d over [0, c_{d-1}), level l over [c_l, c_{l-1}), LOD0, open
    run_level, run_start, run_count = [], [], []
    run_level.append(d); run_start.append(jnp.int32(0)); run_count.append(cs[d - 1] // g[d])
    for l in range(d - 1, 0, -1):
        run_level.append(l); run_start.append(cs[l] // g[l])
        run_count.append((cs[l - 1] - cs[l]) // g[l])
    run_level.append(0); run_start.append(c0); run_count.append(nb - c0)
    run_level.append(0); run_start.append(nb); run_count.append(jnp.int32(1))
    counts = jnp.stack(run_count).astype(jnp.int32)
    ends = jnp.cumsum(counts)
    i = jnp.arange(E, dtype=jnp.int32)
    run = jnp.minimum(jnp.searchsorted(ends, i, side="right"), len(run_level) - 1)
    offset = i - (ends - counts)[run]
    level = jnp.asarray(run_level, jnp.int32)[run]
    node = jnp.stack(run_start).astype(jnp.int32)[run] + offset
    valid = i < ends[-1]
    age = jnp.full((E,), AGE_MAX, jnp.int32)
    return _make(level, node, valid, age, T, jnp.where(fits, 0, ERR_HISTORY), K)


# ----------------------------------------------------------------------------- append

def append(wc: WorkingContext, n, cfg: WCConfig) -> WorkingContext:
    """The cursor moves n tokens (0 <= n <= K, traced ok): the open entry grows; when its
    block completes it becomes a full LOD0 block and a new, empty open entry starts. Past
    w_max: unchanged, ERR_BUDGET (run the allocator with `incoming=n` first)."""
    K = cfg.block_size
    n = jnp.asarray(n, jnp.int32)
    ok = (n >= 0) & (n <= K) & (wc.total_cost() + n <= cfg.w_max)
    n = jnp.where(ok, n, 0)
    t1 = wc.num_tokens + n
    completes = (t1 // K) > (wc.num_tokens // K)
    i = jnp.arange(cfg.max_entries, dtype=jnp.int32)
    new_open = completes & (i == wc.num_entries)
    level = jnp.where(new_open, 0, wc.level_E)
    node = jnp.where(new_open, t1 // K, wc.node_E)
    valid = wc.valid_E | new_open
    age = jnp.where(new_open, AGE_MAX, wc.age_E)
    return _make(level, node, valid, age, t1, wc.error | jnp.where(ok, 0, ERR_BUDGET), K)


# ----------------------------------------------------------------------------- legality

def open_index(wc: WorkingContext) -> jax.Array:
    return wc.num_entries - 1


def protected_start(wc: WorkingContext, cfg: WCConfig) -> jax.Array:
    """First protected block: blocks >= this (and the open block) must stay LOD0."""
    return wc.num_tokens // cfg.block_size - cfg.protected_blocks


def expandable(wc: WorkingContext, cfg: WCConfig) -> jax.Array:
    """bool [E]: gists (structurally expandable; the budget is checked separately)."""
    i = jnp.arange(cfg.max_entries)
    return wc.valid_E & (i != open_index(wc)) & (wc.level_E >= 1)


def collapsible_block(wc: WorkingContext, cfg: WCConfig) -> jax.Array:
    """bool [E]: complete, unprotected LOD0 blocks."""
    i = jnp.arange(cfg.max_entries)
    return (wc.valid_E & (i != open_index(wc)) & (wc.level_E == 0)
            & (wc.node_E < protected_start(wc, cfg)))


def group_heads(wc: WorkingContext, cfg: WCConfig) -> jax.Array:
    """bool [E]: entry e starts K sibling gists (level 1..depth-1) all present in the WC.

    Contiguity makes the K-th entry and a count of LOD0 rows enough: if entry e+K-1 is
    sibling K-1 at the same level, the K-2 entries between cover K-2 sibling spans, so each
    is exactly one sibling, except that a LOD0 block spans the same tokens as a LOD1 gist.
    """
    K, E = cfg.block_size, cfg.max_entries
    i = jnp.arange(E)
    last = jnp.minimum(i + K - 1, E - 1)
    lod0_incl = jnp.cumsum((wc.level_E == 0) & wc.valid_E)
    lod0_in_window = lod0_incl[last] - lod0_incl + (wc.level_E == 0)
    return (wc.valid_E & (wc.level_E >= 1) & (wc.level_E < cfg.depth)
            & (wc.node_E % K == 0) & (i + K - 1 < wc.num_entries)
            & (wc.level_E[last] == wc.level_E) & (wc.node_E[last] == wc.node_E + K - 1)
            & (lod0_in_window == 0))


def window_K(x_E: jax.Array, K: int) -> jax.Array:
    """[E, K]: x[e + j], clipped at the end (only read at group heads)."""
    E = x_E.shape[0]
    idx = jnp.minimum(jnp.arange(E)[:, None] + jnp.arange(K)[None, :], E - 1)
    return x_E[idx]


# ----------------------------------------------------------------------------- moves

def splice(wc: WorkingContext, kind, e, cfg: WCConfig, fresh_age=0, u_E=None):
    """Apply one move at entry e (kind EXPAND/COLLAPSE, 0 = no-op) without legality checks.

    expand LOD1 -> LOD0 block; expand level l >= 2 -> K children; collapse LOD0 -> LOD1;
    collapse (e = group head) K siblings -> parent. New entries get `fresh_age`; when scores
    u_E ride along, new entries inherit the parent's score (expand) or the mean (collapse).
    Returns (wc, u_E).
    """
    K, E = cfg.block_size, cfg.max_entries
    kind = jnp.asarray(kind, jnp.int32)
    e = jnp.clip(jnp.asarray(e, jnp.int32), 0, E - 1)
    lvl, nd = wc.level_E[e], wc.node_E[e]
    is_exp, is_col = kind == EXPAND, kind == COLLAPSE
    to_children = is_exp & (lvl >= 2)
    from_group = is_col & (lvl >= 1)
    n_rm = jnp.where(from_group, K, jnp.where(is_exp | is_col, 1, 0))
    n_add = jnp.where(to_children, K, jnp.where(is_exp | is_col, 1, 0))
    new_level = jnp.where(is_exp, lvl - 1, lvl + 1)
    i = jnp.arange(E, dtype=jnp.int32)
    j = i - e
    new_node = jnp.where(to_children, nd * K + j, jnp.where(from_group, nd // K, nd))
    in_new = (j >= 0) & (j < n_add)
    src = jnp.clip(jnp.where(i < e, i, i - n_add + n_rm), 0, E - 1)
    n_entries = wc.num_entries - n_rm + n_add
    valid = i < n_entries
    level = jnp.where(in_new, new_level, wc.level_E[src])
    node = jnp.where(in_new, new_node, wc.node_E[src])
    age = jnp.where(in_new, fresh_age, wc.age_E[src])
    out = _make(level, node, valid, age, wc.num_tokens, wc.error, K)
    if u_E is None:
        return out, None
    mean_u = jnp.mean(u_E[jnp.minimum(e + jnp.arange(K), E - 1)])
    new_u = jnp.where(from_group, mean_u, u_E[e])
    u_E = jnp.where(in_new, new_u, u_E[src])
    return out, jnp.where(valid, u_E, 0.0)


def move_legal(wc: WorkingContext, kind, e, cfg: WCConfig):
    """(legal, head): whether kind at entry e is a legal move within budget; for a group
    collapse any member may be named and `head` is the group's first entry."""
    K, E = cfg.block_size, cfg.max_entries
    e = jnp.asarray(e, jnp.int32)
    in_range = (e >= 0) & (e < E)
    ec = jnp.clip(e, 0, E - 1)
    room = wc.total_cost() + K - 1 <= cfg.w_max
    exp_ok = expandable(wc, cfg)[ec] & room
    head = jnp.where(wc.level_E[ec] >= 1, ec - wc.node_E[ec] % K, ec)
    hc = jnp.clip(head, 0, E - 1)
    col_ok = jnp.where(wc.level_E[ec] == 0, collapsible_block(wc, cfg)[ec],
                       (head >= 0) & group_heads(wc, cfg)[hc] & wc.valid_E[ec])
    legal = in_range & jnp.where(kind == EXPAND, exp_ok, (kind == COLLAPSE) & col_ok)
    return legal, jnp.where(kind == COLLAPSE, hc, ec)


def move(wc: WorkingContext, kind, e, cfg: WCConfig) -> WorkingContext:
    """Pure, jit-able: apply a move if legal, else return wc unchanged with ERR_ILLEGAL set."""
    legal, at = move_legal(wc, kind, e, cfg)
    out, _ = splice(wc, jnp.where(legal, kind, 0), at, cfg, fresh_age=0)
    return out.replace(error=wc.error | jnp.where(legal, 0, ERR_ILLEGAL))


def expand(wc, e, cfg):
    return move(wc, EXPAND, e, cfg)


def collapse(wc, e, cfg):
    return move(wc, COLLAPSE, e, cfg)


def explain_illegal(wc: WorkingContext, kind: int, e: int, cfg: WCConfig) -> str | None:
    """Host side: None if the move is legal, else the reason in words."""
    K = cfg.block_size
    wc = jax.device_get(wc)
    n = int(wc.num_entries)
    if kind not in (EXPAND, COLLAPSE):
        return f"unknown move kind {kind}; use EXPAND ({EXPAND}) or COLLAPSE ({COLLAPSE})"
    if not 0 <= e < n:
        return f"entry {e} does not exist (the WC has {n} entries)"
    if e == n - 1:
        return "the open block (newest, incomplete) always stays raw tokens"
    lvl, nd = int(wc.level_E[e]), int(wc.node_E[e])
    if kind == EXPAND:
        if lvl == 0:
            return f"entry {e} is a LOD0 block: LOD0 never expands"
        cost = int(np.sum(wc.cost_E))
        if cost + K - 1 > cfg.w_max:
            return (f"expanding entry {e} costs {K - 1} more positions; the WC uses "
                    f"{cost} of w_max={cfg.w_max}")
        return None
    if lvl == 0:
        if nd >= int(wc.num_tokens) // K - cfg.protected_blocks:
            return (f"entry {e} (block {nd}) is one of the {cfg.protected_blocks} newest "
                    "blocks, which stay LOD0")
        return None
    if lvl >= cfg.depth:
        return f"entry {e} is at the top level ({lvl}): the top level never collapses"
    head = e - nd % K
    group = [(int(wc.level_E[i]), int(wc.node_E[i])) for i in range(max(head, 0), head + K)]
    if head < 0 or group != [(lvl, nd - nd % K + j) for j in range(K)]:
        return (f"entry {e} (level {lvl}, node {nd}): its {K} siblings are not all present "
                f"at level {lvl}, so they cannot collapse into their parent")
    return None


def apply_move(wc: WorkingContext, kind: int, e: int, cfg: WCConfig) -> WorkingContext:
    """Host wrapper: raise IllegalActionError with the reason, else apply the jitted move."""
    why = explain_illegal(wc, kind, e, cfg)
    if why is not None:
        raise IllegalActionError(why)
    return _jit_move(wc, kind, e, cfg)


_jit_move = jax.jit(move, static_argnums=(3,))


# ----------------------------------------------------------------------------- host checks

def check_wc(wc: WorkingContext, cfg: WCConfig | None = None) -> WorkingContext:
    """Host side: raise for any sticky error bit."""
    err = int(np.asarray(jax.device_get(wc.error)).max())
    w = f" {cfg.w_max}" if cfg else ""
    if err & ERR_HISTORY:
        raise ConfigError(f"the history of {int(np.max(wc.num_tokens))} tokens cannot fit the "
                          f"budget{w} even fully collapsed; raise w_max or depth")
    if err & ERR_NO_ROOM:
        raise ConfigError(f"no legal collapse could make room for the incoming tokens in "
                          f"w_max{w}; the config cannot hold this history (see "
                          "WCConfig.max_tokens)")
    if err & ERR_BUDGET:
        raise CapacityError(f"appending would pass w_max{w}; nothing was appended. Run the "
                            "focus allocator with incoming=n first (it makes room)")
    if err & ERR_ILLEGAL:
        raise IllegalActionError("an illegal expand/collapse was requested; the WC is "
                                 "unchanged (use explain_illegal for the reason)")
    return wc


# ----------------------------------------------------------------------------- materialise

@flax.struct.dataclass
class EntryData:
    """What each entry needs from the tree: paged in from device or host memory."""

    tokens_ExK: jax.Array  # int32; a LOD0 entry's block ids (zeros elsewhere)
    vec_ExD: jax.Array  # a gist's vector; a complete LOD0 block's LOD1 gist; zeros otherwise


@flax.struct.dataclass
class Materialised:
    x_WxD: jax.Array  # base-model input embeddings; zeros in invalid slots
    pos_W: jax.Array  # int32 positions (compact or global mode); 0 in invalid slots
    sigma_W: jax.Array  # float32 Gaussian-RoPE sigma: span width (tokens) for gists, 0 for LOD0
    valid_W: jax.Array  # bool
    slot_entry_W: jax.Array  # int32 entry of each slot, -1 when invalid
    entry_first_slot_E: jax.Array  # int32 first slot of each entry (= total cost when empty)
    level_E: jax.Array  # int32 per-entry metadata for LensNet ...
    span_E: jax.Array  # int32 tokens covered (the open block: its length)
    dist_E: jax.Array  # int32 cursor block - entry's last block (open block 0)
    age_E: jax.Array  # int32 steps since last edit
    valid_E: jax.Array  # bool


def entry_spans(wc: WorkingContext, cfg: WCConfig):
    """(first token, span in tokens) of each entry; the open block's span is its length."""
    K = cfg.block_size
    unit = _pow(K, jnp.maximum(wc.level_E, 1))
    start = wc.node_E * unit
    span = jnp.where(wc.level_E > 0, unit, wc.cost_E)
    return start, span


def gather_entries(wc: WorkingContext, tree, cfg: WCConfig) -> EntryData:
    """Device gather of each entry's tokens / vector from a device `mc_jax.core.tree.Tree`.

    Cost is E_max * (K + depth * D), independent of the tree's capacity.
    """
    K = cfg.block_size
    tok = tree.tokens_T
    is_tok = wc.valid_E & (wc.level_E == 0)
    # rows an entry does not need read index 0, so memory traffic is only what the WC shows
    idx_ExK = jnp.where(is_tok, wc.node_E, 0)[:, None] * K + jnp.arange(K)[None, :]
    tokens = jnp.where(is_tok[:, None], tok[jnp.clip(idx_ExK, 0, tok.shape[0] - 1)], 0)
    complete_block = is_tok & (wc.node_E < wc.num_tokens // K)
    view_level = jnp.where(wc.level_E == 0, 1, wc.level_E)
    vec = jnp.zeros((cfg.max_entries, tree.gists[0].shape[1]), tree.gists[0].dtype)
    for l in range(1, cfg.depth + 1):
        rows = tree.gists[l - 1]
        use = wc.valid_E & (view_level == l) & ((wc.level_E > 0) | complete_block)
        got = rows[jnp.clip(jnp.where(use, wc.node_E, 0), 0, rows.shape[0] - 1)]
        vec = jnp.where(use[:, None], got, vec)
    return EntryData(tokens_ExK=tokens.astype(jnp.int32), vec_ExD=vec)


def lens_inputs(wc: WorkingContext, tree, cfg: WCConfig) -> jax.Array:
    """[E, D] the vector LensNet sees per entry: a gist's own vector, a LOD0 block's LOD1
    gist (zeros for the open block, which has none yet, and for padding)."""
    return gather_entries(wc, tree, cfg).vec_ExD


def materialise(wc: WorkingContext, entries: EntryData, embed_fn: Callable, cfg: WCConfig,
                mode: str = "compact") -> Materialised:
    """Base-model input for the WC: embeddings, positions, sigma, masks and metadata.

    compact: positions 0..len-1 in WC order. global: absolute token index for LOD0 slots, and
    first token + span // 2 (the centre, rounded up) for gists.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    K, W = cfg.block_size, cfg.w_max
    cum_E = jnp.cumsum(wc.cost_E)
    first_E = cum_E - wc.cost_E
    s = jnp.arange(W, dtype=jnp.int32)
    valid_W = s < cum_E[-1]
    ent_W = jnp.clip(jnp.searchsorted(cum_E, s, side="right"), 0, cfg.max_entries - 1)
    ent_W = ent_W.astype(jnp.int32)
    off_W = s - first_E[ent_W]
    lvl_W = wc.level_E[ent_W]
    is_tok = valid_W & (lvl_W == 0)
    ids_W = jnp.where(is_tok, entries.tokens_ExK[ent_W, jnp.clip(off_W, 0, K - 1)], 0)
    tok_x = embed_fn(ids_W)
    gist_x = entries.vec_ExD[ent_W].astype(tok_x.dtype)
    x = jnp.where(is_tok[:, None], tok_x, gist_x)
    x = jnp.where(valid_W[:, None], x, 0)
    start_E, span_E = entry_spans(wc, cfg)
    if mode == "compact":
        pos = s
    else:
        pos = jnp.where(lvl_W == 0, start_E[ent_W] + off_W, start_E[ent_W] + span_E[ent_W] // 2)
    pos = jnp.where(valid_W, pos, 0).astype(jnp.int32)
    sigma = jnp.where(valid_W & (lvl_W > 0), span_E[ent_W], 0).astype(jnp.float32)
    last_block = jnp.where(wc.level_E == 0, wc.node_E,
                           (start_E + span_E - 1) // K)
    dist = jnp.where(wc.valid_E, wc.num_tokens // K - last_block, 0)
    return Materialised(
        x_WxD=x, pos_W=pos, sigma_W=sigma, valid_W=valid_W,
        slot_entry_W=jnp.where(valid_W, ent_W, -1),
        entry_first_slot_E=first_E.astype(jnp.int32),
        level_E=wc.level_E, span_E=jnp.where(wc.valid_E, span_E, 0).astype(jnp.int32),
        dist_E=dist.astype(jnp.int32), age_E=wc.age_E, valid_E=wc.valid_E)


def materialise_tree(wc, tree, embed_fn, cfg: WCConfig, mode: str = "compact"):
    """materialise(wc, gather_entries(wc, tree, cfg), ...) for a device tree."""
    return materialise(wc, gather_entries(wc, tree, cfg), embed_fn, cfg, mode)


def to_host_entries(wc: WorkingContext) -> list[tuple[int, int, int, int]]:
    """[(level, node, cost, age)] of the valid entries, for tests and debugging."""
    h = jax.device_get(wc)
    n = int(h.num_entries)
    cols = [np.asarray(a)[:n] for a in (h.level_E, h.node_E, h.cost_E, h.age_E)]
    return [tuple(int(c[i]) for c in cols) for i in range(n)]
