"""Zoom before answering (issue 19, item 3): `entry_scores` against a plain-Python reference,
`zoom`'s while_loop against the same rounds run one by one from Python, and what it must reach:
legal WCs within budget, the wanted blocks raw, no oscillation, bounded rounds, one compile."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_jax.core import focus as fm
from mc_jax.core import working_context as wcm

K = 32
WCFG = wcm.WCConfig(w_max=256, depth=2, protected_blocks=1, max_tokens=256 * K)
FCFG = fm.FocusConfig(n_diff=3)
NB = 256  # padded block count (a multiple of K^(depth-1))


def ref_entry_scores(entries, block_u, n_tokens):
    """Plain Python: the max block score over each entry's blocks; the open block 0."""
    out = []
    for i, (level, node, cost, _) in enumerate(entries):
        if level == 0 and i == len(entries) - 1 and cost < K or level == 0 and \
                node * K >= n_tokens // K * K:
            out.append(0.0)
            continue
        lo = node if level == 0 else node * K ** (level - 1)
        hi = lo + (1 if level == 0 else K ** (level - 1))
        out.append(float(max(block_u[lo:hi])))
    return out


entry_scores = jax.jit(fm.entry_scores, static_argnums=2)
zoom = jax.jit(fm.zoom, static_argnums=(2, 3, 4))
allocate = jax.jit(fm.allocate, static_argnums=(2, 3))


def _case(n_blocks, seed, hot):
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, -0.3, NB).astype(np.float32)
    for b in hot:
        u[b % n_blocks] = 0.9
    wc = wcm.build_recency(n_blocks * K + 5, WCFG)
    return wc, jnp.asarray(u)


@settings(max_examples=12, deadline=None)
@given(st.integers(20, 240), st.integers(0, 10 ** 6), st.lists(st.integers(0, 10 ** 4),
                                                              max_size=3))
def test_zoom_equals_its_rounds_and_reaches_the_wanted_blocks(n_blocks, seed, hot):
    wc, u = _case(n_blocks, seed, hot)
    entries = wcm.to_host_entries(wc)
    np.testing.assert_allclose(np.asarray(entry_scores(wc, u, WCFG))[:len(entries)],
                               ref_entry_scores(entries, np.asarray(u), int(wc.num_tokens)),
                               rtol=1e-6)
    R = 12
    out, log = zoom(wc, u, WCFG, FCFG, R)
    # the reference: the same rounds one at a time from Python
    rcfg = dataclasses.replace(FCFG, cooldown=0, group_score="max")
    ref, r = wc, 0
    while r < R:
        ref, alog = allocate(ref, entry_scores(ref, u, WCFG), WCFG, rcfg, 0)
        r += 1
        moves = int(jnp.sum((alog.kind_A == fm.KIND_EXPAND) | (alog.kind_A == fm.KIND_COLLAPSE)))
        assert moves == int(log.expands_R[r - 1] + log.collapses_R[r - 1])
        if moves == 0:
            break
    assert int(log.rounds) == r
    assert wcm.to_host_entries(out) == wcm.to_host_entries(ref)
    wcm.check_wc(out, WCFG)
    assert int(out.error) == 0 and int(out.total_cost()) <= WCFG.w_max
    # converged: the wanted blocks (u > tau_expand, outside the protected newest) are raw
    assert int(log.stop) == fm.ZOOM_CONVERGED
    raw = {node for level, node, _, _ in wcm.to_host_entries(out) if level == 0}
    pstart = int(out.num_tokens) // K - WCFG.protected_blocks
    wanted = {b % n_blocks for b in hot if b % n_blocks < pstart}
    assert wanted <= raw


def test_zoom_round_limit_and_one_compile():
    wc, u = _case(200, 1, [3, 90, 150])
    out, log = zoom(wc, u, WCFG, FCFG, 1)
    assert int(log.rounds) == 1 and int(log.stop) == fm.ZOOM_ROUND_LIMIT
    assert int(log.expands_R[0] + log.collapses_R[0]) == FCFG.n_diff
    n0 = zoom._cache_size()
    for seed, nb in ((2, 60), (3, 230)):  # other histories and scores: the same shapes
        zoom(*_case(nb, seed, [5]), WCFG, FCFG, 1)
    assert zoom._cache_size() == n0


def test_entry_scores_needs_padded_blocks():
    wc, u = _case(50, 0, [])
    with pytest.raises(ValueError, match="multiple of"):
        fm.entry_scores(wc, u[:50], WCFG)
