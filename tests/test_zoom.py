"""Zoom before answering (issue 19, item 3): `entry_scores` against a plain-Python reference,
`zoom`'s while_loop against the same rounds run one by one from Python, and what it must reach:
legal WCs within budget, the wanted blocks raw, no oscillation, bounded rounds, one compile."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_jax.core import focus as fm
from mc_jax.core import working_context as wcm
from core_reference import COLLAPSE, EXPAND, RefWC

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


def ref_scores(ref: RefWC, block_u):
    ents = ref.table()
    return ref_entry_scores(ents, block_u, ref.num_tokens)


def ref_zoom(ref: RefWC, block_u, tau_e, n_diff, rounds):
    """Plain Python: the zoom's rounds on the reference WC. -> (rounds run, moves per round)."""
    K, moves_R = ref.K, []
    for _ in range(rounds):
        moves = 0
        for _ in range(n_diff):
            u = ref_scores(ref, block_u)
            last = len(ref.entries) - 1
            want = [i for i in range(last) if ref.entries[i][0] > 0 and u[i] > tau_e]
            if not want:
                break
            t = max(want, key=lambda i: (u[i], -i))  # the best; ties: the oldest
            if ref.cost() + K - 1 <= ref.w_max:
                ref._splice(EXPAND, t, 0)
                moves += 1
                continue
            cands = [(u[i], i) for i in range(last) if ref.entries[i][0] == 0
                     and ref.entries[i][1] < ref.protected_start()]
            cands += [(max(u[i:i + K]), i) for i in range(last) if ref.group_head(i)]
            if not cands or min(cands)[0] >= u[t]:
                break  # stuck: nothing less wanted to fold for room
            ref._splice(COLLAPSE, min(cands)[1], 0)
            moves += 1
        moves_R.append(moves)
        if moves == 0:
            break
    return len(moves_R), moves_R


def _case(n_blocks, seed, hot):
    rng = np.random.default_rng(seed)
    u = rng.uniform(-1, 0.1, NB).astype(np.float32)  # mostly unwanted, some just below tau
    for b in hot:
        u[b % n_blocks] = rng.uniform(0.3, 1.0)
    wc = wcm.build_recency(n_blocks * K + 5, WCFG)
    return wc, jnp.asarray(u)


@settings(max_examples=8, deadline=None)
@given(st.integers(20, 240), st.integers(0, 10 ** 6),
       st.lists(st.integers(0, 10 ** 4), max_size=12), st.integers(1, 10))
def test_zoom_equals_the_reference_and_reaches_the_wanted_blocks(n_blocks, seed, hot, R):
    wc, u = _case(n_blocks, seed, hot)
    un = np.asarray(u)
    entries = wcm.to_host_entries(wc)
    np.testing.assert_allclose(np.asarray(entry_scores(wc, u, WCFG))[:len(entries)],
                               ref_entry_scores(entries, un, int(wc.num_tokens)), rtol=1e-6)
    out, log = zoom(wc, u, WCFG, FCFG, R)
    ref = RefWC(WCFG.w_max, WCFG.depth, K, WCFG.protected_blocks).build_recency(
        int(wc.num_tokens))
    assert ref.table() == entries
    rounds, moves = ref_zoom(ref, un, FCFG.tau_expand, FCFG.n_diff, R)
    assert int(log.rounds) == rounds
    assert [int(e + c) for e, c in zip(log.expands_R[:rounds], log.collapses_R[:rounds])] == moves
    assert wcm.to_host_entries(out) == ref.table()
    ref.check()  # the SPEC invariants: budget, contiguity, coverage, protected blocks raw
    wcm.check_wc(out, WCFG)
    assert int(out.error) == 0
    stop = fm.ZOOM_CONVERGED if moves[-1] == 0 else fm.ZOOM_ROUND_LIMIT
    assert int(log.stop) == stop
    if stop == fm.ZOOM_CONVERGED:  # then the best wanted block that fits is raw
        pstart = int(out.num_tokens) // K - WCFG.protected_blocks
        wanted = sorted({b % n_blocks for b in hot if b % n_blocks < pstart},
                        key=lambda b: -un[b])
        raw = {node for level, node, _, _ in wcm.to_host_entries(out) if level == 0}
        if wanted:
            assert wanted[0] in raw


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
