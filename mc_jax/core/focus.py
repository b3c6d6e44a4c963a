"""The focus allocator: turn per-entry scores u in [-1, 1] into expand/collapse moves.

Greedy and vectorised, as in SPEC section 2. One call (`allocate`) is one refocus step:

1. Voluntary phase, at most n_diff moves. Candidates are recomputed after every move:
   - expand: gists (not the open block) with u > tau_expand, outside their cooldown;
   - collapse: unprotected complete LOD0 blocks with u < -tau_collapse, and groups of K
     sibling gists (levels 1..depth-1, all present, all outside cooldown) whose mean u is
     < -tau_collapse.
   Each move takes the best expansion (highest u) if the budget allows it (cost + K-1 +
   incoming <= w_max) and its margin u - tau_expand is at least the best collapse's margin
   -u - tau_collapse; otherwise the best collapse (lowest u, so collapses make room for
   expansions that need it). Ties go to the oldest entry.
2. Forced phase: while cost + incoming > w_max, collapse the lowest-scored legal candidate
   (unprotected LOD0 block or complete sibling group; thresholds and cooldown ignored, since
   the budget is hard), oldest first on ties. History is never dropped.
3. Every entry's steps-since-edit grows by one; entries created in this step start at 0.
   An entry may be edited again once its age is >= cooldown (cooldown=2: created at step s,
   editable again at step s+3). Entries created in a step are never edited again in it.

New entries inherit a score for the rest of the step: an expansion's children take the
parent's u; a collapsed group's parent takes the group mean.

`keep_blocks_raw` (host side, not a refocus step) is the focus of the training-free retrieval
policies: it makes a ranked list of blocks raw, collapsing the oldest other raw blocks (then
LOD1 sibling groups) for room.

Letters: E entry rows, A action-log rows (n_diff + forced slots), K block size.
"""
from __future__ import annotations

import dataclasses

import flax.struct
import jax
import jax.numpy as jnp

from mc_jax.errors import ConfigError
from mc_jax.core import working_context as wcm
from mc_jax.core.working_context import WCConfig, WorkingContext

KIND_NONE, KIND_EXPAND, KIND_COLLAPSE, KIND_FORCED = 0, 1, 2, 3
# reason codes: per log row, and for the step (stop_reason)
REASON_ACTED = 0
REASON_NO_CANDIDATES = 1  # nothing past a threshold (and eligible) is left
REASON_BUDGET = 2  # expansions wanted, but no room and nothing left to collapse
REASON_N_DIFF = 3  # stopped at n_diff with candidates left (stop_reason only)
REASON_NOT_NEEDED = 4  # forced row: the budget already had room for the incoming tokens
REASON_NO_ROOM = 5  # forced row: room was needed but no legal collapse exists (config error)


@dataclasses.dataclass(frozen=True)
class FocusConfig:
    tau_expand: float = 0.2
    tau_collapse: float = 0.2
    n_diff: int = 4
    cooldown: int = 2
    group_score: str = "mean"  # a sibling group's collapse score: "mean" (SPEC) or "max" (zoom)

    def __post_init__(self):
        if self.group_score not in ("mean", "max"):
            raise ConfigError(f"group_score must be 'mean' or 'max', got {self.group_score!r}")
        if self.n_diff < 0:
            raise ConfigError(f"n_diff must be >= 0, got {self.n_diff}")
        if self.cooldown < 0:
            raise ConfigError(f"cooldown must be >= 0, got {self.cooldown}")
        if self.tau_expand < 0 or self.tau_collapse < 0:
            raise ConfigError("tau_expand and tau_collapse must be >= 0, got "
                              f"{self.tau_expand}, {self.tau_collapse}")


def forced_slots(cfg: WCConfig) -> int:
    """Forced collapses one step may need: ceil(K / (K-1)) for up to K incoming tokens."""
    K = cfg.block_size
    return -(-K // (K - 1))


@flax.struct.dataclass
class ActionLog:
    kind_A: jax.Array  # int32 KIND_*
    level_A: jax.Array  # int32 level of the entry acted on (before the move)
    node_A: jax.Array  # int32 its node index (a group collapse: the first sibling)
    score_A: jax.Array  # float32 its u (a group: the mean)
    reason_A: jax.Array  # int32 REASON_* (REASON_ACTED when a move was made)
    stop_reason: jax.Array  # int32: why the voluntary phase did no more
    cooldown_hits: jax.Array  # int32: entries past a threshold but held by cooldown
    protected_hits: jax.Array  # int32: protected blocks with u < -tau_collapse
    budget_blocked: jax.Array  # int32: expansions still wanted at the end, for lack of room

    def num_actions(self) -> jax.Array:
        return jnp.sum(self.kind_A != KIND_NONE)


def _candidates(wc: WorkingContext, u_E, wcfg: WCConfig, fcfg: FocusConfig, voluntary: bool):
    """(expand mask, collapse score): collapse score is u for a block, the group mean for a
    group head, +inf for anything that cannot collapse."""
    K, E = wcfg.block_size, wcfg.max_entries
    tau_e = jnp.float32(fcfg.tau_expand)
    tau_c = jnp.float32(fcfg.tau_collapse)
    heads = wcm.group_heads(wc, wcfg)
    H = E // K + 1  # groups are disjoint, so at most E // K heads
    head_H = jnp.nonzero(heads, size=H, fill_value=E)[0]
    win_HxK = jnp.minimum(head_H[:, None] + jnp.arange(K)[None, :], E - 1)
    gmean_H = (jnp.max if fcfg.group_score == "max" else jnp.mean)(u_E[win_HxK], axis=1)
    gmean = jnp.full((E,), jnp.inf, jnp.float32).at[head_H].set(gmean_H, mode="drop")
    blocks = wcm.collapsible_block(wc, wcfg)
    if voluntary:
        elig = wc.age_E >= fcfg.cooldown
        gelig_H = jnp.all(wc.age_E[win_HxK] >= fcfg.cooldown, axis=1)
        gelig = jnp.zeros((E,), bool).at[head_H].set(gelig_H, mode="drop")
        expand = wcm.expandable(wc, wcfg) & elig & (u_E > tau_e)
        blocks = blocks & elig & (u_E < -tau_c)
        heads = heads & gelig & (gmean < -tau_c)
    else:
        expand = jnp.zeros((E,), bool)
    score = jnp.where(blocks, u_E, jnp.where(heads, gmean, jnp.inf))
    return expand, score


def allocate(wc: WorkingContext, u_E: jax.Array, wcfg: WCConfig, fcfg: FocusConfig,
             incoming=None):
    """One refocus step. u_E: float [E] scores aligned with the WC rows (padding ignored).

    incoming (<= K, traced ok; default K): tokens the caller will append before the next
    refocus; the step leaves room for them. Returns (new wc, ActionLog). If no legal collapse
    can make that room, ERR_NO_ROOM is set (a config error; `WCConfig.max_tokens` catches it
    up front).
    """
    K, E = wcfg.block_size, wcfg.max_entries
    incoming = jnp.clip(jnp.asarray(K if incoming is None else incoming, jnp.int32), 0, K)
    tau_e = jnp.float32(fcfg.tau_expand)
    tau_c = jnp.float32(fcfg.tau_collapse)
    u = jnp.where(wc.valid_E, u_E.astype(jnp.float32), 0.0)
    n_f = forced_slots(wcfg)
    A = fcfg.n_diff + n_f
    zeros_i = jnp.zeros((A,), jnp.int32)
    log = dict(kind=zeros_i, level=zeros_i, node=zeros_i,
               score=jnp.zeros((A,), jnp.float32), reason=zeros_i)

    # telemetry on the incoming state
    elig = wc.age_E >= fcfg.cooldown
    want_e = wcm.expandable(wc, wcfg) & (u > tau_e)
    blocks = wc.valid_E & (jnp.arange(E) != wcm.open_index(wc)) & (wc.level_E == 0)
    want_c = wcm.collapsible_block(wc, wcfg) & (u < -tau_c)
    cooldown_hits = jnp.sum((want_e | want_c) & ~elig)
    protected_hits = jnp.sum(blocks & ~wcm.collapsible_block(wc, wcfg) & (u < -tau_c))

    def record(log, a, kind, at, score, reason, wc):
        return dict(kind=log["kind"].at[a].set(kind),
                    level=log["level"].at[a].set(jnp.where(kind > 0, wc.level_E[at], 0)),
                    node=log["node"].at[a].set(jnp.where(kind > 0, wc.node_E[at], 0)),
                    score=log["score"].at[a].set(jnp.where(kind > 0, score, 0.0)),
                    reason=log["reason"].at[a].set(reason))

    def pick(wc, u):
        expand, cscore = _candidates(wc, u, wcfg, fcfg, voluntary=True)
        has_e, has_c = jnp.any(expand), jnp.any(cscore < jnp.inf)
        e_idx = jnp.argmax(jnp.where(expand, u, -jnp.inf))
        c_idx = jnp.argmin(cscore)
        room = wc.total_cost() + (K - 1) + incoming <= wcfg.w_max
        margin_e = u[e_idx] - tau_e
        margin_c = -cscore[c_idx] - tau_c
        take_e = has_e & room & (~has_c | (margin_e >= margin_c))
        take_c = ~take_e & has_c
        return has_e, has_c, room, take_e, take_c, e_idx, c_idx, u[e_idx], cscore[c_idx]

    def voluntary(a, carry):
        wc, u, log = carry
        has_e, has_c, room, take_e, take_c, e_idx, c_idx, ue, uc = pick(wc, u)
        kind = jnp.where(take_e, wcm.EXPAND, jnp.where(take_c, wcm.COLLAPSE, 0))
        at = jnp.where(take_e, e_idx, c_idx)
        reason = jnp.where(take_e | take_c, REASON_ACTED,
                           jnp.where(has_e, REASON_BUDGET, REASON_NO_CANDIDATES))
        log = record(log, a, jnp.where(take_e, KIND_EXPAND, jnp.where(take_c, KIND_COLLAPSE,
                                                                         KIND_NONE)),
                     at, jnp.where(take_e, ue, uc), reason, wc)
        wc, u = wcm.splice(wc, kind, at, wcfg, fresh_age=-1, u_E=u)
        return wc, u, log

    wc, u, log = jax.lax.fori_loop(0, fcfg.n_diff, voluntary, (wc, u, log))
    has_e, has_c, room, take_e, take_c, *_ = pick(wc, u)
    stop_reason = jnp.where(take_e | take_c, REASON_N_DIFF,
                            jnp.where(has_e, REASON_BUDGET, REASON_NO_CANDIDATES))
    budget_blocked = jnp.where(room, 0, jnp.sum(
        _candidates(wc, u, wcfg, fcfg, voluntary=True)[0]))

    def forced(a, carry):
        wc, u, log, no_room = carry
        need = wc.total_cost() + incoming > wcfg.w_max
        _, cscore = _candidates(wc, u, wcfg, fcfg, voluntary=False)
        has = jnp.any(cscore < jnp.inf)
        c_idx = jnp.argmin(cscore)
        take = need & has
        reason = jnp.where(take, REASON_ACTED,
                           jnp.where(need, REASON_NO_ROOM, REASON_NOT_NEEDED))
        log = record(log, fcfg.n_diff + a, jnp.where(take, KIND_FORCED, KIND_NONE), c_idx,
                     cscore[c_idx], reason, wc)
        wc, u = wcm.splice(wc, jnp.where(take, wcm.COLLAPSE, 0), c_idx, wcfg, fresh_age=-1,
                           u_E=u)
        return wc, u, log, no_room | (need & ~has)

    wc, u, log, no_room = jax.lax.fori_loop(0, n_f, forced, (wc, u, log, jnp.bool_(False)))
    no_room = no_room | (wc.total_cost() + incoming > wcfg.w_max)

    age = jnp.where(wc.age_E < 0, 0, jnp.minimum(wc.age_E + 1, wcm.NEVER_EDITED))
    wc = wc.replace(age_E=jnp.where(wc.valid_E, age, 0),
                    error=wc.error | jnp.where(no_room, wcm.ERR_NO_ROOM, 0))
    out_log = ActionLog(kind_A=log["kind"], level_A=log["level"], node_A=log["node"],
                        score_A=log["score"], reason_A=log["reason"],
                        stop_reason=stop_reason.astype(jnp.int32),
                        cooldown_hits=cooldown_hits.astype(jnp.int32),
                        protected_hits=protected_hits.astype(jnp.int32),
                        budget_blocked=budget_blocked.astype(jnp.int32))
    return wc, out_log


def recency_step(wc: WorkingContext, wcfg: WCConfig, incoming=None) -> WorkingContext:
    """The no-LensNet baseline for a running decode: rebuild the recency-policy WC for the
    current history, leaving room for `incoming` tokens (default K). Ages of the rebuilt
    entries restart at NEVER_EDITED (the baseline has no cooldown); error bits are kept."""
    K = wcfg.block_size
    incoming = jnp.clip(jnp.asarray(K if incoming is None else incoming, jnp.int32), 0, K)
    out = wcm.build_recency(wc.num_tokens, wcfg, budget=wcfg.w_max - incoming)
    return out.replace(error=wc.error | out.error)


# ----------------------------------------------------------------------------- keep blocks raw

def _covering_entry(entries, b: int, K: int) -> int:
    """Index of the entry (host table of `to_host_entries`) whose span holds block b."""
    for i, (level, node, _, _) in enumerate(entries):
        lo = node if level == 0 else node * K ** (level - 1)
        hi = lo + (1 if level == 0 else K ** (level - 1))
        if lo <= b < hi:
            return i
    raise ValueError(f"no entry covers block {b}")  # unreachable for a legal WC


def _room_move(entries, target: int, kept, pstart: int, cfg: WCConfig) -> int | None:
    """The collapse that makes room for the next expansion toward `target` (see
    `keep_blocks_raw`), or None when there is none."""
    K, last = cfg.block_size, len(entries) - 1
    for i, (level, node, _, _) in enumerate(entries[:last]):
        if level == 0 and node < pstart and node not in kept and node != target:
            return i
    if cfg.depth < 2:
        return None
    for i in range(last):
        level, node = entries[i][:2]
        if level != 1 or node % K or i + K > last:
            continue
        if all(entries[i + j][:2] == (1, node + j) for j in range(K)) \
                and not node <= target < node + K and not any(node <= k < node + K for k in kept):
            return i
    return None


def keep_blocks_raw(wc: WorkingContext, blocks, cfg: WCConfig,
                    incoming: int = 0) -> tuple[WorkingContext, list[int]]:
    """Host side: make the ranked blocks (best first) raw (LOD0) in turn, as far as the budget
    allows, leaving room for `incoming` more tokens (a block the base reads next: cost +
    incoming <= w_max after every move). -> (new WC, the blocks kept raw, in rank order).

    For each block: the entry covering it is expanded (a level-l >= 2 gist into its K children,
    then the LOD1 gist into the raw block) until the block is LOD0. Before each expansion (it
    costs K - 1 positions: cost + K - 1 + incoming <= w_max) room is made by collapsing, oldest first, a
    collapsible raw block (complete, unprotected LOD0) that is neither kept nor the target; if
    there is none, a complete group of K sibling LOD1 gists holding neither a kept block nor the
    target, oldest first. When no room can be made the walk stops there (the WC keeps the
    expansions made so far toward that block, all legal). A block already raw counts as kept;
    a repeated block, a block outside the complete history, or a protected block (raw anyway)
    is skipped and not listed. Every move goes through `working_context.apply_move`, so every
    move is checked legal. Not jit-able (a host loop, one jitted move per step)."""
    K = cfg.block_size
    entries = wcm.to_host_entries(wc)
    pstart = int(jax.device_get(wc.num_tokens)) // K - cfg.protected_blocks
    kept: list[int] = []
    for b in blocks:
        b = int(b)
        if not 0 <= b < pstart or b in kept:
            continue
        while True:
            e = _covering_entry(entries, b, K)
            if entries[e][0] == 0:
                kept.append(b)
                break
            cost = sum(c for _, _, c, _ in entries)
            if cost + K - 1 + incoming > cfg.w_max:
                c = _room_move(entries, b, kept, pstart, cfg)
                if c is None:
                    return wc, kept
                wc = wcm.apply_move(wc, wcm.COLLAPSE, c, cfg)
            else:
                wc = wcm.apply_move(wc, wcm.EXPAND, e, cfg)
            entries = wcm.to_host_entries(wc)
    return wc, kept


# ------------------------------------------------------------------------- zoom before answering

@flax.struct.dataclass
class ZoomLog:
    """What `zoom` did: rounds run, voluntary moves per round (0 past the last), and why it
    stopped (ZOOM_CONVERGED: a round made no move; ZOOM_ROUND_LIMIT: `rounds` ran out)."""

    rounds: jax.Array      # int32
    expands_R: jax.Array   # int32 [rounds]
    collapses_R: jax.Array  # int32 [rounds]
    stop: jax.Array        # int32 ZOOM_*


ZOOM_CONVERGED, ZOOM_ROUND_LIMIT = 0, 1


def entry_scores(wc: WorkingContext, block_u: jax.Array, wcfg: WCConfig) -> jax.Array:
    """u [E] of each WC entry from scores of the history's blocks: the largest score among the
    blocks it covers (so a gist's score bounds those of all its descendants, and the tree can
    be searched from the top down). block_u: [n] with n a multiple of K^(depth-1) (pad with a
    low score); the open block and padding rows get 0."""
    K, E = wcfg.block_size, wcfg.max_entries
    n = block_u.shape[0]
    if n % K ** (wcfg.depth - 1):
        raise ValueError(f"block scores: {n} blocks is not a multiple of K^(depth-1) = "
                         f"{K ** (wcfg.depth - 1)} (pad them)")
    levels = [block_u.astype(jnp.float32)]
    for _ in range(2, wcfg.depth + 1):
        levels.append(levels[-1].reshape(-1, K).max(axis=1))
    u = jnp.zeros((E,), jnp.float32)
    for lv in range(0, wcfg.depth + 1):
        arr = levels[max(lv, 1) - 1]
        at = jnp.clip(wc.node_E, 0, arr.shape[0] - 1)
        u = jnp.where(wc.level_E == lv, arr[at], u)
    keep = wc.valid_E & (jnp.arange(E) != wcm.open_index(wc))
    return jnp.where(keep, u, 0.0)


def zoom(wc: WorkingContext, block_u: jax.Array, wcfg: WCConfig, fcfg: FocusConfig,
         rounds: int = 8):
    """Zoom before answering (issue 19, item 3): refocus rounds until a round makes no move or
    `rounds` have run, all in one `lax.while_loop`; each round makes at most fcfg.n_diff moves.

    Scores: `entry_scores` (a gist scores the best of its blocks, so it bounds its descendants
    and the walk goes top-down without expanding everything). A move: the best expandable entry
    with u > tau_expand is the target; if the budget has room for it (cost + K - 1 <= w_max) it
    is expanded (one level: a top-level gist into its children, a LOD1 gist into its raw block);
    otherwise the lowest-scored legal collapse (an unprotected complete raw block, or a
    complete sibling group scored by its best child) whose score is below the target's is made,
    to free room; if there is none, the round stops (the budget is spent on better entries).
    Nothing is collapsed when nothing is wanted, and nothing at least as wanted as the target is
    collapsed for it, so a zoom cannot undo itself. No cooldown inside a zoom; entries made in a
    move get age 0. The protected newest blocks stay raw (they are never collapse candidates).
    -> (wc, ZoomLog)."""
    K = wcfg.block_size
    tau_e = jnp.float32(fcfg.tau_expand)
    ccfg = dataclasses.replace(fcfg, group_score="max")

    def move(_, carry):
        wc, ne, nc, stuck = carry
        u = entry_scores(wc, block_u, wcfg)
        want = wcm.expandable(wc, wcfg) & (u > tau_e)
        has_e = jnp.any(want) & ~stuck
        e_idx = jnp.argmax(jnp.where(want, u, -jnp.inf))
        room = wc.total_cost() + (K - 1) <= wcfg.w_max
        _, cscore = _candidates(wc, u, wcfg, ccfg, voluntary=False)
        c_idx = jnp.argmin(cscore)
        can_c = cscore[c_idx] < u[e_idx]
        do_e = has_e & room
        do_c = has_e & ~room & can_c
        kind = jnp.where(do_e, wcm.EXPAND, jnp.where(do_c, wcm.COLLAPSE, 0))
        wc, _ = wcm.splice(wc, kind, jnp.where(do_e, e_idx, c_idx), wcfg, fresh_age=0, u_E=u)
        return (wc, ne + do_e.astype(jnp.int32), nc + do_c.astype(jnp.int32),
                stuck | (has_e & ~room & ~can_c))

    def cond(c):
        r, _, acted, _, _ = c
        return (r < rounds) & acted

    def body(c):
        r, wc, _, ex, co = c
        wc, ne, nc, _ = jax.lax.fori_loop(0, fcfg.n_diff, move,
                                          (wc, jnp.int32(0), jnp.int32(0), jnp.bool_(False)))
        return r + 1, wc, (ne + nc) > 0, ex.at[r].set(ne), co.at[r].set(nc)

    z = jnp.zeros((max(rounds, 1),), jnp.int32)
    r, wc, acted, ex, co = jax.lax.while_loop(cond, body, (jnp.int32(0), wc, jnp.bool_(True),
                                                           z, z))
    stop = jnp.where(acted, ZOOM_ROUND_LIMIT, ZOOM_CONVERGED).astype(jnp.int32)
    return wc, ZoomLog(rounds=r, expands_R=ex[:rounds], collapses_R=co[:rounds], stop=stop)
