"""Tree: streamed, bulk and from-scratch builds agree with the reference; vmap; errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.core import tree as tr
from mc_jax.errors import CapacityError
from core_reference import RefTree

K = 32
D = 4
VOCAB = 97
# Dyadic embeddings (multiples of 1/8) keep every mean exact, so trees compare bit for bit.
TABLE = (np.random.RandomState(0).randint(-16, 17, (VOCAB, D)) / 8).astype(np.float32)


def embed(ids):
    return jnp.asarray(TABLE)[ids]


@functools.lru_cache(maxsize=None)
def compiled(cfg):
    return dict(
        tokens=jax.jit(lambda t, ids, n: tr.append_tokens(t, ids, cfg, embed,
                                                          tr.mean_pool_gist_fn, n)),
        blocks=jax.jit(lambda t, ids: tr.append_blocks(t, ids, cfg, embed,
                                                       tr.mean_pool_gist_fn)),
    )


def assert_matches(tree, ref, cfg):
    tr.check_tree(tree, cfg)
    assert int(tree.num_tokens) == len(ref.tokens)
    np.testing.assert_array_equal(tr.token_ids(tree), np.asarray(ref.tokens, np.int32))
    counts = np.asarray(tree.counts(K))
    for level in range(1, cfg.depth + 1):
        n = len(ref.tokens) // K ** level
        assert counts[level - 1] == n
        want = np.stack([ref.gists[(level, i)] for i in range(n)]) if n else np.zeros((0, D))
        np.testing.assert_array_equal(np.asarray(tree.gists[level - 1][:n]), want)


@pytest.mark.parametrize("depth", [2, 3])
def test_streamed_chunks_match_reference(depth):
    cfg = tr.TreeConfig(d=D, capacity_blocks=1100, depth=depth)
    fns = compiled(cfg)
    rng = np.random.RandomState(depth)
    tree, ref = tr.init_tree(cfg), RefTree(depth, TABLE)
    while len(ref.tokens) < 1100 * K - 400:
        if rng.rand() < 0.3 and len(ref.tokens) % K == 0:
            ids = rng.randint(0, VOCAB, (24, K)).astype(np.int32)
            tree = fns["blocks"](tree, ids)
            ref.append(ids.reshape(-1))
        else:
            n = int(rng.randint(0, K + 1))
            ids = rng.randint(0, VOCAB, K).astype(np.int32)
            tree = fns["tokens"](tree, ids, n)
            ref.append(ids[:n])
    assert_matches(tree, ref, cfg)


def test_build_tree_equals_streaming_depth3():
    cfg = tr.TreeConfig(d=D, capacity_blocks=1056, depth=3)
    ids = np.random.RandomState(1).randint(0, VOCAB, 1056 * K - 5).astype(np.int32)
    built = jax.jit(lambda x: tr.build_tree(x, cfg, embed, tr.mean_pool_gist_fn))(ids)
    ref = RefTree(3, TABLE)
    ref.append(ids)
    assert_matches(built, ref, cfg)


def test_single_tokens_complete_levels():
    cfg = tr.TreeConfig(d=D, capacity_blocks=64, depth=2)
    step = jax.jit(lambda t, ids: tr.append_tokens(t, ids, cfg, embed, tr.mean_pool_gist_fn))
    ids = np.random.RandomState(2).randint(0, VOCAB, 33 * K).astype(np.int32)
    tree, ref = tr.init_tree(cfg), RefTree(2, TABLE)
    for t in ids:  # one token at a time; crosses the LOD2 completion at token 1024
        tree = step(tree, np.asarray([t], np.int32))
    ref.append(ids)
    assert_matches(tree, ref, cfg)


def test_depth4_bulk():
    cfg = tr.TreeConfig(d=2, capacity_blocks=K ** 3 + 64, depth=4)
    table = TABLE[:, :2]
    emb = lambda ids: jnp.asarray(table)[ids]  # noqa: E731
    fn = jax.jit(lambda t, x: tr.append_blocks(t, x, cfg, emb, tr.mean_pool_gist_fn))
    ids = np.random.RandomState(3).randint(0, VOCAB, (K ** 3 + 64, K)).astype(np.int32)
    tree = tr.init_tree(cfg)
    for chunk in np.split(ids[:K ** 3], 8):
        tree = fn(tree, chunk)
    tree = tr.check_tree(fn(tree, ids[K ** 3:]))
    assert list(np.asarray(tree.counts(K))) == [K ** 3 + 64, K ** 2 + 2, K, 1]
    want = table[ids.reshape(-1)[:K ** 4]].mean(axis=0)
    np.testing.assert_allclose(np.asarray(tree.gists[3][0]), want, atol=1e-6)


def test_vmap_batch_of_streams():
    cfg = tr.TreeConfig(d=D, capacity_blocks=40, depth=2)
    step = jax.jit(jax.vmap(lambda t, ids, n: tr.append_tokens(t, ids, cfg, embed,
                                                               tr.mean_pool_gist_fn, n)))
    B = 3
    trees = jax.tree.map(lambda x: jnp.stack([x] * B), tr.init_tree(cfg))
    refs = [RefTree(2, TABLE) for _ in range(B)]
    rng = np.random.RandomState(4)
    for _ in range(60):
        ids = rng.randint(0, VOCAB, (B, K)).astype(np.int32)
        ns = rng.randint(0, K + 1, B).astype(np.int32)
        trees = step(trees, ids, ns)
        for b in range(B):
            refs[b].append(ids[b, :ns[b]])
    for b in range(B):
        assert_matches(jax.tree.map(lambda x: x[b], trees), refs[b], cfg)


def test_capacity_overflow_loses_nothing():
    cfg = tr.TreeConfig(d=D, capacity_blocks=2, depth=2)
    fns = compiled(cfg)
    ids = np.arange(K, dtype=np.int32) % VOCAB
    tree = fns["tokens"](tr.init_tree(cfg), ids, K)
    tree = fns["tokens"](tree, ids, K - 1)
    before = jax.device_get(tree)
    after = fns["tokens"](tree, ids, 2)
    with pytest.raises(CapacityError, match="capacity"):
        tr.check_tree(after, cfg)
    assert int(after.num_tokens) == 2 * K - 1
    np.testing.assert_array_equal(np.asarray(after.tokens_T), before.tokens_T)
    np.testing.assert_array_equal(np.asarray(after.gists[0]), before.gists[0])
    tree = tr.check_tree(fns["tokens"](tr.clear_error(after), ids, 1), cfg)
    assert int(tree.num_tokens) == 2 * K
    with pytest.raises(CapacityError):
        tr.check_tree(fns["blocks"](tree, ids.reshape(1, K)), cfg)
    with pytest.raises(CapacityError):
        tr.build_tree(np.zeros(3 * K, np.int32), cfg, embed, tr.mean_pool_gist_fn)


def test_misaligned_bulk_append_is_rejected():
    cfg = tr.TreeConfig(d=D, capacity_blocks=8, depth=2)
    fns = compiled(cfg)
    tree = fns["tokens"](tr.init_tree(cfg), np.zeros(K, np.int32), 3)
    out = fns["blocks"](tree, np.zeros((2, K), np.int32))
    with pytest.raises(ValueError, match="open block"):
        tr.check_tree(out)
    assert int(out.num_tokens) == 3


def test_wrong_token_dtype():
    cfg = tr.TreeConfig(d=D, capacity_blocks=8, depth=2)
    t = tr.init_tree(cfg)
    for bad in (np.zeros(4, np.int64), np.zeros(4, np.float32), [1, 2, 3]):
        with pytest.raises(tr.TokenDtypeError, match="int32"):
            tr.append_tokens(t, bad, cfg, embed, tr.mean_pool_gist_fn)
    with pytest.raises(tr.TokenDtypeError):
        tr.append_blocks(t, np.zeros((1, K), np.uint32), cfg, embed, tr.mean_pool_gist_fn)
    with pytest.raises(tr.TokenDtypeError):
        tr.build_tree(np.zeros(K, np.int16), cfg, embed, tr.mean_pool_gist_fn)
