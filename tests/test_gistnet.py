"""GistNet and the mean-pool baseline: shapes, scale, position awareness, weights, jit, bf16."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mc_jax.errors import ConfigError
from mc_jax.nets.gistnet import (GistNet, GistNetConfig, MeanPoolGist, as_gist_fn, build_gist_model,
                            gist_fn_from_state)
from mc_jax.nets.nn import count_params, rms_normalise
from nnx_helpers import assert_every_param_has_gradient, rngs, run_unoptimised

D = 48
EMBED_RMS = 0.37


def _cfg(**kw):
    return GistNetConfig.tiny(d_model=D, embed_rms=EMBED_RMS, **kw)


def _children(seed=0, shape=(5, 32, D)):
    return jax.random.normal(jax.random.key(seed), shape) * 2.0 + 0.3


def _rms(x):
    return np.sqrt(np.mean(np.square(np.asarray(x, np.float64)), -1))


# Jitted apply: eager NNX calls compile every op separately, which is slower on CPU than one jit.
apply = jax.jit(lambda model, level, x: model(level, x), static_argnums=1)


@pytest.fixture(scope="module")
def net():
    return GistNet(_cfg(), rngs=rngs(0))


@pytest.fixture(scope="module")
def base():
    return MeanPoolGist(_cfg(kind="mean_pool"), rngs=rngs(0))


def test_shapes_dtypes_and_scale(net, base):
    x = _children()
    for model in (net, base):
        for level in (1, 2):
            g = apply(model, level, x)
            assert g.shape == (5, D) and g.dtype == jnp.float32
            np.testing.assert_allclose(_rms(g), EMBED_RMS, rtol=1e-3)
    # arbitrary leading dims; the module itself crosses jit as a pytree (see `apply`)
    assert apply(base, 1, _children(shape=(2, 3, 32, D))).shape == (2, 3, D)
    assert as_gist_fn(base)(1, _children()).shape == (5, D)


def test_build_gist_model_picks_kind():
    for kind, cls in (("gistnet", GistNet), ("mean_pool", MeanPoolGist)):
        model = nnx.eval_shape(lambda: build_gist_model(_cfg(kind=kind), rngs=rngs(0)))
        assert type(model) is cls


def test_mean_pool_baseline_at_init_is_scaled_mean(base):
    x = _children()
    want = rms_normalise(x.mean(axis=1)) * EMBED_RMS
    np.testing.assert_allclose(apply(base, 1, x), want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(apply(base, 2, x), want, rtol=1e-5, atol=1e-6)


def test_gistnet_is_position_aware_baseline_is_not(net, base):
    x = _children()
    perm = np.random.default_rng(0).permutation(32)
    g, g_perm = apply(net, 1, x), apply(net, 1, x[:, perm])
    assert np.max(np.abs(np.asarray(g - g_perm))) > 1e-3
    np.testing.assert_allclose(apply(base, 1, x), apply(base, 1, x[:, perm]), rtol=1e-5, atol=1e-6)


def test_blocks_are_independent(net):
    """Vectorised over N: changing block 0 leaves the other blocks' gists unchanged."""
    x = _children()
    g = apply(net, 1, x)
    g2 = apply(net, 1, x.at[0].set(-x[0]))
    assert np.max(np.abs(np.asarray(g[0] - g2[0]))) > 1e-3
    np.testing.assert_allclose(g[1:], g2[1:], rtol=1e-5, atol=1e-6)


def test_per_level_vs_shared_parameter_counts():
    depth = 3
    make = lambda **kw: nnx.eval_shape(lambda: build_gist_model(_cfg(depth=depth, **kw),
                                                                 rngs=rngs(0)))
    per_level, shared = make(), make(share_weights_across_levels=True)
    level_bias = depth * per_level.config.width
    assert count_params(per_level) == depth * (count_params(shared) - level_bias)
    base_per = make(kind="mean_pool")
    base_shared = make(kind="mean_pool", share_weights_across_levels=True)
    assert count_params(base_per) == depth * count_params(base_shared)


def test_per_level_weights_give_different_functions(net):
    x = _children()
    assert np.max(np.abs(np.asarray(apply(net, 1, x) - apply(net, 2, x)))) > 1e-3


@pytest.mark.parametrize("shared", [False, True])
def test_gradients_reach_every_parameter(shared, net):
    model = GistNet(_cfg(share_weights_across_levels=True), rngs=rngs(1)) if shared else net
    graphdef, params = nnx.split(model, nnx.Param)
    x = _children(shape=(3, 32, D))
    r = jax.random.normal(jax.random.key(7), (2, 3, D))

    def loss(params):
        fn = gist_fn_from_state(graphdef, params)
        # shared: level 2 alone reaches the shared core and (a row of) the level bias
        level1 = 0.0 if shared else jnp.sum(fn(1, x) * r[0])
        return level1 + jnp.sum(fn(2, x) * r[1])

    assert_every_param_has_gradient(run_unoptimised(jax.grad(loss), params))


def test_jit_split_merge_no_retrace(net):
    graphdef, state = nnx.split(net)
    traces = []

    @jax.jit
    def f(state, x):
        traces.append(1)
        return gist_fn_from_state(graphdef, state)(1, x)

    x = _children()
    np.testing.assert_allclose(f(state, x), apply(net, 1, x), rtol=1e-5, atol=1e-6)
    state2 = jax.tree.map(lambda a: a * 1.01, state)  # new parameter values, same shapes
    f(state2, _children(seed=3))
    f(state, _children(seed=4))
    assert len(traces) == 1


def test_bf16_compute_close_to_fp32(net):
    f32 = net
    b16 = GistNet(_cfg(dtype="bfloat16"), rngs=rngs(0))
    for a, b in zip(jax.tree.leaves(nnx.state(f32)), jax.tree.leaves(nnx.state(b16))):
        assert b.dtype == jnp.float32  # parameters stay fp32
        np.testing.assert_array_equal(a, b)
    x = _children()
    ga, gb = np.asarray(apply(f32, 1, x)), np.asarray(apply(b16, 1, x))
    assert gb.dtype == np.float32
    cos = np.sum(ga * gb, -1) / (np.linalg.norm(ga, axis=-1) * np.linalg.norm(gb, axis=-1))
    assert np.all(cos > 0.99), cos
    np.testing.assert_allclose(_rms(gb), EMBED_RMS, rtol=1e-2)


def test_bad_inputs_raise(net):
    x = _children()
    with pytest.raises(ValueError, match="depth"):
        net(3, x)
    with pytest.raises(ValueError, match="depth"):
        net(0, x)
    with pytest.raises(ValueError, match="block_size"):
        net(1, x[:, :16])
    with pytest.raises(TypeError, match="static"):
        jax.jit(lambda lvl: net(lvl, x))(1)
    with pytest.raises(ConfigError):
        _cfg(width=30, heads=4)
    with pytest.raises(ConfigError):
        _cfg(dtype="float16")
    with pytest.raises(ConfigError):
        GistNetConfig(d_model=D, embed_rms=0.0)


def test_blocks_sharded_over_devices(net):
    """Data-parallel use: N blocks split over all devices, parameters replicated."""
    mesh = Mesh(np.array(jax.devices()), ("data",))
    x = _children(shape=(2 * len(jax.devices()), 32, D))
    x_sharded = jax.device_put(x, NamedSharding(mesh, P("data")))
    g = apply(net, 1, x_sharded)
    assert len(jax.devices()) == 1 or g.sharding.spec[0] == "data"
    np.testing.assert_allclose(g[:5], apply(net, 1, x[:5]), rtol=1e-5, atol=1e-6)
