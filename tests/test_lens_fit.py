"""Offline LensNet fitting (mc_jax/training/lens_fit.py) on the tiny config: labels measured with the
frozen tiny base, a fit that lowers the loss, the export round trip, a damaged shard."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.training import checkpoints, lens_fit, loop, models
from mc_jax.training.step import TrainState
from mc_jax.errors import McJaxError
from mc_jax.training.config import load_config
from mc_jax.nets import io as nets_io
from mc_jax import stats


@pytest.fixture(scope="module")
def tiny():
    """The tiny frozen base, a GistNet + LensNet for it, and 6 synthetic windows."""
    cfg = load_config("tiny").replace(phase="lens", n_wc=3, n_edits=4)
    base_cfg, base_params, _ = models.load_frozen_base(cfg)
    m, gist_state, lens_state = models.build_models(cfg, base_cfg, base_params)
    model = types.SimpleNamespace(params=base_params, cfg=base_cfg, tokenizer=None)
    toks = np.asarray(next(loop.SyntheticBatches(cfg.replace(batch_size=6), 256, None))["tokens"])
    return types.SimpleNamespace(model=model, m=m, gist_state=gist_state, lens_state=lens_state,
                                 toks=toks)


@pytest.fixture(scope="module")
def measured(tiny):
    one = lens_fit.measure_fn(tiny.model, tiny.m, tiny.gist_state)
    rows = [jax.device_get(one(jnp.asarray(t), jax.random.PRNGKey(i)))
            for i, t in enumerate(tiny.toks)]
    labels = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
    return tiny.m, tiny.gist_state, labels


def _another_gistnet(gist_state):
    return jax.tree.map(lambda a: a + 1e-3 if a.dtype == jnp.float32 else a, gist_state)


def test_labels_are_single_edit_utilities(measured):
    m, _, labels = measured
    M, E = m.cfg.n_wc - 1, m.cfg.n_edits
    assert labels["nll"].shape == (6, M) and labels["nll_e"].shape == (6, M, E)
    assert labels["evalid"].any() and np.isfinite(labels["nll_e"][labels["evalid"]]).all()
    # an edit changes the WC, so its NLL differs from the unedited mixture's
    d = np.abs(labels["nll_e"] - labels["nll"][..., None])[labels["evalid"]]
    assert (d > 0).mean() > 0.5


def test_fit_lowers_the_loss_and_exports_a_loadable_checkpoint(measured, tmp_path):
    m, gist_state, labels = measured
    m2, lens_state, summ = lens_fit.fit(m, labels, steps=60, batch=4, lr=3e-3, val_frac=0.34,
                                        seed=0, workdir=tmp_path, progress=False)
    assert summ["last_loss"] < summ["first_loss"]
    assert summ["val_windows"] == 2 and np.isfinite(summ["val_spearman_last"])
    checkpoints.export_networks(tmp_path / "net", m2, TrainState(
        step=jnp.int32(0), gist=gist_state, lens=lens_state, opt=None, key=None), {"x": 1})
    gist, lens, info = nets_io.load_networks(tmp_path / "net", m.base_cfg)
    assert info["x"] == 1
    w = {k: jnp.asarray(v[0]) for k, v in labels.items()}
    from flax import nnx
    # jitted (op by op, each call compiled every LensNet op anew); the same function for both
    scores_of = jax.jit(lambda ls, w_: lens_fit.edit_scores_of(ls, w_, m2))
    u_loaded, _ = scores_of(nnx.split(lens)[1], w)
    u_fit, _ = scores_of(lens_state, w)
    np.testing.assert_allclose(np.asarray(u_loaded), np.asarray(u_fit), atol=0.02)  # bf16 export


def test_a_damaged_label_shard_is_named(tmp_path):
    bad = tmp_path / "labels_0000.npz"
    bad.write_bytes(b"not an npz")
    with pytest.raises(McJaxError, match="labels_0000.npz"):
        lens_fit.load_labels([bad])


def test_label_shards_of_another_gistnet_or_setting_are_refused(measured, tmp_path):
    m, gist_state, _ = measured
    fp = lens_fit.gist_fingerprint(gist_state)
    other = _another_gistnet(gist_state)
    assert lens_fit.gist_fingerprint(other) != fp
    base = dict(gist_sha256=fp, base="tiny", seq_len=256, horizon=16, mixtures=2, edits=4,
                shard=8, seed=0, data_dir=None)
    shard = tmp_path / "labels_0000.npz"
    np.savez(shard, x=np.zeros(3))
    logs = []
    lens_fit.check_manifest(tmp_path, base, log=logs.append)  # older shards are adopted, said
    assert len(logs) == 1 and "predate" in logs[0]
    lens_fit.check_manifest(tmp_path, dict(base), log=logs.append)  # same settings: reused
    assert len(logs) == 1
    for key, value in [("gist_sha256", lens_fit.gist_fingerprint(other)), ("edits", 8)]:
        with pytest.raises(McJaxError, match=key):
            lens_fit.check_manifest(tmp_path, dict(base, **{key: value}))
    assert shard.exists()  # nothing measured is lost
    (tmp_path / lens_fit.MANIFEST).write_text("{not json")
    with pytest.raises(McJaxError, match="labels_manifest.json"):
        lens_fit.check_manifest(tmp_path, base)


def test_eval_lens_compares_only_lensnets_fitted_on_the_same_gistnet(measured, monkeypatch):
    from mc_jax.eval import networks as eval_networks

    m, gist_state, labels = measured
    other = _another_gistnet(gist_state)
    exports = {"same": (m, gist_state, "lens-a", {}), "other": (m, other, "lens-b", {})}
    monkeypatch.setattr(lens_fit, "load_models", lambda model, ck, n_wc, n_e: exports[ck])
    got = eval_networks._comparison_lensnets(None, m, gist_state, ["same"], 2, 4)
    assert [(ck, ls) for ck, _, ls in got] == [("same", "lens-a")]
    with pytest.raises(McJaxError, match="--compare other.*another GistNet"):
        eval_networks._comparison_lensnets(None, m, gist_state, ["same", "other"], 2, 4)


def test_eval_lens_end_to_end_on_the_tiny_base_with_compare_and_saved_edits(tiny, tmp_path,
                                                                             monkeypatch):
    """eval_lens's loop on the tiny base (the real base and corpus replaced by the tiny ones):
    the same LensNet given as --compare scores identically (difference interval [0, 0]), and
    the saved per-edit arrays reproduce the reported Spearman."""
    from mc_jax.eval import networks as eval_networks
    from mc_jax.base import loading

    m, gist_state, model, lens_state, toks = (tiny.m, tiny.gist_state, tiny.model,
                                              tiny.lens_state, tiny.toks)
    monkeypatch.setattr(loading, "load_base", lambda base: model)
    monkeypatch.setattr(lens_fit, "load_models",
                        lambda mdl, ck, n_wc, n_e: (m, gist_state, lens_state, {"steps": 7}))
    monkeypatch.setattr(eval_networks, "_validation_windows",
                        lambda tok, L, n, seed, data_dir: [t[:L] for t in toks[:n]])
    out = tmp_path / "edits.npz"
    res = eval_networks.eval_lens("ck-a", n_docs=3, n_edits=4, n_wc=2, progress=False,
                                  compare=["ck-b"], save_edits=out)
    assert res["n_windows"] == 3 and res["trained_steps"] == 7 and res["n_edits_evaluated"] > 0
    (c,) = res["compare"]
    assert c["checkpoint"] == "ck-b" and c["spearman"] == res["spearman"]
    assert c["diff_vs_checkpoint"] == 0.0 and c["diff_ci95_windows"] == [0.0, 0.0]
    z = np.load(out)
    assert len(z["u"]) == res["n_edits_evaluated"] and set(z["window"]) == {0, 1, 2}
    assert stats.spearman(z["u"], z["d"]) == res["spearman"]
    np.testing.assert_array_equal(z["u_compare"][0], z["u"].astype(np.float32))
    assert list(z["checkpoints"]) == ["ck-a", "ck-b"]
    assert stats.spearman(z["block"], z["d"]) == res["spearman_recency_heuristic"]
    assert 0 <= z["block"].min() and z["block"].max() < m.pack.seq_blocks
    uw, dw = stats.within_window(z["u"], z["d"], z["window"])
    assert stats.spearman(uw, dw) == res["spearman_within_window"]
    assert all(abs(dw[z["window"] == i].mean()) < 1e-9 for i in range(3))
    assert set(z["level"]) <= set(range(m.pack.depth + 1))
