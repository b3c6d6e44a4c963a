"""LensNet: bounded scores, masking, linear cost in entries, incremental latents, jit, bf16."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mc_jax.errors import ConfigError
from mc_jax.nets.lensnet import LensNet, LensNetConfig, initial_latents, log_bucket
from nnx_helpers import assert_every_param_has_gradient, rngs, run_unoptimised

D = 48
E = 20
CFG = LensNetConfig.tiny(d_model=D, delta_nll_head=True, incremental=True)

apply = jax.jit(lambda model, inputs: model(**inputs))


def _inputs(seed=0, n_entries=E, batch=(), n_valid=None, scale=1.0):
    k = jax.random.split(jax.random.key(seed), 4)
    ints = jax.random.randint(k[0], (*batch, 4, n_entries), 0, 2000)
    n_valid = n_entries * 3 // 4 if n_valid is None else n_valid
    return dict(
        entries_xExD=jax.random.normal(k[1], (*batch, n_entries, D)) * scale,
        entry_mask_xE=jnp.broadcast_to(jnp.arange(n_entries) < n_valid, (*batch, n_entries)),
        level_xE=ints[..., 0, :] % (CFG.max_level + 1),
        span_xE=32 ** (ints[..., 0, :] % (CFG.max_level + 1)),
        distance_xE=ints[..., 1, :],
        since_edit_xE=ints[..., 2, :],
        tail_xUxD=jax.random.normal(k[2], (*batch, 6, D)) * scale,
        tail_mask_xU=jnp.broadcast_to(jnp.arange(6) < 4, (*batch, 6)),
        prev_latents_xMxC=0.1 * jax.random.normal(k[3], (*batch, CFG.n_latents, CFG.d_lens)),
    )


@pytest.fixture(scope="module")
def lens():
    return LensNet(CFG, rngs=rngs(0))


def test_shapes_dtypes_bounds_and_masked_zero(lens):
    inp = _inputs(scale=100.0)  # large inputs must still give u in [-1, 1]
    out = apply(lens, inp)
    assert out.u.shape == (E,) and out.u.dtype == jnp.float32
    assert out.delta_nll.shape == (E,) and out.delta_nll.dtype == jnp.float32
    assert out.latents.shape == (CFG.n_latents, CFG.d_lens)
    u = np.asarray(out.u)
    assert np.all(np.abs(u) <= 1.0) and np.all(np.isfinite(u))
    mask = np.asarray(inp["entry_mask_xE"])
    np.testing.assert_array_equal(u[~mask], 0.0)
    np.testing.assert_array_equal(np.asarray(out.delta_nll)[~mask], 0.0)
    assert np.std(u[mask]) > 0  # scores differ between entries


def test_without_delta_head_returns_none():
    cfg = LensNetConfig.tiny(d_model=D)
    model = nnx.eval_shape(lambda: LensNet(cfg, rngs=rngs(0)))
    inp = {**_inputs(), "prev_latents_xMxC": None}
    out = jax.eval_shape(lambda m: m(**inp), model)
    assert out.delta_nll is None and out.u.shape == (E,)


def test_masked_entries_do_not_affect_valid_scores(lens):
    inp = _inputs()
    mask = inp["entry_mask_xE"]
    other = _inputs(seed=5)
    changed = dict(inp)
    for name in ("entries_xExD", "level_xE", "span_xE", "distance_xE", "since_edit_xE"):
        m = mask.reshape(mask.shape + (1,) * (inp[name].ndim - 1))
        changed[name] = jnp.where(m, inp[name], other[name])
    tmask = inp["tail_mask_xU"]
    changed["tail_xUxD"] = jnp.where(tmask[:, None], inp["tail_xUxD"], 1e3)
    a, b = apply(lens, inp), apply(lens, changed)
    np.testing.assert_allclose(a.u, b.u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.delta_nll, b.delta_nll, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(a.latents, b.latents, rtol=1e-5, atol=1e-6)
    # and a valid entry does matter to the others (through the latents)
    c = apply(lens, {**inp, "entries_xExD": inp["entries_xExD"].at[0].multiply(-2.0)})
    assert np.max(np.abs(np.asarray(c.u[1:] - a.u[1:]))) > 1e-5


def test_all_masked_is_finite_and_zero(lens):
    inp = {**_inputs(), "entry_mask_xE": jnp.zeros(E, bool), "tail_mask_xU": jnp.zeros(6, bool)}
    out = apply(lens, inp)
    np.testing.assert_array_equal(out.u, 0.0)
    assert np.all(np.isfinite(np.asarray(out.latents)))


def test_leading_batch_dim_matches_single_calls(lens):
    inp = jax.tree.map(lambda *a: jnp.stack(a), _inputs(seed=1), _inputs())
    out = apply(lens, inp)
    assert out.u.shape == (2, E) and out.latents.shape == (2, CFG.n_latents, CFG.d_lens)
    one = apply(lens, _inputs())
    np.testing.assert_allclose(out.u[1], one.u, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(out.delta_nll[1], one.delta_nll, rtol=1e-5, atol=1e-6)


def test_cost_is_linear_in_entries(lens):
    """FLOPs grow ~linearly with E and no E x E intermediate exists."""
    def flops(n):
        inp = _inputs(n_entries=n)
        return jax.jit(lambda m, i: m(**i)).lower(lens, inp).cost_analysis()["flops"]

    f1, f4 = flops(512), flops(2048)
    assert 3.0 < f4 / f1 < 4.1, (f1, f4)  # an E^2 term would push this towards 16
    n = 1000  # no other dim equals n or n + n_tail
    jaxpr = str(jax.make_jaxpr(lambda m, i: m(**i))(lens, _inputs(n_entries=n)))
    for dims in re.findall(r"\[([\d,]+)\]", jaxpr):
        big = [d for d in dims.split(",") if d and int(d) in (n, n + CFG.n_tail)]
        assert len(big) <= 1, f"an entries x entries intermediate: [{dims}]"


def test_incremental_latents(lens):
    inp = _inputs()
    zero = apply(lens, {**inp, "prev_latents_xMxC": initial_latents(CFG)})
    none = apply(lens, {**inp, "prev_latents_xMxC": None})
    np.testing.assert_allclose(zero.u, none.u, rtol=1e-5, atol=1e-6)
    warm = apply(lens, {**inp, "prev_latents_xMxC": none.latents})
    assert np.max(np.abs(np.asarray(warm.u - none.u))) > 1e-5
    plain = nnx.eval_shape(lambda: LensNet(LensNetConfig.tiny(d_model=D), rngs=rngs(0)))
    with pytest.raises(ConfigError, match="incremental"):
        plain(**inp)


def test_gradients_reach_every_parameter(lens):
    graphdef, params = nnx.split(lens, nnx.Param)
    inp = _inputs()
    r = jax.random.normal(jax.random.key(3), (2, E))

    def loss(params):
        out = nnx.merge(graphdef, params)(**inp)
        return jnp.sum(out.u * r[0]) + jnp.sum(out.delta_nll * r[1])

    assert_every_param_has_gradient(run_unoptimised(jax.grad(loss), params))


def test_jit_split_merge_no_retrace(lens):
    graphdef, state = nnx.split(lens)
    traces = []

    @jax.jit
    def step(state, inputs):
        traces.append(1)
        return nnx.merge(graphdef, state)(**inputs).u

    np.testing.assert_allclose(step(state, _inputs()), apply(lens, _inputs()).u, rtol=1e-5,
                               atol=1e-6)
    step(jax.tree.map(lambda a: a * 0.9, state), _inputs(seed=1))
    step(state, _inputs(seed=2, n_valid=3))
    assert len(traces) == 1


def test_bf16_compute_close_to_fp32(lens):
    b16 = LensNet(LensNetConfig.tiny(d_model=D, delta_nll_head=True, incremental=True,
                                     dtype="bfloat16"), rngs=rngs(0))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(b16)))
    inp = _inputs()
    a, b = apply(lens, inp), apply(b16, inp)
    assert b.u.dtype == jnp.float32
    np.testing.assert_allclose(b.u, a.u, atol=5e-2)
    np.testing.assert_allclose(b.delta_nll, a.delta_nll, atol=1e-1)


def test_log_bucket_and_bad_inputs(lens):
    x = jnp.array([-3, 0, 1, 2, 3, 4, 7, 8, 32, 1024, 2**30])
    np.testing.assert_array_equal(log_bucket(x, 32), [0, 0, 1, 2, 2, 3, 3, 4, 6, 11, 31])
    np.testing.assert_array_equal(log_bucket(x, 8), [0, 0, 1, 2, 2, 3, 3, 4, 6, 7, 7])
    inp = _inputs()
    with pytest.raises(ValueError, match="level"):
        lens(**{**inp, "level_xE": inp["level_xE"][:-1]})
    with pytest.raises(ValueError, match="tail"):
        lens(**{**inp, "tail_xUxD": inp["tail_xUxD"][:5]})
    with pytest.raises(ValueError, match="d_model"):
        lens(**{**inp, "entries_xExD": inp["entries_xExD"][:, :8]})
    with pytest.raises(ConfigError):
        LensNetConfig.tiny(d_model=D, d_lens=30, heads=4)


def test_question_aware_inputs_match_features_and_query():
    """n_match / query: masked entries' features and masked query tokens change nothing; an
    entry's own match features and the query do change its score; gradients reach the new
    parameters; the wrong inputs for the config are refused by name."""
    R, Q = 5, 7
    cfg = LensNetConfig.tiny(d_model=D, n_match=R, query=True)
    model = LensNet(cfg, rngs=rngs(1))
    inp = {**_inputs(), "prev_latents_xMxC": None}
    k = jax.random.split(jax.random.key(9), 2)
    inp.update(match_xExR=jax.random.normal(k[0], (E, R)),
               query_xQxD=jax.random.normal(k[1], (Q, D)), query_mask_xQ=jnp.arange(Q) < 5)
    a = apply(model, inp)
    mask = inp["entry_mask_xE"]
    changed = {**inp, "match_xExR": jnp.where(mask[:, None], inp["match_xExR"], 1e3),
               "query_xQxD": inp["query_xQxD"].at[5:].set(1e3)}
    np.testing.assert_allclose(a.u, apply(model, changed).u, rtol=1e-5, atol=1e-6)
    b = apply(model, {**inp, "match_xExR": inp["match_xExR"].at[0].add(3.0)})
    assert abs(float(b.u[0] - a.u[0])) > 1e-4
    c = apply(model, {**inp, "query_xQxD": -inp["query_xQxD"]})
    assert np.max(np.abs(np.asarray(c.u - a.u))) > 1e-5

    graphdef, params = nnx.split(model, nnx.Param)
    r = jax.random.normal(jax.random.key(3), (E,))

    def loss(params):
        return jnp.sum(nnx.merge(graphdef, params)(**inp).u * r)
    assert_every_param_has_gradient(run_unoptimised(jax.grad(loss), params))  # match_in, query_emb

    with pytest.raises(ConfigError, match="n_match"):
        model(**{**inp, "match_xExR": None})
    with pytest.raises(ValueError, match="match_xExR must be"):
        model(**{**inp, "match_xExR": inp["match_xExR"][:, :2]})
    with pytest.raises(ConfigError, match="query"):
        model(**{**inp, "query_xQxD": None, "query_mask_xQ": None})
    plain = LensNet(LensNetConfig.tiny(d_model=D), rngs=rngs(0))
    with pytest.raises(ConfigError, match="n_match"):
        plain(**inp)
    with pytest.raises(ConfigError, match="n_match must be"):
        LensNetConfig.tiny(d_model=D, n_match=-1)
