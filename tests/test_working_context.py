"""Working context: config checks, the four moves, illegal requests, append, materialise."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.core import focus
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, ConfigError
from core_reference import JitCore, assert_materialise_equal, assert_wc_equal

K = 32
WCFG = wcm.WCConfig(w_max=160, depth=2, protected_blocks=1, max_tokens=200 * K)


@functools.lru_cache(maxsize=None)
def core():
    return JitCore(WCFG, focus.FocusConfig())


@functools.lru_cache(maxsize=None)
def build_with_budget():
    return jax.jit(lambda T, B: wcm.build_recency(T, WCFG, budget=B))


def state(T, budget=None):
    """(core, jit WC, reference WC): the recency WC for T tokens, filled up to `budget`."""
    c = core()
    B = WCFG.w_max if budget is None else budget
    return c, build_with_budget()(T, B), c.ref().build_recency(T, B)


def find(wc, level, pred=lambda node: True):
    rows = wcm.to_host_entries(wc)
    return next(i for i, (l, n, _, _) in enumerate(rows[:-1]) if l == level and pred(n))


def test_config_errors():
    with pytest.raises(ConfigError, match="too small"):
        wcm.WCConfig(w_max=90, depth=2, protected_blocks=1)
    with pytest.raises(ConfigError, match="cannot be held"):
        wcm.WCConfig(w_max=160, depth=2, max_tokens=200_000)
    with pytest.raises(ConfigError, match="cannot be held"):
        wcm.WCConfig(w_max=170, depth=2, max_tokens=200_000)
    wcm.WCConfig(w_max=170, depth=3, max_tokens=200_000)  # one more level makes it fit
    # exactly the SPEC bound: history > w_max * K^depth can never fit
    with pytest.raises(ConfigError):
        wcm.WCConfig(w_max=256, depth=2, max_tokens=256 * K ** 2 + 1)


def test_history_that_cannot_fit_is_a_config_error():
    cfg = wcm.WCConfig(w_max=100, depth=1, protected_blocks=1)
    wc = jax.jit(wcm.build_recency, static_argnums=1)(70 * K, cfg)
    with pytest.raises(ConfigError, match="cannot fit"):
        wcm.check_wc(wc, cfg)


def test_four_moves_and_costs():
    c, wc, ref = state(3 * 1024 + 10 * K + 5, budget=100)
    cost = int(wc.total_cost())
    n = int(wc.num_entries)
    # expand LOD1 -> LOD0: 1 -> 1 entries, +31
    e = find(wc, 1)
    wc = c.move(wc, wcm.EXPAND, e)
    ref.move(wcm.EXPAND, e)
    assert_wc_equal(wc, ref)
    assert (int(wc.total_cost()), int(wc.num_entries)) == (cost + 31, n)
    # collapse it back: LOD0 -> LOD1, -31
    wc = c.move(wc, wcm.COLLAPSE, e)
    ref.move(wcm.COLLAPSE, e)
    assert_wc_equal(wc, ref)
    assert int(wc.total_cost()) == cost
    # expand a LOD2 gist -> its 32 LOD1 children: 1 -> 32 entries, +31
    e2 = find(wc, 2)
    node = wcm.to_host_entries(wc)[e2][1]
    wc = c.move(wc, wcm.EXPAND, e2)
    ref.move(wcm.EXPAND, e2)
    assert_wc_equal(wc, ref)
    rows = wcm.to_host_entries(wc)
    assert [r[:2] for r in rows[e2:e2 + K]] == [(1, node * K + j) for j in range(K)]
    assert (int(wc.total_cost()), int(wc.num_entries)) == (cost + 31, n + 31)
    assert all(r[3] == 0 for r in rows[e2:e2 + K])  # new entries: edited now
    # collapse the siblings back (naming any member) -> the parent: 32 -> 1, -31
    wc = c.move(wc, wcm.COLLAPSE, e2 + 17)
    ref.move(wcm.COLLAPSE, e2 + 17)
    assert_wc_equal(wc, ref)
    assert wcm.to_host_entries(wc)[e2][:2] == (2, node)
    assert (int(wc.total_cost()), int(wc.num_entries)) == (cost, n)


@pytest.mark.parametrize("kind,where,match", [
    (wcm.EXPAND, "lod0", "never expands"),
    (wcm.COLLAPSE, "top", "top level never collapses"),
    (wcm.COLLAPSE, "protected", "stay LOD0"),
    (wcm.COLLAPSE, "open", "open block"),
    (wcm.EXPAND, "open", "open block"),
    (wcm.COLLAPSE, "lone_lod1", "siblings are not all present"),
    (wcm.EXPAND, 10_000, "does not exist"),
    (7, 0, "unknown move kind"),
])
def test_illegal_requests_raise_and_change_nothing(kind, where, match):
    c, wc, _ = state(3 * 1024 + 10 * K + 5)
    n = int(wc.num_entries)
    e = {"lod0": n - 3, "top": 0, "protected": n - 2, "open": n - 1,
         "lone_lod1": find(wc, 1)}.get(where, where)
    with pytest.raises(wcm.IllegalActionError, match=match):
        wcm.apply_move(wc, kind, e, WCFG)
    out = c.move(wc, kind, e)
    with pytest.raises(wcm.IllegalActionError):
        wcm.check_wc(out, WCFG)
    assert wcm.to_host_entries(out) == wcm.to_host_entries(wc)


def test_expand_over_budget_is_illegal():
    c, wc, _ = state(150 * K)
    assert int(wc.total_cost()) + 31 > WCFG.w_max  # recency filled the budget
    with pytest.raises(wcm.IllegalActionError, match="w_max"):
        wcm.apply_move(wc, wcm.EXPAND, find(wc, 1), WCFG)


def test_apply_move_host_wrapper():
    _, wc, ref = state(3 * 1024 + 10 * K + 5, budget=100)
    e = find(wc, 1)
    out = wcm.check_wc(wcm.apply_move(wc, wcm.EXPAND, e, WCFG))
    ref.move(wcm.EXPAND, e)
    assert_wc_equal(out, ref)


def test_append_completes_blocks_and_respects_budget():
    c, wc, ref = state(40 * K + 30, budget=100)
    wc = c.append(wc, 5)  # completes block 40; new open block of 3 tokens
    ref.append(5)
    assert_wc_equal(wc, ref)
    rows = wcm.to_host_entries(wc)
    assert rows[-2][:3] == (0, 40, K) and rows[-1][:3] == (0, 41, 3)
    full = state(150 * K)[1]
    before = wcm.to_host_entries(full)
    out = c.append(full, K)
    with pytest.raises(CapacityError, match="allocator"):
        wcm.check_wc(out, WCFG)
    assert wcm.to_host_entries(out) == before


def test_materialise_hand_example():
    """History of 2 LOD2 nodes + 3 blocks + 7 tokens; the first LOD2 node expanded."""
    c, wc, ref = state(2 * 1024 + 3 * K + 7, budget=100)
    assert [r[:2] for r in wcm.to_host_entries(wc)][0] == (2, 0)
    wc = c.move(wc, wcm.EXPAND, 0)
    ref.move(wcm.EXPAND, 0)
    g = jax.device_get(c.mat["global"](wc, c.tree))
    cp = jax.device_get(c.mat["compact"](wc, c.tree))
    # slot 0 is LOD1 gist 0: tokens [0, 32) -> centre 16, sigma 32
    assert (g.pos_W[0], g.sigma_W[0], cp.pos_W[0]) == (16, 32.0, 0)
    n = int(g.valid_W.sum())
    assert n == int(wc.total_cost())
    np.testing.assert_array_equal(cp.pos_W[:n], np.arange(n))
    # the last 7 valid slots are the open block's raw tokens at their absolute positions
    np.testing.assert_array_equal(g.pos_W[n - 7:n], 2 * 1024 + 3 * K + np.arange(7))
    assert not g.sigma_W[n - 7:n].any()
    np.testing.assert_array_equal(g.x_WxD[n - 7:n],
                                  c.table[c.ref_tree.tokens[2 * 1024 + 3 * K:][:7]])
    assert g.dist_E[int(wc.num_entries) - 1] == 0
    for mode in ("compact", "global"):
        assert_materialise_equal(c, wc, ref, mode)
    with pytest.raises(ValueError, match="mode"):
        mat.materialise_tree(wc, c.tree, c.embed, WCFG, "absolute")


def test_lens_inputs_view():
    c, wc, _ = state(1024 + 5 * K + 3)
    lens = np.asarray(c.lens(wc, c.tree))
    rows = wcm.to_host_entries(wc)
    for i, (level, node, _, _) in enumerate(rows[:-1]):
        want = c.ref_tree.gists[(max(level, 1), node)]
        np.testing.assert_array_equal(lens[i], want)
    assert not lens[len(rows) - 1:].any()  # the open block has no gist yet; padding zero


def test_expand_then_collapse_round_trip():
    c, wc, _ = state(3 * 1024 + 10 * K + 5, budget=100)
    e = find(wc, 1)
    a = wcm.apply_move(wc, wcm.EXPAND, e, WCFG)
    b = wcm.apply_move(a, wcm.COLLAPSE, e, WCFG)
    assert [r[:3] for r in wcm.to_host_entries(b)] == [r[:3] for r in wcm.to_host_entries(wc)]
    assert int(b.age_E[e]) == 0  # edited now
