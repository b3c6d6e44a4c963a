"""A sharded base (issue 17, item 2) on 8 fake CPU devices: the ('data', 'model') mesh, the
per-parameter rules (tensor parallel, FSDP), the sharded forward and train step equal to the
replicated ones, and a config whose compiled step needs more memory than allowed is refused
before any step runs, with nothing written."""
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mc_jax.base import base_model as bm
from mc_jax.errors import ConfigError
from mc_jax.training import loop, models, step as step_mod
from mc_jax.training.config import load_config

CFG = load_config("tiny")


@pytest.fixture(scope="module")
def setup():
    base_cfg, base_params, _ = models.load_frozen_base(CFG)
    m, g, l = models.build_models(CFG, base_cfg, base_params)
    return m, g, l, base_params


def test_mesh_and_the_sharding_rules(setup):
    *_, params = setup
    mesh = step_mod.make_mesh(8, model=2)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 2}
    assert dict(step_mod.make_mesh(8).shape) == {"data": 8, "model": 1}
    with pytest.raises(ConfigError, match="model_parallel=3 does not divide the 8 devices"):
        step_mod.make_mesh(8, model=3)
    tp = step_mod.base_param_specs(params, "tp", 2)
    lay = tp["layers"]
    assert lay["wq"] == P(None, None, "model") and lay["w_up"] == P(None, None, "model")
    assert lay["wo"] == P(None, "model", None) and lay["w_down"] == P(None, "model", None)
    assert lay["attn_norm"] == P() and tp["final_norm"] == P() and tp["embed"] == P("model", None)
    fs = step_mod.base_param_specs(params, "fsdp", 2)
    for path, spec in jax.tree_util.tree_leaves_with_path(
            fs, is_leaf=lambda x: isinstance(x, P)):
        a = params
        for k in path:
            a = a[k.key]
        stacked = path[0].key == "layers"
        free = [i for i in range(int(stacked), a.ndim) if a.shape[i] % 2 == 0]
        if not free:
            assert spec == P()
            continue
        i = list(spec).index("model")  # the largest divisible dimension, never the layer axis
        assert a.shape[i] == max(a.shape[j] for j in free) and not (stacked and i == 0)
    # one device along 'model': everything replicated; an odd size: what does not divide stays
    assert all(s == P() for s in jax.tree.leaves(step_mod.base_param_specs(params, "tp", 1),
                                                 is_leaf=lambda x: isinstance(x, P)))
    odd = step_mod.base_param_specs(params, "tp", 3)
    assert odd["layers"]["wq"] == P()  # 64 output features do not split in 3
    with pytest.raises(ConfigError, match="base_sharding"):
        step_mod.base_param_specs(params, "zero3", 2)
    with pytest.raises(ConfigError, match="base_sharding"):
        CFG.replace(base_sharding="zero3")


def _one_step(setup, mp, mode, tokens):
    """(logits of a plain forward, loss, GistNet after one train step) with the base split over
    `mp` devices of the 'model' axis by `mode`."""
    m, g, l, params = setup
    cfg = CFG.replace(model_parallel=mp, base_sharding=mode)
    mesh = step_mod.make_mesh(8, model=mp)
    bsh = step_mod.base_shardings(cfg, mesh, params)
    bp = jax.device_put(params, bsh)
    if mp > 1:  # really split: the weights have one shard per model-axis device
        assert bp["layers"]["wq"].addressable_shards[0].data.size * mp \
            == bp["layers"]["wq"].size
    fwd = jax.jit(lambda p, t: bm.forward(p, m.base_cfg, t, np.arange(t.shape[1])[None])[0])
    logits = np.asarray(fwd(bp, tokens[:2, :256]))
    mm = models.Models(**{**m.__dict__, "cfg": cfg})
    rep = NamedSharding(mesh, P())
    # host copies: the step donates its state, which must not alias the fixture's arrays
    state = jax.device_put(jax.tree.map(np.asarray, step_mod.init_state(mm, g, l)), rep)
    step = step_mod.compile_train_step(mm, mesh, bsh)
    state, mets = step(state, bp, jax.device_put(tokens, NamedSharding(mesh, P("data"))))
    return logits, float(mets["loss"]), jax.device_get(state.gist)


def test_sharded_forward_and_train_step_equal_the_replicated(setup):
    tokens = np.asarray(next(loop.SyntheticBatches(CFG.replace(seed=3), 256, None))["tokens"])
    ref = _one_step(setup, 1, "tp", tokens)  # 8 x 1: the base replicated
    for mode in ("tp", "fsdp"):  # 4 x 2: the base split over pairs of devices
        got = _one_step(setup, 2, mode, tokens)
        np.testing.assert_allclose(got[0], ref[0], atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got[1], ref[1], rtol=1e-5)
        for a, b in zip(jax.tree.leaves(got[2]), jax.tree.leaves(ref[2])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


def test_oversized_config_is_refused_before_any_step(tmp_path, capsys):
    logs = []
    with pytest.raises(ConfigError, match=r"needs [0-9.]+ GiB per device.*memory_limit_gib"):
        loop.run(CFG.replace(memory_limit_gib=1e-4, steps=2, model_parallel=2), tmp_path / "w",
                 progress=False, log=logs.append)
    assert any("per device (XLA estimate" in s for s in logs)
    left = {p.name for p in (tmp_path / "w").iterdir()} - {".lock", "checkpoints"}
    assert not left, left  # no config.json, metrics or TensorBoard of a run that never ran
    ck = tmp_path / "w" / "checkpoints"
    assert not ck.exists() or not any(ck.iterdir())
    # the same config under a generous limit trains, in the same workdir (one compile: the limit
    # changes no program)
    s = loop.run(CFG.replace(memory_limit_gib=64.0, steps=2, model_parallel=2), tmp_path / "w",
                 progress=False, log=logs.append)
    assert s["steps"] == 2 and any("4 x 2 (data x model) mesh, base sharded tp" in x
                                   for x in logs)
