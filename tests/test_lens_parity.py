"""Train/serve parity: one working context in its two layouts, the runtime's entry table
(`WorkingContext`) and training's per-block levels (`level_N`), gives identical LensNet inputs
(`core.lens_features`) and identical packed base-model inputs (`core.materialise` vs
`training.windows.pack`: embeddings, positions, Gaussian-RoPE sigma, validity)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from mc_jax.core import lens_features as lf
from mc_jax.core import tree as tr
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.training import windows as twc

K, DEPTH, N, D, H, W, N_TAIL = 4, 2, 24, 8, 3, 40, 6
WCFG = wcm.WCConfig(w_max=W, depth=DEPTH, block_size=K, protected_blocks=1)
TCFG = tr.TreeConfig(d=D, capacity_blocks=N + 2, depth=DEPTH, block_size=K)
EMB_VxD = jax.random.normal(jax.random.PRNGKey(0), (50, D))
MIX_LxDxD = jax.random.normal(jax.random.PRNGKey(1), (DEPTH, D, D)) / np.sqrt(D)


def embed(ids):
    return EMB_VxD[ids]


def gist_fn(level, children_NxKxD):  # a different map per level, so levels cannot be confused
    return jnp.tanh(children_NxKxD.mean(1) @ MIX_LxDxD[level - 1])


@functools.lru_cache(maxsize=None)
def history(seed: int):
    ids = jax.random.randint(jax.random.PRNGKey(seed), (N * K,), 0, 50)
    return ids, tr.build_tree(ids, TCFG, embed, gist_fn)


KINDS_2E = jnp.repeat(jnp.array([wcm.EXPAND, wcm.COLLAPSE]), WCFG.max_entries)
ROWS_2E = jnp.tile(jnp.arange(WCFG.max_entries), 2)
legal_moves = jax.jit(lambda wc: jax.vmap(lambda k, e: wcm.move_legal(wc, k, e, WCFG)[0])(
    KINDS_2E, ROWS_2E))
move = jax.jit(lambda wc, k, e: wcm.move(wc, k, e, WCFG))
recency = jax.jit(lambda: wcm.build_recency(N * K, WCFG))
runtime_features = jax.jit(lambda wc, tree: lf.from_working_context(wc, tree, WCFG, N_TAIL))
training_features = jax.jit(lambda lv, gists: lf.from_levels(lv, gists, block_size=K,
                                                             depth=DEPTH, n_tail=N_TAIL))
materialise = jax.jit(lambda wc, tree, mode: mat.materialise_tree(wc, tree, embed, WCFG, mode),
                      static_argnums=2)
pack = jax.jit(twc.pack, static_argnums=4)


def random_wc(seed: int, n_moves: int):
    """The recency WC over N blocks, then random legal moves."""
    wc = recency()
    rng = np.random.default_rng(seed)
    for _ in range(n_moves):
        cands = np.flatnonzero(np.asarray(legal_moves(wc)))
        if not len(cands):
            break
        i = int(cands[rng.integers(len(cands))])
        wc = move(wc, KINDS_2E[i], ROWS_2E[i])
    wcm.check_wc(wc, WCFG)
    return wc


def per_block_levels(wc) -> np.ndarray:
    """training's layout of the same WC: level of the entry covering each block, -1 if none."""
    level_N = np.full((N,), twc.NOT_COVERED, np.int32)
    for level, node, cost, _ in wcm.to_host_entries(wc):
        if cost == 0:  # the open block, still empty at a block-aligned cursor
            continue
        g = K ** (level - 1) if level > 0 else 1
        level_N[node * g:(node + 1) * g] = level
    return level_N


def gists_of(tree):
    return tuple(tree.gists[l - 1][:N // K ** (l - 1)] for l in range(1, DEPTH + 1))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n_moves=st.integers(0, 12))
def test_lens_inputs_agree(seed, n_moves):
    ids, tree = history(seed % 3)
    wc = random_wc(seed, n_moves)
    level_N = per_block_levels(wc)
    a = runtime_features(wc, tree)
    b = training_features(jnp.asarray(level_N), gists_of(tree))
    ma, mb = np.asarray(a.mask_xE), np.asarray(b.mask_xE)
    assert ma.sum() == mb.sum() == int(wc.num_entries) - 1
    for name in ("vec_xExD", "level_xE", "span_xE", "distance_xE", "since_edit_xE"):
        np.testing.assert_array_equal(np.asarray(getattr(a, name))[ma],
                                      np.asarray(getattr(b, name))[mb], err_msg=name)
    np.testing.assert_array_equal(np.asarray(a.tail_xUxD), np.asarray(b.tail_xUxD))
    np.testing.assert_array_equal(np.asarray(a.tail_mask_xU), np.asarray(b.tail_mask_xU))
    assert a.tail_xUxD.shape == (N_TAIL, D)


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), n_moves=st.integers(0, 12),
       mode=st.sampled_from(["compact", "global"]))
def test_packed_inputs_agree(seed, n_moves, mode):
    ids, tree = history(seed % 3)
    wc = random_wc(seed, n_moves)
    level_N = per_block_levels(wc)
    m = materialise(wc, tree, mode)
    cost = int(wc.total_cost())
    pcfg = twc.PackConfig(seq_blocks=N, budget=W, horizon=H, depth=DEPTH, block_size=K,
                          protect_blocks=1, position_mode=mode, rope_damping=True,
                          edit_headroom=False)
    x, pos, sigma, valid = pack(jnp.asarray(level_N), embed(ids).reshape(N, K, D),
                                    gists_of(tree), embed(ids[:H]), pcfg)
    wc_slots = slice(W - cost, W)  # training right-aligns the WC before the horizon
    assert int(np.asarray(m.valid_W).sum()) == cost == int(np.asarray(valid)[:W].sum())
    np.testing.assert_array_equal(np.asarray(x)[wc_slots], np.asarray(m.x_WxD)[:cost])
    np.testing.assert_array_equal(np.asarray(pos)[wc_slots],
                                  np.asarray(m.pos_W)[:cost].astype(np.float32))
    np.testing.assert_array_equal(np.asarray(sigma)[wc_slots], np.asarray(m.sigma_W)[:cost])
