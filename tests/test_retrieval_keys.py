"""Retrieval keys in the runtime (issue 19, item 1): `KeyStore` fed block by block equals the
one-shot `history_keys` (the reference) for any ingest pattern; `Session(retrieval_heads=...)`
keeps them as it ingests and steps; `retrieve` answers from the session's keys."""
import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mc_jax.base import base_model as bm
from mc_jax.base.chat import build_prompt
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.errors import ConfigError
from mc_jax.eval.policies import registry as pol
from mc_jax.nets.io import load_nets
from mc_jax.runtime.retrieval_keys import KeyStore, history_keys
from mc_jax.runtime.session import Session

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=2048)
PRE = np.asarray([7, 8, 9], np.int32)
K, WIN = 32, 64


@pytest.fixture(scope="module")
def model():
    return TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), ByteTokenizer())


@pytest.fixture(scope="module")
def stream():
    return np.random.default_rng(5).integers(0, 256, 12 * K + 7).astype(np.int32)


@settings(max_examples=4, deadline=None)
@given(st.lists(st.integers(1, 40), min_size=1, max_size=6))
def test_keystore_equals_history_keys_for_any_feeding(model, stream, sizes):
    store = KeyStore(model, ((1, 0),), window=WIN, prefix=PRE, block_size=K)
    fed = 0
    for size in sizes:  # tokens arrive in arbitrary pieces (not whole blocks)
        fed = min(fed + size * 8, len(stream))
        store.update(stream[:fed])
        got = store.keys(stream[:fed])
        want = history_keys(model, stream[:fed], 2, window=WIN, prefix=PRE, K=K)[[1]][..., [0], :]
        assert got.shape == want.shape == (1, fed // K, K, 1, CFG.head_dim)  # head 0: KV head 0
        np.testing.assert_allclose(got, want, atol=1e-5)
        if fed // K >= 2:
            np.testing.assert_allclose(store.keys(stream[:fed], 2), want[:, :2], atol=1e-5)
    with pytest.raises(ValueError, match="blocks asked"):
        store.keys(stream[:fed], fed // K + 1)


def test_session_keeps_the_keys_as_it_ingests_and_steps(model, stream):
    gist, _, _ = load_nets(model, None, need_trained=False, meanpool=True)
    s = Session(model, 192, gist, None, policy="recency", capacity_tokens=1024,
                retrieval_heads=((1, 0), (0, 1)), retrieval_window=WIN, retrieval_prefix=PRE)
    s.ingest(stream[:5 * K])
    assert len(s.keys._done) == 2  # the two complete windows were computed while ingesting
    s.step(stream[5 * K:6 * K])
    s.ingest(stream[6 * K:9 * K])
    ids = np.asarray(s.ids)
    assert s.keys.kv_heads == [0]  # query heads 0 and 1 share KV head 0 (4 heads, 2 KV heads)
    want = history_keys(model, ids, 2, window=WIN, prefix=PRE, K=K)[..., [0], :]
    np.testing.assert_allclose(s.retrieval_keys(), want, atol=1e-5)
    s3 = Session(model, 192, gist, None, policy="recency", capacity_tokens=1024,
                 retrieval_heads=((0, 3),), retrieval_window=WIN, retrieval_prefix=PRE)
    s3.ingest(stream[:3 * K])
    want = history_keys(model, s3.ids, 1, window=WIN, prefix=PRE, K=K)[..., [1], :]
    np.testing.assert_allclose(s3.retrieval_keys(), want, atol=1e-5)
    assert s.keys.nbytes > 0
    s.reset()
    assert s.retrieval_keys().shape[1] == 0
    plain = Session(model, 192, gist, None, policy="recency", capacity_tokens=1024)
    with pytest.raises(ConfigError, match="retrieval_heads"):
        plain.retrieval_keys()


def test_retrieve_answers_from_the_sessions_keys(model, stream):
    p = pol.make_policy("retrieve", model, 192, gists="meanpool", heads=((1, 0), (0, 1)),
                        window=WIN)
    hist = stream[:10 * K + 5]
    p.answer(hist, "what is it?", 2, chat=False)
    pr = build_prompt(model.tokenizer, "what is it?", chat=False)
    q = np.asarray(pr.tail[pr.q_start:pr.q_end])
    # the same scores from keys computed here at once (no session)
    np.testing.assert_allclose(p.last_focus["block_scores"], p.block_scores(hist, q), rtol=1e-4,
                               atol=1e-6)
