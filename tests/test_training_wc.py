"""Training working contexts: every sampled WC and every single edit obeys SPEC §2's invariants,
and packing puts exactly the right vector at the right slot (checked against plain Python)."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from mc_jax.training import windows as twc
from mc_jax.errors import ConfigError

K = 32
SLOW = os.environ.get("MC_JAX_SLOW_TESTS") == "1"
CONFIGS = [  # (blocks, budget, depth, protect)
    twc.PackConfig(seq_blocks=34, budget=128, horizon=4, depth=2),
    twc.PackConfig(seq_blocks=70, budget=160, horizon=4, depth=2, protect_blocks=2),
    twc.PackConfig(seq_blocks=40, budget=100, horizon=4, depth=3),
    twc.PackConfig(seq_blocks=8, budget=300, horizon=4, depth=2, position_mode="global",
                   rope_damping=True),
]


def entries_of(level):
    """Plain-Python reference: the entry list [(level, node, first_token, end_token)]."""
    out, b, N = [], 0, len(level)
    while b < N:
        lv = int(level[b])
        if lv < 0:
            b += 1
            continue
        span_blocks = 1 if lv <= 1 else K ** (lv - 1)
        assert b % span_blocks == 0, f"misaligned level-{lv} entry at block {b}"
        assert all(int(x) == lv for x in level[b:b + span_blocks]), "entry not uniform"
        out.append((lv, b // span_blocks, b * K, (b + span_blocks) * K))
        b += span_blocks
    return out


def check_invariants(level, cfg, full_coverage=True):
    ents = entries_of(level)
    cost = sum(K if lv == 0 else 1 for lv, *_ in ents)
    assert cost <= cfg.budget, "budget"
    for (_, _, _, e), (_, _, s, _) in zip(ents, ents[1:]):
        assert e == s, "contiguity"
    assert ents[-1][3] == cfg.seq_len, "must end at the cursor"
    if full_coverage:
        assert ents[0][2] == 0, "must start at token 0"
    for lv, node, s, e in ents:
        span = K * (1 if lv == 0 else K ** (lv - 1))
        assert (s, e) == (node * span, node * span + span), "alignment"
        assert 0 <= lv <= cfg.depth, "legality"
    for b in range(cfg.seq_blocks - cfg.protect_blocks, cfg.seq_blocks):
        assert level[b] == 0, "protected newest blocks stay raw"
    assert int(twc.wc_cost(jnp.asarray(level), cfg)) == cost
    return ents


@pytest.fixture(scope="module")
def jitted():
    fns = {}
    for i, c in enumerate(CONFIGS):
        fns[i] = dict(
            mix=jax.jit(lambda k, c=c: twc.sample_mixture(k, c)),
            edits=jax.jit(lambda k, lv, c=c: twc.sample_edits(k, lv, 6, c)),
            apply=jax.jit(lambda lv, b, kd, c=c: twc.apply_edit(lv, b, kd, c)),
            legal=jax.jit(lambda lv, c=c: twc.legal_edits(lv, c)),
            pack=jax.jit(lambda lv, tok, gists, hor, c=c: twc.pack(lv, tok, gists, hor, c)),
        )
    return fns


@settings(max_examples=400 if SLOW else 60, deadline=None)
@given(ci=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 2 ** 31 - 1))
def test_sampled_mixtures_and_their_single_edits_are_legal(jitted, ci, seed):
    cfg, f = CONFIGS[ci], jitted[ci]
    key = jax.random.PRNGKey(seed)
    level = np.asarray(f["mix"](key))
    ents = check_invariants(level, cfg)
    assert sum(K if lv == 0 else 1 for lv, *_ in ents) <= cfg.mixture_budget
    blocks, kinds, valid = map(np.asarray, f["edits"](jax.random.fold_in(key, 1), level))
    expand, collapse = map(np.asarray, f["legal"](level))
    # the reference's legal moves
    cost = sum(K if lv == 0 else 1 for lv, *_ in ents)
    ref_expand, ref_collapse = set(), set()
    starts = {s // K: (lv, node) for lv, node, s, _ in ents}
    for b, (lv, node) in starts.items():
        if lv >= 1 and cost + K - 1 <= cfg.budget:
            ref_expand.add(b)
        if lv == 0 and b < cfg.seq_blocks - cfg.protect_blocks:
            ref_collapse.add(b)
        if lv >= 1 and lv < cfg.depth:
            g = K ** lv  # blocks under the parent at level lv + 1
            if b % g == 0 and b + g <= cfg.seq_blocks - cfg.protect_blocks and all(
                    level[x] == lv for x in range(b, b + g)):
                ref_collapse.add(b)
    assert set(np.nonzero(expand)[0]) == ref_expand
    assert set(np.nonzero(collapse)[0]) == ref_collapse
    assert valid.sum() == min(6, len(ref_expand) + len(ref_collapse))
    seen = set()
    for b, kd, ok in zip(blocks, kinds, valid):
        if not ok:
            continue
        assert (b, kd) not in seen
        seen.add((b, kd))
        assert b in (ref_expand if kd == twc.EXPAND else ref_collapse)
        new = np.asarray(f["apply"](jnp.asarray(level), b, kd))
        new_ents = check_invariants(new, cfg)
        new_cost = sum(K if lv == 0 else 1 for lv, *_ in new_ents)
        assert new_cost - cost == (31 if kd == twc.EXPAND else -31)


def test_recent_window_is_raw_and_truncates():
    cfg = CONFIGS[0]
    level = np.asarray(twc.recent_window(cfg))
    ents = check_invariants(level, cfg, full_coverage=False)
    assert all(lv == 0 for lv, *_ in ents) and len(ents) == cfg.budget // K


@settings(max_examples=100 if SLOW else 20, deadline=None)
@given(ci=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 2 ** 31 - 1),
       newest=st.integers(0, 3))
def test_substitution_window_is_the_recent_window_with_one_unprotected_block_gisted(ci, seed,
                                                                                    newest):
    """newest > 0 (subst_recent): the block is one of the newest `newest` unprotected blocks."""
    cfg = CONFIGS[ci]
    level = np.asarray(twc.substitution_window(jax.random.PRNGKey(seed), cfg, newest))
    recent = np.asarray(twc.recent_window(cfg))
    check_invariants(level, cfg, full_coverage=False)
    changed = np.flatnonzero(level != recent)
    n_raw = min(cfg.budget // K, cfg.seq_blocks)
    hi = cfg.seq_blocks - cfg.protect_blocks
    lo = cfg.seq_blocks - n_raw if newest == 0 else max(cfg.seq_blocks - n_raw, hi - newest)
    assert len(changed) == 1 and level[changed[0]] == 1
    assert lo <= changed[0] < hi


@settings(max_examples=100 if SLOW else 20, deadline=None)
@given(ci=st.integers(0, len(CONFIGS) - 1), seed=st.integers(0, 2 ** 31 - 1))
def test_pack_places_every_entry_at_the_right_slot(jitted, ci, seed):
    cfg, f = CONFIGS[ci], jitted[ci]  # jitted: one compile per config, not per example
    rng = np.random.default_rng(seed)
    D, N, H = 8, cfg.seq_blocks, cfg.horizon
    tok = rng.normal(size=(N, K, D)).astype(np.float32)
    gists = tuple(rng.normal(size=(max(N // K ** (l - 1), 1), D)).astype(np.float32)
                  for l in range(1, cfg.depth + 1))
    hor = rng.normal(size=(H, D)).astype(np.float32)
    level = np.asarray(f["mix"](jax.random.PRNGKey(seed)))
    x, pos, sig, valid = map(np.asarray, f["pack"](jnp.asarray(level), jnp.asarray(tok), gists,
                                                   jnp.asarray(hor)))
    slots, gpos, gsig = [], [], []
    for lv, node, s, e in entries_of(level):
        if lv == 0:
            slots += list(tok[node])
            gpos += list(range(s, e))
            gsig += [0.0] * K
        else:
            slots.append(gists[lv - 1][node])
            gpos.append(s + (e - s) // 2)  # the runtime's gist position (test_lens_parity.py)
            gsig.append(float(e - s))
    n = len(slots)
    W = cfg.budget
    assert valid.sum() == n + H and not valid[: W - n].any()
    np.testing.assert_array_equal(x[W - n: W], np.stack(slots))
    np.testing.assert_array_equal(x[W:], hor)
    if cfg.position_mode == "compact":
        np.testing.assert_array_equal(pos[W - n:], np.arange(n + H))
    else:
        np.testing.assert_allclose(pos[W - n: W], gpos)
        np.testing.assert_allclose(pos[W:], cfg.seq_len + np.arange(H))
        np.testing.assert_allclose(sig[W - n: W], gsig)


def test_budget_that_cannot_hold_the_history_is_a_config_error():
    with pytest.raises(ConfigError, match="needs at least"):
        twc.PackConfig(seq_blocks=200, budget=40, horizon=4, depth=1)
    with pytest.raises(ConfigError, match="protected"):
        twc.PackConfig(seq_blocks=10, budget=40, horizon=4, protect_blocks=2)
