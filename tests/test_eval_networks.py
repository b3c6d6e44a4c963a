"""eval-gists / eval-lens building blocks on the tiny base: substitution NLL equals a hand-built
forward, and the rank correlation is a real Spearman."""

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.eval.networks import raw_nll, substitution_nll
from mc_jax.stats import spearman

CFG = bm.LlamaConfig.tiny()
H = 8


def _setup():
    p = bm.init_params(CFG, jax.random.PRNGKey(0))
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(1), (4 * 32 + H,), 0, 256), np.int32)
    return p, ids


@jax.jit  # one compile per sequence length (op-by-op, every slice and concat compiles anew)
def _nll_of_embeddings_(p, x, targets):
    T = x.shape[0]
    lg, _ = bm.forward(p, CFG, x[None], jnp.arange(T)[None])
    n = len(targets)
    return bm.token_nll(lg[0, T - n - 1:T - 1], targets).mean()


def _nll_of_embeddings(p, x, targets):
    return float(_nll_of_embeddings_(p, jnp.asarray(x), jnp.asarray(targets)))


def test_lod1_substitution_matches_a_hand_built_sequence():
    p, ids = _setup()
    gist = lambda level, x: x.mean(-2) * 3.0  # noqa: E731 - any deterministic gist function
    # every substitution_nll call below scores the same two blocks (row 0: block 1), so all
    # share one shape: one compile of the packed forward
    got = substitution_nll(p, CFG, gist, ids, level=1, blocks=[1, 2], horizon=H)
    emb = np.asarray(bm.embed_tokens(p, jnp.asarray(ids)))  # sliced on the host: no compiles
    for i, b in enumerate([1, 2]):
        g = jnp.asarray(emb[b * 32:(b + 1) * 32]).mean(0) * 3.0
        x = np.concatenate([emb[:b * 32], np.asarray(g)[None], emb[(b + 1) * 32:]])
        np.testing.assert_allclose(got[i], _nll_of_embeddings(p, x, ids[-H:]), atol=1e-4)
    dropped = substitution_nll(p, CFG, gist, ids, level=1, blocks=[1, 2], horizon=H,
                               drop=True)
    x = np.concatenate([emb[:32], emb[64:]])
    np.testing.assert_allclose(dropped[0], _nll_of_embeddings(p, x, ids[-H:]), atol=1e-4)
    np.testing.assert_allclose(raw_nll(p, CFG, ids, H), _nll_of_embeddings(p, emb, ids[-H:]),
                               atol=1e-4)

    # the content control: gists of another text in the same place
    other = np.asarray(jax.random.randint(jax.random.PRNGKey(2), ids.shape, 0, 256), np.int32)
    shuffled = substitution_nll(p, CFG, gist, ids, level=1, blocks=[1, 2], horizon=H,
                                gists_from=other)
    oemb = np.asarray(bm.embed_tokens(p, jnp.asarray(other)))
    x = np.concatenate([emb[:32], np.asarray(jnp.asarray(oemb[32:64]).mean(0) * 3.0)[None],
                        emb[64:]])
    np.testing.assert_allclose(shuffled[0], _nll_of_embeddings(p, x, ids[-H:]), atol=1e-4)
    assert abs(shuffled[0] - got[0]) > 1e-4


def test_spearman():
    a = np.arange(10.0)
    assert abs(spearman(a, a ** 3) - 1.0) < 1e-12
    assert abs(spearman(a, -a) + 1.0) < 1e-12
    assert abs(spearman([1, 2, 2, 3], [1, 2, 3, 4]) - 0.9486833) < 1e-6  # average ranks
    assert np.isnan(spearman([1, 1, 1], [1, 2, 3]))
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=200), rng.normal(size=200)
    assert abs(spearman(x, y)) < 0.2


def test_window_bootstrap_is_wider_when_a_windows_edits_move_together():
    from mc_jax.stats import bootstrap_spearman

    rng = np.random.default_rng(1)
    g = np.repeat(np.arange(12), 16)  # 12 windows x 16 edits, like eval-lens --docs 12
    shared = rng.normal(size=12)[g]  # a window-level effect in both score and utility
    u, d = shared + 0.5 * rng.normal(size=g.size), shared + 0.5 * rng.normal(size=g.size)
    lo_e, hi_e = bootstrap_spearman(u, d, seed=0)
    lo_w, hi_w = bootstrap_spearman(u, d, g, seed=0)
    assert lo_e < spearman(u, d) < hi_e and lo_w < spearman(u, d) < hi_w
    assert hi_w - lo_w > 1.5 * (hi_e - lo_e)
    # independent edits: grouping them changes the interval little
    u, d = rng.normal(size=g.size), rng.normal(size=g.size)
    we = np.subtract(*bootstrap_spearman(u, d, seed=0)[::-1])
    ww = np.subtract(*bootstrap_spearman(u, d, g, seed=0)[::-1])
    assert 0.4 < ww / we < 1.6  # (12 groups: the grouped interval is itself noisy)


def test_paired_difference_interval_of_two_lensnets_on_the_same_edits():
    from mc_jax.stats import bootstrap_spearman, bootstrap_spearman_diff

    rng = np.random.default_rng(2)
    g = np.repeat(np.arange(24), 16)
    shared = rng.normal(size=24)[g]  # window-level difficulty in the utilities
    d = shared + rng.normal(size=g.size)
    good, chance = d + 1.5 * rng.normal(size=g.size), rng.normal(size=g.size)
    lo, hi = bootstrap_spearman_diff(good, chance, d, g, seed=0)
    assert 0 < lo < spearman(good, d) - spearman(chance, d) < hi
    assert bootstrap_spearman_diff(good, good, d, g, seed=0) == [0.0, 0.0]
    # two LensNets that mostly agree: the paired interval of their difference is far narrower
    # than either one's own interval (what the windows share cancels)
    near = good + 0.3 * rng.normal(size=g.size)
    lo_p, hi_p = bootstrap_spearman_diff(good, near, d, g, seed=0)
    lo_a, hi_a = bootstrap_spearman(good, d, g, seed=0)
    assert lo_p < spearman(good, d) - spearman(near, d) < hi_p
    assert hi_p - lo_p < 0.5 * (hi_a - lo_a)


def test_within_window_ranking_ignores_what_only_separates_windows():
    from mc_jax.stats import within_window

    rng = np.random.default_rng(3)
    g = np.repeat(np.arange(24), 16)
    shared = 3 * rng.normal(size=24)[g]  # scores and utilities agree only on which window
    u, d = shared + rng.normal(size=g.size), shared + rng.normal(size=g.size)
    assert spearman(u, d) > 0.7 and abs(spearman(*within_window(u, d, g))) < 0.15
    inner = rng.normal(size=g.size)  # ... and here only inside each window
    u, d = rng.normal(size=24)[g] + inner, 3 * rng.normal(size=24)[g] + inner
    assert spearman(*within_window(u, d, g)) > 0.95 > spearman(u, d)
