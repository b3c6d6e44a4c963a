"""`lensq` (issue 19, items 2 and 4): the retrieval features LensNet reads, the flat one-entry-per-
block layout, and the policy on the tiny base with a question-aware LensNet export."""
import jax
import numpy as np
import pytest
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.eval.policies import lensq
from mc_jax.eval.policies import registry as pol
from mc_jax.eval.policies import retrieve as rt
from mc_jax.nets import io as nets_io
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=2048)
HEADS = ((1, 0), (0, 1))


def test_match_features_reference():
    rng = np.random.default_rng(0)
    H, n, n_q = 3, 9, 4
    mass = rng.dirichlet(np.ones(n), size=H) * n_q
    mass[:, 5] += 2.0  # block 5 draws the most attention
    excess = -rng.exponential(3.0, (H, n))
    bm25 = np.abs(rng.normal(size=n))
    f = lensq.match_features(mass, excess, bm25, n_q)
    assert f.shape == (n, lensq.n_match(H)) and np.all(np.isfinite(f))
    ratio = np.log(mass * n / n_q + 1e-3) / 5
    np.testing.assert_allclose(f[:, :H], ratio.T, rtol=1e-5)
    np.testing.assert_allclose(f[:, 2 * H:3 * H], (ratio - ratio.max(1, keepdims=True)).T,
                               rtol=1e-5, atol=1e-6)
    tot, gap, left, right = f[:, 3 * H], f[:, 3 * H + 1], f[:, 3 * H + 2], f[:, 3 * H + 3]
    assert gap[5] == 0 and np.all(gap <= 0)
    np.testing.assert_allclose(left[1:], tot[:-1])   # the block before's
    np.testing.assert_allclose(right[:-1], tot[1:])  # the block after's
    assert left[0] == 0 and right[-1] == 0
    b = f[:, 3 * H + 4]
    assert np.isclose(b.max(), 1.0) and np.argmax(b) == np.argmax(bm25)
    assert not lensq.match_features(mass, excess, np.zeros(n), n_q)[:, 3 * H + 4:].any()


def test_lens_inputs_layout():
    n, D, R = 37, 16, lensq.n_match(2)
    f = lensq.lens_inputs(np.ones((n, D)), np.ones((n, R)), np.ones((200, D)))
    E = lensq.bucket_entries(n)
    assert E == 256 and f.vec_xExD.shape == (E, D) and f.match_xExR.shape == (E, R)
    mask = np.asarray(f.mask_xE)
    assert mask.sum() == n and mask[:n].all()
    assert np.asarray(f.distance_xE)[0] == n - 1 and np.asarray(f.distance_xE)[n - 1] == 0
    assert f.query_xQxD.shape == (lensq.Q_MAX, D) and np.asarray(f.query_mask_xQ).all()
    assert lensq.bucket_entries(257) == 512


@pytest.fixture(scope="module")
def model():
    return TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), ByteTokenizer())


def _export(path, model=None, **lens_kw):
    # mean-pool gists as `load_nets(meanpool=True)` builds them: the sessions (and their
    # compiles) are those of the retrieve tests
    gcfg = (GistNetConfig.tiny(d_model=CFG.d_model) if model is None else
            GistNetConfig(d_model=CFG.d_model, depth=2, kind="mean_pool",
                          embed_rms=bm.embedding_rms(model.params)))
    lcfg = LensNetConfig.tiny(d_model=CFG.d_model, **lens_kw)
    gist, lens = build_gist_model(gcfg, rngs=nnx.Rngs(1)), LensNet(lcfg, rngs=nnx.Rngs(2))
    nets_io.save_networks(path, nnx.state(gist, nnx.Param), nnx.state(lens, nnx.Param), gcfg,
                          lcfg, {"lensq": {"heads": [list(h) for h in HEADS]}}, "float32")
    return lens


def test_lensq_policy_ranks_by_its_lensnet(model, tmp_path):
    lens = _export(tmp_path / "q", model, n_match=lensq.n_match(len(HEADS)), query=True)
    p = pol.make_policy("lensq", model, 192, checkpoint=tmp_path / "q", window=64)
    assert p.heads == HEADS
    hist = np.random.default_rng(3).integers(0, 256, 640).astype(np.int32)
    ans = p.answer(hist, "what is it?", 3, chat=False)
    assert isinstance(ans, str)
    f = p.last_focus
    n = len(hist) // 32
    # the scores are the LensNet's on the features of this history and question
    q_ids = np.asarray(ByteTokenizer().encode("what is it?"), np.int32)
    assert f["block_scores"].shape == (n,) and np.all(np.abs(f["block_scores"]) <= 1)
    best = int(np.argmax(f["block_scores"]))
    assert f["kept"][0] == best and set(f["kept"]) <= set(rt.with_neighbours([best], 1, n))
    feat = lensq.case_features(p, hist, q_ids)
    want = np.asarray(lensq.lens_scores(lens, lensq.inputs_from_features(feat)))[:n]
    np.testing.assert_allclose(f["block_scores"], want, atol=1e-5)


def test_lensq_zoom_expands_what_its_lensnet_wants(model, tmp_path, monkeypatch):
    _export(tmp_path / "q", model, n_match=lensq.n_match(len(HEADS)), query=True)
    p = pol.make_policy("lensq_zoom", model, 384, checkpoint=tmp_path / "q", window=64)
    hist = np.random.default_rng(4).integers(0, 256, 900).astype(np.int32)
    n, hot = len(hist) // 32, (3, 11)
    u = np.full(n, -0.9, np.float32)
    u[list(hot)] = 0.9  # the LensNet's scores, made known: two old blocks wanted
    monkeypatch.setattr(p, "block_scores", lambda h, q: u)
    p.answer(hist, "what is it?", 2, chat=False)
    f = p.last_focus
    z = f["zoom"]
    assert 1 <= z["rounds"] <= 8 and len(z["expands"]) == z["rounds"]
    assert z["stop"] == 0 and z["expands"][-1] + z["collapses"][-1] == 0  # converged
    want = {3, 2, 4, 11, 10, 12}  # both hot blocks are the best: they and their neighbours
    assert set(f["kept"]) == want and want <= set(f["raw_blocks"])
    assert sum(z["expands"]) >= len(want)  # at least one LOD1 -> LOD0 expansion each
    np.testing.assert_allclose(lensq.zoom_scores(np.asarray([-0.9, -0.5, -0.6, -0.9, -0.62])),
                               [0.35, 0.35, 0.35, 0.25, 0.23], atol=1e-6)


def test_lensq_refuses_networks_that_cannot_read_the_question(model, tmp_path):
    _export(tmp_path / "plain")
    with pytest.raises(pol.Unavailable, match="not question-aware"):
        pol.make_policy("lensq", model, 192, checkpoint=tmp_path / "plain")
    with pytest.raises(pol.Unavailable, match="question-aware LensNet"):
        pol.make_policy("lensq", model, 192, checkpoint=tmp_path / "none")
