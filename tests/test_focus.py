"""Focus allocator scenarios: thresholds, N_diff, room-making, cooldown, protection, forced
collapses, ties, vmap, the recency baseline and config errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.core import focus
from mc_jax.core import working_context as wcm
from mc_jax.errors import ConfigError
from core_reference import AGE_MAX, JitCore, assert_wc_equal

K = 32
WCFG = wcm.WCConfig(w_max=400, depth=2, protected_blocks=1, max_tokens=200 * K)


@functools.lru_cache(maxsize=None)
def core():
    return JitCore(WCFG, focus.FocusConfig(), with_tree=False)


@functools.lru_cache(maxsize=None)
def build_with_budget():
    return jax.jit(lambda T, B: wcm.build_recency(T, WCFG, budget=B))


def state(T, budget=WCFG.w_max):
    c = core()
    return c, build_with_budget()(T, budget), c.ref().build_recency(T, budget)


def rows(wc):
    return wcm.to_host_entries(wc)


def u_for(wc, **at):
    u = np.zeros(WCFG.max_entries, np.float32)
    for i, v in at.items():
        u[int(i.lstrip("e"))] = v
    return u


def run(c, wc, ref, u, incoming=0):
    out, log = c.allocate(wc, u, incoming)
    ref.allocate(list(u), incoming=incoming)
    assert_wc_equal(out, ref)
    return out, jax.device_get(log)


def test_nothing_past_thresholds_does_nothing():
    c, wc, ref = state(100 * K)
    u = np.full(WCFG.max_entries, 0.2, np.float32)  # not > tau_expand
    out, log = run(c, wc, ref, u)
    assert not log.kind_A.any()
    assert log.stop_reason == focus.REASON_NO_CANDIDATES
    assert (log.reason_A[:4] == focus.REASON_NO_CANDIDATES).all()
    assert (log.reason_A[4:] == focus.REASON_NOT_NEEDED).all()
    assert [r[:3] for r in rows(out)] == [r[:3] for r in rows(wc)]


def test_n_diff_caps_actions_and_ties_go_oldest_first():
    c, wc, ref = state(20 * K)
    u = np.full(WCFG.max_entries, -1.0, np.float32)
    out, log = run(c, wc, ref, u)
    assert list(log.kind_A[:4]) == [focus.KIND_COLLAPSE] * 4
    assert log.stop_reason == focus.REASON_N_DIFF
    lod0 = [n for l, n, _, _ in rows(wc) if l == 0][:4]
    assert list(log.node_A[:4]) == lod0  # all tied at -1: the oldest blocks go first


def test_collapse_makes_room_for_a_stronger_expansion():
    c, wc, ref = state(100 * K)
    assert int(wc.total_cost()) + 31 > WCFG.w_max
    r = rows(wc)
    g = max(i for i, x in enumerate(r) if x[0] == 1)  # newest LOD1 gist
    b = next(i for i, x in enumerate(r) if x[0] == 0)  # oldest LOD0 block
    out, log = run(c, wc, ref, u_for(wc, **{f"e{g}": 1.0, f"e{b}": -0.25}))
    assert list(log.kind_A[:2]) == [focus.KIND_COLLAPSE, focus.KIND_EXPAND]
    assert (log.level_A[0], log.node_A[0]) == (0, r[b][1])
    assert (log.level_A[1], log.node_A[1]) == (1, r[g][1])
    assert log.stop_reason == focus.REASON_NO_CANDIDATES


def test_budget_stops_expansions():
    c, wc, ref = state(100 * K, budget=300)
    u = np.where(np.asarray(wc.level_E) > 0, 1.0, 0.0).astype(np.float32)
    out, log = run(c, wc, ref, u)
    n_exp = int((log.kind_A == focus.KIND_EXPAND).sum())
    assert 0 < n_exp < 4 and int(out.total_cost()) + 31 > WCFG.w_max
    assert log.reason_A[n_exp] == focus.REASON_BUDGET
    assert log.stop_reason == focus.REASON_BUDGET and log.budget_blocked > 0


def test_cooldown_blocks_flipping_back():
    c, wc, ref = state(100 * K, budget=300)
    g = max(i for i, x in enumerate(rows(wc)) if x[0] == 1)
    wc, log = run(c, wc, ref, u_for(wc, **{f"e{g}": 1.0}))
    assert log.kind_A[0] == focus.KIND_EXPAND and rows(wc)[g][0] == 0
    assert rows(wc)[g][3] == 0
    for step in (1, 2):  # cooldown = 2: two refocus steps may not flip it back
        wc, log = run(c, wc, ref, u_for(wc, **{f"e{g}": -1.0}))
        assert not log.kind_A.any() and log.cooldown_hits == 1, step
    wc, log = run(c, wc, ref, u_for(wc, **{f"e{g}": -1.0}))
    assert log.kind_A[0] == focus.KIND_COLLAPSE and rows(wc)[g][:2] == (1, rows(wc)[g][1])


def test_protected_newest_blocks_stay_lod0():
    c, wc, ref = state(100 * K)
    n = int(wc.num_entries)
    out, log = run(c, wc, ref, u_for(wc, **{f"e{n - 2}": -1.0, f"e{n - 1}": -1.0}))
    assert not log.kind_A.any() and log.protected_hits == 1


def test_forced_collapse_makes_room_for_incoming_tokens():
    c, wc, ref = state(100 * K)
    assert int(wc.total_cost()) + K > WCFG.w_max
    r = rows(wc)
    lod0 = [i for i, x in enumerate(r[:-2]) if x[0] == 0]
    out, log = run(c, wc, ref, np.zeros(WCFG.max_entries, np.float32), incoming=K)
    assert log.kind_A[4] == focus.KIND_FORCED and log.reason_A[4] == focus.REASON_ACTED
    assert (log.level_A[4], log.node_A[4]) == (0, r[lod0[0]][1])  # tie: oldest first
    assert int(out.total_cost()) + K <= WCFG.w_max
    # with a lower score on a newer block, that block goes instead
    c, wc, ref = state(100 * K)
    out, log = run(c, wc, ref, u_for(wc, **{f"e{lod0[3]}": -0.1}), incoming=K)
    assert (log.kind_A[4], log.node_A[4]) == (focus.KIND_FORCED, r[lod0[3]][1])
    out = c.append(out, K)
    ref.append(K)
    assert_wc_equal(out, ref)


def test_no_legal_collapse_is_a_config_error():
    cfg = wcm.WCConfig(w_max=100, depth=1, protected_blocks=1)  # no max_tokens check
    wc = jax.jit(wcm.build_recency, static_argnums=1)(60 * K, cfg)
    out, log = jax.jit(focus.allocate, static_argnums=(2, 3))(
        wc, jnp.zeros(cfg.max_entries), cfg, focus.FocusConfig(), K)
    assert log.reason_A[-1] == focus.REASON_NO_ROOM
    with pytest.raises(ConfigError, match="no legal collapse"):
        wcm.check_wc(out, cfg)


def test_vmap_over_a_batch_of_working_contexts():
    c = core()
    Ts = [40 * K, 100 * K + 3, 150 * K + 31]
    wcs = [c.build(T) for T in Ts]
    rng = np.random.RandomState(0)
    us = (rng.randint(-64, 65, (3, WCFG.max_entries)) / 64).astype(np.float32)
    batched = jax.jit(jax.vmap(lambda wc, u: focus.allocate(wc, u, WCFG, focus.FocusConfig(),
                                                            K)))
    out, _ = batched(jax.tree.map(lambda *x: jnp.stack(x), *wcs), us)
    for b in range(3):
        one, _ = c.allocate(wcs[b], us[b], K)
        assert rows(jax.tree.map(lambda x: x[b], out)) == rows(one)


def test_recency_baseline_keeps_recency_shape_while_streaming():
    step = jax.jit(lambda wc: wcm.append(focus.recency_step(wc, WCFG, K), K, WCFG))
    wc = core().build(60 * K + 5)
    for _ in range(30):
        wc = wcm.check_wc(step(wc))
        T = int(wc.num_tokens)
        ref = core().ref().build_recency(T - K, WCFG.w_max - K)
        ref.append(K)
        want = [(l, n, cst) for l, n, cst, _ in ref.table()]
        assert [r[:3] for r in rows(wc)] == want
        assert all(a == AGE_MAX for *_, a in rows(wc))


def test_focus_config_errors():
    with pytest.raises(ConfigError):
        focus.FocusConfig(n_diff=-1)
    with pytest.raises(ConfigError):
        focus.FocusConfig(cooldown=-1)
    with pytest.raises(ConfigError):
        focus.FocusConfig(tau_expand=-0.1)
