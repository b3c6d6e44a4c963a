"""The base decoder on tiny random configs: equivalences that a correct Llama forward must obey."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import generate, sample_token
from mc_jax.errors import CapacityError, ConfigError, TokenError

CFG = bm.LlamaConfig.tiny()


@pytest.fixture(scope="module")
def params():
    return bm.init_params(CFG, jax.random.PRNGKey(0))


def _ids(key, B, T):
    return jax.random.randint(jax.random.PRNGKey(key), (B, T), 0, CFG.vocab_size)


def _pos(B, T, offset=0):
    return jnp.broadcast_to(jnp.arange(T) + offset, (B, T))


fwd = jax.jit(bm.forward, static_argnames=("cfg", "return_hidden"))


def test_logits_from_ids_equal_logits_from_embeddings(params):
    ids = _ids(1, 2, 24)
    a, _ = fwd(params, CFG, ids, _pos(2, 24))
    b, _ = fwd(params, CFG, bm.embed_tokens(params, ids), _pos(2, 24))
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_kv_cache_prefill_then_chunks_then_single_tokens_equal_full_forward(params):
    B, T = 2, 40
    ids = _ids(2, B, T)
    full, _ = fwd(params, CFG, ids, _pos(B, T))
    cache = bm.init_cache(CFG, B, 64)
    out = []
    # prefill 16, then a K=8 chunk, then 16 single tokens
    splits = [(0, 16), (16, 24)] + [(t, t + 1) for t in range(24, T)]
    for s, e in splits:
        lg, cache = fwd(params, CFG, ids[:, s:e], _pos(B, e - s, s), cache=cache, cache_index=s)
        out.append(lg)
    np.testing.assert_allclose(jnp.concatenate(out, axis=1), full, atol=2e-5)


def test_shifting_all_positions_changes_logits_only_by_float_noise(params):
    ids = _ids(3, 1, 32)
    a, _ = fwd(params, CFG, ids, _pos(1, 32))
    b, _ = fwd(params, CFG, ids, _pos(1, 32, offset=1000))
    np.testing.assert_allclose(a, b, atol=2e-4)
    # ...but changing relative positions does change them (the check can fail)
    c, _ = fwd(params, CFG, ids, _pos(1, 32) * 3)
    assert float(jnp.max(jnp.abs(a - c))) > 1e-2


def test_padding_mask_isolates_batch_rows_and_padding(params):
    T = 32
    ids = _ids(4, 2, T)
    valid = jnp.array([[True] * T, [True] * 20 + [False] * 12])
    noisy = ids.at[1, 20:].set(7)  # garbage in padding
    a, _ = fwd(params, CFG, ids, _pos(2, T), valid_BxT=valid)
    b, _ = fwd(params, CFG, noisy, _pos(2, T), valid_BxT=valid)
    np.testing.assert_allclose(a[:, :20], b[:, :20], atol=1e-5)
    np.testing.assert_allclose(a[0], b[0], atol=1e-5)
    solo, _ = fwd(params, CFG, ids[1:, :20], _pos(1, 20))
    np.testing.assert_allclose(a[1, :20], solo[0], atol=1e-5)
    assert bool(jnp.all(jnp.isfinite(a)))


def test_left_padding_in_the_cache_is_ignored(params):
    """Invalid slots anywhere in the cache (e.g. an unused WC slot) do not change the result."""
    ids = _ids(5, 1, 12)
    ref, _ = fwd(params, CFG, ids, _pos(1, 12))
    cache = bm.init_cache(CFG, 1, 32)
    x = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), ids], axis=1)
    valid = jnp.arange(16)[None] >= 4
    pos = jnp.concatenate([jnp.zeros((1, 4), jnp.int32), _pos(1, 12)], axis=1)
    got, _ = fwd(params, CFG, x, pos, valid_BxT=valid, cache=cache, cache_index=0)
    np.testing.assert_allclose(got[:, 4:], ref, atol=2e-5)


def test_bf16_close_to_fp32(params):
    ids = _ids(6, 2, 32)
    a, _ = fwd(params, CFG, ids, _pos(2, 32))
    b, _ = fwd(bm.cast_params(params, jnp.bfloat16), CFG, ids, _pos(2, 32))
    assert b.dtype == jnp.float32  # logits are always float32
    pa, pb = jax.nn.softmax(a), jax.nn.softmax(b)
    assert float(jnp.max(jnp.abs(pa - pb))) < 0.05
    assert float(jnp.mean(jnp.argmax(a, -1) == jnp.argmax(b, -1))) > 0.8


def test_gaussian_rope_with_sigma_zero_is_plain_rope(params):
    ids = _ids(7, 1, 16)
    a, _ = fwd(params, CFG, ids, _pos(1, 16))
    b, _ = fwd(params, CFG, ids, _pos(1, 16), sigma_BxT=jnp.zeros((1, 16)))
    np.testing.assert_allclose(a, b, atol=1e-6)
    c, _ = fwd(params, CFG, ids, _pos(1, 16), sigma_BxT=jnp.full((1, 16), 32.0))
    assert float(jnp.max(jnp.abs(a - c))) > 1e-3


def test_gaussian_damping_matches_formula():
    pos = jnp.array([[5.0]])
    sigma = jnp.array([[8.0]])
    cos, sin = bm.rope_tables(pos, sigma, 16, 10000.0)
    w = 10000.0 ** (-np.arange(0, 16, 2) / 16)
    damp = np.exp(-0.5 * (w * 8.0) ** 2)
    np.testing.assert_allclose(cos[0, 0], np.cos(5 * w) * damp, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(sin[0, 0], np.sin(5 * w) * damp, rtol=1e-5, atol=1e-7)


def test_untied_output_head_and_attention_bias():
    cfg = bm.LlamaConfig.tiny(tie_embeddings=False)
    p = bm.init_params(cfg, jax.random.PRNGKey(1))
    ids = _ids(8, 1, 8)
    a, _ = fwd(p, cfg, ids, _pos(1, 8))
    h, _ = fwd(p, cfg, ids, _pos(1, 8), return_hidden=True)
    np.testing.assert_allclose(a, h @ p["lm_head"], atol=1e-4)
    p["layers"]["bq"] = jnp.ones((cfg.n_layers, cfg.n_heads * cfg.head_dim))
    p["layers"]["bk"] = jnp.zeros((cfg.n_layers, cfg.n_kv_heads * cfg.head_dim))
    p["layers"]["bv"] = jnp.zeros((cfg.n_layers, cfg.n_kv_heads * cfg.head_dim))
    b, _ = fwd(p, cfg, ids, _pos(1, 8))
    assert float(jnp.max(jnp.abs(a - b))) > 1e-4


def test_token_ids_out_of_range_or_wrong_dtype_are_rejected():
    with pytest.raises(TokenError, match="outside the vocabulary"):
        bm.check_token_ids([1, 2, CFG.vocab_size], CFG)
    with pytest.raises(TokenError, match="outside the vocabulary"):
        bm.check_token_ids([-1], CFG)
    with pytest.raises(TokenError, match="must be integers"):
        bm.check_token_ids(np.array([1.5]), CFG)


def test_cache_longer_than_model_context_is_rejected():
    with pytest.raises(CapacityError, match="exceeds the model's context"):
        bm.init_cache(CFG, 1, CFG.max_seq_len + 1)


def test_generate_rejects_prompt_beyond_context(params):
    cfg = bm.LlamaConfig.tiny(max_seq_len=64)
    with pytest.raises(CapacityError, match="exceeds the model's context"):
        list(generate(params, cfg, [1] * 60, max_new_tokens=10))


def test_bad_head_config():
    with pytest.raises(ConfigError, match="multiple"):
        bm.LlamaConfig.tiny(n_heads=3, n_kv_heads=2)


def test_sampling_greedy_top_p_and_temperature():
    logits = jnp.log(jnp.array([[0.05, 0.6, 0.3, 0.05]]))
    key = jax.random.PRNGKey(0)
    assert int(sample_token(logits, key, 0.0, 1.0)[0]) == 1
    draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 0.7)[0])(jax.random.split(key, 400))
    assert set(np.unique(np.asarray(draws)).tolist()) == {1, 2}  # top-p 0.7 keeps 2 tokens
    draws = jax.vmap(lambda k: sample_token(logits, k, 1.0, 1.0)[0])(jax.random.split(key, 2000))
    freq = np.bincount(np.asarray(draws), minlength=4) / 2000
    np.testing.assert_allclose(freq, [0.05, 0.6, 0.3, 0.05], atol=0.04)


def test_greedy_generation_with_cache_equals_recompute(params):
    prompt = [3, 14, 15, 92, 65]
    got = list(generate(params, CFG, prompt, max_new_tokens=12))
    ids = list(prompt)
    for _ in range(12):  # recompute the whole prefix each token (padded: one compile)
        padded = jnp.asarray([ids + [0] * (32 - len(ids))])
        lg = bm.logits_fn(params, CFG, padded)
        ids.append(int(jnp.argmax(lg[0, len(ids) - 1])))
    assert got == ids[len(prompt):]


def test_remat_and_chunked_attention_change_memory_not_values():
    """`forward(remat=, attn_chunk=)`: the same hidden states and gradients (chunks that do not
    divide T included: padded queries), and the chunked backward compiles without the [T, T]
    score matrices (XLA's own temp-memory estimate, far below the dense one's)."""
    cfg = bm.LlamaConfig.tiny()
    p = bm.init_params(cfg, jax.random.PRNGKey(0))
    T = 100
    x = jax.random.normal(jax.random.PRNGKey(1), (2, T, cfg.d_model))
    valid = jnp.arange(T)[None] < jnp.array([[T], [77]])
    pos = jnp.broadcast_to(jnp.arange(T)[None], (2, T))

    def loss(x, **kw):
        h, _ = bm.forward(p, cfg, x, pos, valid_BxT=valid, return_hidden=True, **kw)
        return (h * valid[..., None]).sum(), h

    (_, h0), g0 = jax.value_and_grad(loss, has_aux=True)(x)
    for kw in (dict(remat=True), dict(attn_chunk=32), dict(attn_chunk=25, remat=True),
               dict(attn_chunk=T)):  # chunk >= T: the dense path
        (_, h1), g1 = jax.value_and_grad(lambda x: loss(x, **kw), has_aux=True)(x)
        np.testing.assert_allclose(np.asarray(h1), np.asarray(h0), atol=1e-5)
        np.testing.assert_allclose(np.asarray(g1), np.asarray(g0), atol=1e-4)

    T = 2048
    xs = jax.ShapeDtypeStruct((1, T, cfg.d_model), jnp.float32)
    posT = jnp.arange(T)[None]

    def temp_bytes(**kw):
        f = jax.grad(lambda x: bm.forward(p, cfg, x, posT, return_hidden=True, **kw)[0].sum())
        mem = jax.jit(f).lower(xs).compile().memory_analysis()
        if mem is None:
            pytest.skip("this backend gives no memory analysis")
        return mem.temp_size_in_bytes

    dense, chunked = temp_bytes(), temp_bytes(attn_chunk=128, remat=True)
    score_bytes = cfg.n_heads * T * T * 4  # one layer's [N, T, T] float32 scores
    assert dense >= score_bytes and chunked < score_bytes / 2 and chunked < dense / 10, \
        (dense, chunked)
