"""`retrieve` (issue 19, item 5): the base's pre-RoPE queries and keys (`layer_qk`), window keys,
attention mass per block, and the policy on the tiny base."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.base import base_model as bm
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.errors import InputError
from mc_jax.eval.policies import registry as pol
from mc_jax.eval.policies import retrieve as rt

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=2048)


@pytest.fixture(scope="module")
def model():
    return TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), ByteTokenizer())


def test_layer_qk_keys_are_the_cache_keys_before_rope(model):
    T = 48
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, T)), jnp.int32)
    pos = jnp.arange(T)[None] + 5
    cache = bm.init_cache(CFG, 1, 64)
    _, cache = bm.forward(model.params, CFG, ids, pos, cache=cache, cache_index=0)
    q, k = bm.layer_qk(model.params, CFG, ids, pos, CFG.n_layers)
    assert q.shape == (CFG.n_layers, 1, T, CFG.n_heads, CFG.head_dim)
    cos, sin = bm.rope_tables(pos, None, CFG.head_dim, CFG.rope_base)
    for layer in range(CFG.n_layers):
        np.testing.assert_allclose(np.asarray(bm.apply_rope(k[layer], cos, sin)),
                                   np.asarray(cache.k[layer][:, :T]), atol=1e-5)
    # layer 0's queries straight from the weights
    h = bm.rms_norm(bm.embed_tokens(model.params, ids), model.params["layers"]["attn_norm"][0],
                    CFG.rms_eps)
    q0 = jnp.einsum("btd,de->bte", h, model.params["layers"]["wq"][0])
    np.testing.assert_allclose(np.asarray(q[0]).reshape(q0.shape), np.asarray(q0), atol=1e-5)
    q1, k1 = bm.layer_qk(model.params, CFG, ids, pos, 1)  # fewer layers: the same first layer
    np.testing.assert_allclose(np.asarray(k1[0]), np.asarray(k[0]), atol=1e-6)
    with pytest.raises(ValueError, match="n_layers"):
        bm.layer_qk(model.params, CFG, ids, pos, CFG.n_layers + 1)


def test_history_keys_run_each_window_alone(model):
    ids = np.random.default_rng(1).integers(0, 256, 200).astype(np.int32)
    pre = np.asarray([7, 8, 9], np.int32)
    k = rt.history_keys(model, ids, 2, window=64, prefix=pre)
    n = len(ids) // 32
    assert k.shape == (2, n, 32, CFG.n_kv_heads, CFG.head_dim)
    flat = k.reshape(2, n * 32, CFG.n_kv_heads, CFG.head_dim)
    for s in (0, 64, 128):
        seq = np.concatenate([pre, ids[s:min(s + 64, n * 32)]])
        _, kw = bm.layer_qk(model.params, CFG, jnp.asarray(seq[None]),
                            jnp.arange(len(seq))[None], 2)
        np.testing.assert_allclose(flat[:, s:s + len(seq) - 3], np.asarray(kw)[:, 0, 3:],
                                   atol=1e-5)


def test_head_mass_sums_to_the_question_tokens_and_finds_the_aligned_block():
    rng = np.random.default_rng(2)
    n, K, F, Tq = 6, 32, 16, 5
    k = rng.normal(size=(1, n, K, 1, F)).astype(np.float32) * 0.1
    target = rng.normal(size=F).astype(np.float32)
    k[0, 4, 10, 0] = 8 * target  # one token of block 4 matches every query
    q = np.tile(target, (1, Tq, 1, 1)).astype(np.float32)  # [L=1, Tq, N=1, F]
    cfg = bm.LlamaConfig.tiny(vocab_size=256)
    cfg = dataclasses.replace(cfg, n_heads=1, n_kv_heads=1, head_dim=F)
    s = rt.head_scores(q, k, [(0, 0)], cfg, delta=0)
    assert s.shape == (1, n) and np.isclose(s.sum(), Tq, atol=1e-4)
    assert int(np.argmax(s[0])) == 4


def test_with_neighbours():
    assert rt.with_neighbours([5, 0, 9], 2, 10) == [5, 6, 4, 0, 1]
    assert rt.with_neighbours([9], 1, 10) == [9, 8]


def test_retrieve_policy_keeps_its_best_block_raw(model):
    p = pol.make_policy("retrieve", model, 192, gists="meanpool", heads=((1, 0), (0, 1)), top=1,
                        window=64)
    hist = np.random.default_rng(3).integers(0, 256, 640).astype(np.int32)
    ans = p.answer(hist, "what is it?", 4, chat=False)
    assert isinstance(ans, str)
    f = p.last_focus
    n = len(hist) // 32
    assert f["block_scores"].shape == (n,) and np.all(np.isfinite(f["block_scores"]))
    best = int(np.argmax(f["block_scores"]))
    assert f["kept"][0] == best and best in f["raw_blocks"]
    assert set(f["kept"]) <= set(rt.with_neighbours([best], 1, n))


def test_retrieve_perplexity_keeps_the_blocks_the_newest_block_attends_to(model):
    """nll_stream: before each scored block the newest complete block is the query; the
    ppl_top best blocks not already raw become raw; ppl_top=0 is recency."""
    kw = dict(gists="meanpool", heads=((1, 0), (0, 1)), window=64)
    hist = np.random.default_rng(4).integers(0, 256, 1024).astype(np.int32)
    blocks = [12, 20, 31]
    rec = pol.make_policy("meanpool", model, 192).nll_stream(hist, blocks)
    p0 = pol.make_policy("retrieve", model, 192, ppl_top=0, **kw)
    np.testing.assert_allclose(p0.nll_stream(hist, blocks), rec, atol=1e-5)
    p = pol.make_policy("retrieve", model, 192, ppl_top=2, **kw)
    nll = p.nll_stream(hist, blocks)
    assert nll.shape == (3, 32) and np.all(np.isfinite(nll))
    assert p.stats()["ppl_refocus"] == 3 and p.stats()["ppl_kept"] == 6
    assert not np.allclose(nll, rec)  # the retrieved blocks change what the base reads
    # one refocus by hand: the kept blocks are the best-scoring ones that were not raw
    from mc_jax.eval.policies.megacontext import raw_history_blocks
    s = p._session(len(hist))
    s.ingest(hist[:32 * 20])
    n = 19
    raw = set(raw_history_blocks(s.state.wc, n))
    p._live_keys = s.retrieval_keys(n)
    scores = p.block_scores(hist[:32 * n], hist[32 * n:32 * 20])
    p._live_keys = None
    want = [int(b) for b in np.argsort(-scores, kind="stable") if int(b) not in raw][:2]
    kept = p.ppl_refocus(s)
    assert kept == want and set(want) <= set(raw_history_blocks(s.state.wc, n))
    with pytest.raises(InputError, match="ppl_top"):
        pol.make_policy("retrieve", model, 192, ppl_top=-1, **kw)
