"""Property tests: random histories, budgets, depths, scores and operation orders.

Each example builds a recency WC for a random history, then runs a random sequence of
refocus steps (allocate + append), raw appends, expand/collapse requests and materialisations
through the jitted functions and through the plain-Python reference. After every operation the
two agree entry for entry (and action for action), and the SPEC invariants hold. Compiled
functions are built once per config and reused across examples, so an example costs
milliseconds. `--slow` multiplies the example counts by 10.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc_jax.core import focus
from mc_jax.core import tree as tr
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from core_reference import (AGE_MAX, Illegal, JitCore, RefWC, assert_materialise_equal,
                            assert_wc_equal)

K = 32
SLOW = os.environ.get("MC_JAX_SLOW_TESTS") == "1"
SCALE = 10 if SLOW else 1

# name -> (WCConfig, FocusConfig, default examples). Budgets, depths, protection and focus
# settings vary across configs; histories vary per example.
CONFIGS = {
    "d2": (wcm.WCConfig(w_max=160, depth=2, protected_blocks=1, max_tokens=200 * K),
           focus.FocusConfig(), 700),
    "d2_wide": (wcm.WCConfig(w_max=290, depth=2, protected_blocks=2, max_tokens=300 * K),
                focus.FocusConfig(n_diff=3, cooldown=1, tau_expand=0.1, tau_collapse=0.3),
                500),
    "d3": (wcm.WCConfig(w_max=200, depth=3, protected_blocks=1, max_tokens=2200 * K),
           focus.FocusConfig(n_diff=5, cooldown=0), 600),
    "d3_p0": (wcm.WCConfig(w_max=130, depth=3, protected_blocks=0, max_tokens=1100 * K),
              focus.FocusConfig(n_diff=2, cooldown=3, tau_expand=0.0, tau_collapse=0.0), 300),
}


@functools.lru_cache(maxsize=None)
def core(name):
    wcfg, fcfg, _ = CONFIGS[name]
    return JitCore(wcfg, fcfg)


def scores(seed, mode, E):
    """Multiples of 1/64, so group means are exact and jit and reference compare exactly."""
    rng = np.random.RandomState(seed)
    if mode == "uniform":
        k = rng.randint(-64, 65, E)
    elif mode == "negative":
        k = rng.randint(-64, 8, E)
    elif mode == "positive":
        k = rng.randint(-8, 65, E)
    elif mode == "ties":
        k = rng.choice([-32, 0, 32], E)
    else:  # "threshold": values around +-tau
        k = rng.choice([-14, -13, -12, 12, 13, 14], E)
    return (k / 64).astype(np.float32)


SCORE_MODES = ["uniform", "negative", "positive", "ties", "threshold"]
seeds = st.integers(0, 2 ** 31 - 1)
ops = st.lists(st.one_of(
    st.tuples(st.just("step"), st.integers(0, K), seeds, st.sampled_from(SCORE_MODES)),
    st.tuples(st.just("step"), st.just(K), seeds, st.sampled_from(SCORE_MODES)),
    st.tuples(st.just("refocus"), st.integers(0, K), seeds, st.sampled_from(SCORE_MODES)),
    st.tuples(st.just("append"), st.integers(0, K)),
    st.tuples(st.just("move"), st.sampled_from([wcm.EXPAND, wcm.COLLAPSE, 3]),
              st.integers(-2, 400)),
    st.tuples(st.just("mat"), st.sampled_from(["compact", "global"])),
), min_size=1, max_size=10)


def run_sequence(c: JitCore, T0, seq, materialise=True):
    wcfg, fcfg = c.wcfg, c.fcfg
    cap = wcfg.max_tokens
    ref = c.ref().build_recency(T0)
    wc = c.build(T0)
    assert int(wc.error) == 0
    assert_wc_equal(wc, ref)
    for op in seq:
        if op[0] in ("step", "refocus"):
            n = min(op[1], cap - ref.num_tokens)
            u = scores(op[2], op[3], wcfg.max_entries)
            log = ref.allocate(list(u), fcfg.n_diff, fcfg.cooldown, fcfg.tau_expand,
                               fcfg.tau_collapse, incoming=n)
            wc, jlog = c.allocate(wc, u, n)
            assert int(wc.error) == 0
            got = list(zip(*(np.asarray(a).tolist()
                             for a in (jlog.kind_A, jlog.level_A, jlog.node_A, jlog.score_A))))
            assert [g[:3] for g in got] == [r[:3] for r in log], (got, log)
            np.testing.assert_array_equal([g[3] for g in got], [r[3] for r in log])
            if op[0] == "step":
                ref.append(n)
                wc = c.append(wc, n)
                assert int(wc.error) == 0
        elif op[0] == "append":
            n = min(op[1], cap - ref.num_tokens)
            try:
                ref.append(n)
                ok = True
            except Illegal:
                ok = False
            wc = c.append(wc, n)
            assert (int(wc.error) == 0) == ok
            wc = wc.replace(error=jnp.zeros_like(wc.error))
        elif op[0] == "move":
            kind, e = op[1], op[2]
            try:
                ref.move(kind, e)
                ok = True
            except Illegal:
                ok = False
            wc = c.move(wc, kind, e)
            assert (int(wc.error) == 0) == ok, (kind, e)
            if not ok:
                assert wcm.explain_illegal(wc, kind, e, wcfg) is not None
            wc = wc.replace(error=jnp.zeros_like(wc.error))
        elif materialise:
            assert_materialise_equal(c, wc, ref, op[1])
        assert_wc_equal(wc, ref)
    return wc, ref


def _property(name):
    wcfg, _, n = CONFIGS[name]
    c = core(name)
    T_max = wcfg.max_tokens

    @settings(max_examples=n * SCALE, deadline=None, derandomize=not SLOW,
              suppress_health_check=list(HealthCheck))
    @given(T0=st.one_of(st.integers(0, T_max), st.integers(0, 40 * K)), seq=ops)
    def check(T0, seq):
        run_sequence(c, T0, seq)

    check()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_jit_equals_reference(name):
    _property(name)


def test_depth4_jit_equals_reference():
    """Depth 4: histories past one LOD4 node (1M tokens); WC tables and logs only (the
    reference tree would be too slow to build in Python)."""
    wcfg = wcm.WCConfig(w_max=200, depth=4, protected_blocks=1, max_tokens=33_000 * K)
    c = JitCore(wcfg, focus.FocusConfig(cooldown=1), with_tree=False)

    @settings(max_examples=60 * SCALE, deadline=None, derandomize=not SLOW,
              suppress_health_check=list(HealthCheck))
    @given(T0=st.one_of(st.integers(K ** 4, wcfg.max_tokens - 400), st.integers(0, 5000)),
           seq=ops)
    def check(T0, seq):
        run_sequence(c, T0, seq, materialise=False)

    check()


def test_recency_build_shape_and_ages():
    c = core("d3")
    ref = c.ref().build_recency(70_000 - 7)
    levels = [e[0] for e in ref.entries]
    assert levels == sorted(levels, reverse=True)[:-1] + [0]  # top first, LOD0 last
    assert ref.cost() + K - 1 > c.wcfg.w_max  # filled as far as it goes
    wc = c.build(70_000 - 7)
    assert (np.asarray(wc.age_E)[:int(wc.num_entries)] == AGE_MAX).all()


# ----------------------------------------------------------------------------- no retrace

def test_streaming_never_retraces():
    """Hundreds of blocks with changing tokens and scores through the jitted tree append,
    allocator and materialise: no trace after warm-up, invariants after every block."""
    wcfg = wcm.WCConfig(w_max=160, depth=2, protected_blocks=1, max_tokens=420 * K)
    fcfg = focus.FocusConfig()
    tcfg = tr.TreeConfig(d=4, capacity_blocks=420, depth=2)
    table = jnp.asarray(np.random.RandomState(0).randn(61, 4).astype(np.float32))
    traces = {"n": 0}

    def step(tree, wc, ids_K, u_E):
        traces["n"] += 1  # runs only while tracing
        wc, log = focus.allocate(wc, u_E, wcfg, fcfg, K)
        tree = tr.append_tokens(tree, ids_K, tcfg, lambda i: table[i], tr.mean_pool_gist_fn)
        wc = wcm.append(wc, K, wcfg)
        m = mat.materialise_tree(wc, tree, lambda i: table[i], wcfg, "global")
        return tree, wc, log, m

    step = jax.jit(step, donate_argnums=(0, 1))
    rng = np.random.RandomState(0)
    tree, wc = tr.init_tree(tcfg), wcm.build_recency(0, wcfg)
    ref = RefWC(wcfg.w_max, wcfg.depth, K, wcfg.protected_blocks).build_recency(0)
    for b in range(400):
        u = (rng.randint(-64, 65, wcfg.max_entries) / 64).astype(np.float32)
        ids = rng.randint(0, 61, K).astype(np.int32)
        tree, wc, log, m = step(tree, wc, ids, u)
        if b == 0:
            warm = traces["n"]
        ref.allocate(list(u), incoming=K)
        ref.append(K)
        if b % 20 == 0 or b == 399:
            assert_wc_equal(wc, ref)
    assert traces["n"] == warm == 1, f"retraced {traces['n'] - warm} times after warm-up"
    assert int(wc.error) == 0 and int(tree.error) == 0
    assert int(tree.num_tokens) == 400 * K
