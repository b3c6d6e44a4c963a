"""The gist reader: low-rank deltas on the base's linear maps that act at gist slots only.

Token rows must be computed exactly as by the frozen base (the reader may change only what the
gist slots contribute), a fresh reader changes nothing, and training reaches every reader
parameter and no base parameter."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.training import checkpoints, loop, models, objective, step as train_step_mod
from mc_jax.training import windows as twc
from mc_jax.eval.networks import substitution_nll
from mc_jax.training.config import load_config
from mc_jax.nets import io as nets_io

CFG = load_config("tiny:reader")


@pytest.fixture(scope="module")
def tiny():
    cfg = bm.LlamaConfig.tiny()
    return cfg, bm.init_params(cfg, jax.random.PRNGKey(0))


def _random_adapter(params, rank=4, seed=1):
    ad = bm.init_adapter(bm.adapter_dims(params), rank, jax.random.PRNGKey(seed))
    keys = iter(jax.random.split(jax.random.PRNGKey(seed + 1), len(ad)))
    return {n: {"a": v["a"], "b": 0.5 * jax.random.normal(next(keys), v["b"].shape)}
            for n, v in ad.items()}


def test_reader_changes_nothing_at_token_rows_before_a_gist(tiny):
    cfg, p = tiny
    T, j = 24, 15
    x = jax.random.normal(jax.random.PRNGKey(3), (1, T, cfg.d_model))
    pos = jnp.arange(T)[None]
    plain = bm.forward(p, cfg, x, pos, return_hidden=True)[0]
    ad = _random_adapter(p)
    mask = (jnp.arange(T) == j)[None]
    read = bm.forward(p, cfg, x, pos, return_hidden=True, adapter=ad, adapt_BxT=mask)[0]
    # rows before the gist slot do not see it: bit-identical to the frozen base
    np.testing.assert_array_equal(np.asarray(read[0, :j]), np.asarray(plain[0, :j]))
    # the gist row and every row after it (which attend to it) change
    d = np.abs(np.asarray(read - plain))[0].max(-1)
    assert d[j] > 1e-3 and (d[j + 1:] > 1e-6).all()
    # no gist slot, or a fresh reader (b = 0): exactly the frozen base
    none = bm.forward(p, cfg, x, pos, return_hidden=True, adapter=ad,
                      adapt_BxT=jnp.zeros((1, T), bool))[0]
    np.testing.assert_array_equal(np.asarray(none), np.asarray(plain))
    fresh = bm.init_adapter(bm.adapter_dims(p), 4, jax.random.PRNGKey(9))
    f = bm.forward(p, cfg, x, pos, return_hidden=True, adapter=fresh,
                   adapt_BxT=jnp.ones((1, T), bool))[0]
    np.testing.assert_array_equal(np.asarray(f), np.asarray(plain))
    with pytest.raises(ValueError, match="adapt_BxT"):
        bm.forward(p, cfg, x, pos, adapter=ad)


def test_gist_slots_are_exactly_the_packed_gist_rows():
    pc = twc.PackConfig(seq_blocks=8, budget=128, horizon=8, depth=1, protect_blocks=1,
                        edit_headroom=False)
    levels = jnp.asarray([-1, -1, -1, -1, 0, 1, 0, 0])
    emb = jnp.ones((8, pc.block_size, 4))
    gists = (jnp.full((8, 4), 7.0),)
    x, _, _, valid = twc.pack(levels, emb, gists, jnp.ones((8, 4)), pc)
    mask = np.asarray(twc.gist_slots(levels, pc))
    is_gist = np.asarray(valid) & (np.asarray(x)[:, 0] == 7.0)
    np.testing.assert_array_equal(mask, is_gist)
    assert mask.sum() == 1


def test_training_reaches_every_reader_parameter_and_no_base_parameter(tiny):
    base_cfg, base = tiny
    m, g, l = models.build_models(CFG, base_cfg, base)
    # b starts at 0, so a gets no gradient at the very first step (as in LoRA): perturb b
    g = jax.tree_util.tree_map_with_path(
        lambda kp, v: v + 0.1 if any(getattr(k, "key", None) == "b" for k in kp) else v, g)
    tokens = jnp.asarray(np.asarray(next(loop.SyntheticBatches(
        CFG.replace(batch_size=2), 256, None))["tokens"]))
    loss = lambda g_, bp: objective.batch_loss({"gist": g_, "lens": l}, bp, tokens,  # noqa: E731
                                               jax.random.PRNGKey(0), m)[0]
    gg, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))(g, base)
    reader = [(kp, v) for kp, v in jax.tree_util.tree_flatten_with_path(gg)[0]
              if "reader" in jax.tree_util.keystr(kp)]
    assert len(reader) == 2 * len(bm.ADAPTER_TARGETS)
    for kp, v in reader:
        assert float(jnp.max(jnp.abs(v))) > 0, f"no gradient reaches {jax.tree_util.keystr(kp)}"
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(gb))


def test_exported_reader_round_trips_and_is_used_by_eval_gists(tmp_path, tiny):
    base_cfg, base = tiny
    m, g, l = models.build_models(CFG, base_cfg, base)
    model = nnx.merge(m.gist_graph, g)
    ad = _random_adapter(base, rank=CFG.gist_reader_rank)
    for n in model.reader:
        model.reader[n]["b"][...] = ad[n]["b"]
    state = train_step_mod.init_state(m, nnx.state(model), l)
    checkpoints.export_networks(tmp_path / "nets", m, state, {"steps": 0}, dtype="float32")
    gist, _, info = nets_io.load_networks(tmp_path / "nets")
    assert info["gist_config"]["reader_rank"] == CFG.gist_reader_rank
    for n in ad:
        np.testing.assert_array_equal(np.asarray(gist.reader[n]["b"][...]),
                                      np.asarray(ad[n]["b"]))
    ids = np.asarray(jax.random.randint(jax.random.PRNGKey(4), (8 * CFG.block_size + 16,), 0,
                                        base_cfg.vocab_size))
    kw = dict(level=1, blocks=[3, 5], horizon=16)
    with_reader = substitution_nll(base, base_cfg, gist, ids, **kw)
    for n in gist.reader:
        gist.reader[n]["b"][...] = jnp.zeros_like(gist.reader[n]["b"][...])
    without = substitution_nll(base, base_cfg, gist, ids, **kw)
    assert np.abs(with_reader - without).max() > 1e-4
    # dropping a block involves no gist, so the reader cannot matter there
    np.testing.assert_array_equal(substitution_nll(base, base_cfg, gist, ids, drop=True, **kw),
                                  substitution_nll(base, base_cfg, model, ids, drop=True, **kw))
