"""The working context (WC): a padded, time-ordered entry table over the tree, and its moves.

An entry is a LOD0 block (the K raw tokens of block i, cost K) or a gist (level l >= 1, node i,
covering tokens [i*K^l, (i+1)*K^l), cost 1). The newest, still-open block is always the last
valid entry: level 0, node = num_tokens // K, cost = num_tokens % K (0 right after a block
completes). Valid entries sit at rows [0, num_entries); padding rows are all zero.

Everything here is a pure, static-shape function (gathers, scatters, cumsums over the E_max
rows), so it jit-compiles once per `WCConfig`. Errors inside jit leave the WC unchanged and set
a sticky bit in `WorkingContext.error`; `check_wc` raises them on the host.

Materialising a WC for the base model (embeddings, positions) is `core/materialise.py`.

Letters: E entry rows (E_max = w_max + 1), W slots (w_max), K block size, D gist width.
"""

from __future__ import annotations

import dataclasses
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.errors import CapacityError, ConfigError, McJaxError

NEVER_EDITED = 2 ** 30  # steps-since-edit of an entry never edited; ages saturate here

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
        floor = min_budget(K, self.protected_blocks)
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


def min_budget(block_size: int, protected_blocks: int) -> int:
    """The smallest legal w_max: the protected raw blocks, the open block (up to K - 1 tokens)
    and one incoming block."""
    return block_size * (protected_blocks + 2) - 1


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
    age_E: jax.Array  # int32, refocus steps since last edit (NEVER_EDITED = never edited)
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
    age = jnp.full((E,), NEVER_EDITED, jnp.int32)
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
    age = jnp.where(new_open, NEVER_EDITED, wc.age_E)
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



def level_entry_starts(level_N: jax.Array, K: int, depth: int) -> jax.Array:
    """The per-block layout of a WC (training's: level_N[b] = level of the entry covering block
    b, -1 if uncovered): True at the first block of every entry, the block that carries it."""
    b = jnp.arange(level_N.shape[0])
    group = jnp.asarray([K ** (max(l, 1) - 1) for l in range(depth + 1)])  # blocks per node
    g_N = group[jnp.clip(level_N, 0, depth)]
    return (level_N >= 0) & (b % g_N == 0)


def entry_spans(wc: WorkingContext, cfg: WCConfig):
    """(first token, span in tokens) of each entry; the open block's span is its length."""
    K = cfg.block_size
    unit = _pow(K, jnp.maximum(wc.level_E, 1))
    start = wc.node_E * unit
    span = jnp.where(wc.level_E > 0, unit, wc.cost_E)
    return start, span


def to_host_entries(wc: WorkingContext) -> list[tuple[int, int, int, int]]:
    """[(level, node, cost, age)] of the valid entries, for tests and debugging."""
    h = jax.device_get(wc)
    n = int(h.num_entries)
    cols = [np.asarray(a)[:n] for a in (h.level_E, h.node_E, h.cost_E, h.age_E)]
    return [tuple(int(c[i]) for c in cols) for i in range(n)]
