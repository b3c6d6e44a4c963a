"""The train step on the tiny config over 8 fake CPU devices: targets, gradients, sharding,
no recompilation, exact resume, a save killed half-way, and a loss that falls."""

import json
import shutil

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from experiments.gist_capacity import gist_objective as gco
from mc_jax.base import base_model as bm
from mc_jax.errors import ConfigError
from mc_jax.nets import io as nets_io
from mc_jax.training import checkpoints, loop, models, objective, step as train_step_mod
from mc_jax.training import windows as twc
from mc_jax.training.config import load_config
from mc_jax.training.forward import horizon_nll

CFG = load_config("tiny")
# the gist-capacity experiment's config: tiny plus its loss variants' fields (at their defaults)
XCFG = gco.from_train_config(CFG)


@pytest.fixture(scope="module")
def setup():
    base_cfg, base_params, _ = models.load_frozen_base(CFG)
    m, g, l = models.build_models(CFG, base_cfg, base_params)
    return m, g, l, base_params


def _batch(seed=0, n=8):
    it = loop.SyntheticBatches(CFG.replace(seed=seed, batch_size=n), 256, None)
    return np.asarray(next(it)["tokens"])


def test_horizon_targets_are_the_next_tokens_not_the_inputs(setup):
    """A base that copies its input (all layers zeroed) predicts token t from token t. With a
    history of token a and a horizon of token b, only the first horizon position (predicting b
    from a) can be wrong; a loss on the inputs themselves would be ~0 everywhere."""
    m, *_ = setup
    cfg = bm.LlamaConfig.tiny()
    p = bm.init_params(cfg, jax.random.PRNGKey(0))
    p["layers"] = jax.tree.map(jnp.zeros_like, p["layers"])
    p["layers"]["attn_norm"] = jnp.ones_like(p["layers"]["attn_norm"])
    p["layers"]["ffn_norm"] = jnp.ones_like(p["layers"]["ffn_norm"])
    pc, H = m.pack, m.pack.horizon
    a, b = 5, 9
    K = pc.block_size
    emb = bm.embed_tokens(p, jnp.full((pc.seq_len,), a)).reshape(pc.seq_blocks, K, -1)
    gists = tuple(jnp.zeros((max(pc.seq_blocks // K ** l, 1), cfg.d_model)) for l in range(2))
    hor = jnp.full((H,), b)
    x, pos, sig, valid = twc.pack(twc.recent_window(pc), emb, gists, bm.embed_tokens(p, hor), pc)
    nll = horizon_nll(p, m, x[None], pos[None], sig[None], valid[None], hor[None],
                            per_token=True)[0]
    assert float(nll[0]) > 3.0  # b predicted from a: wrong
    assert float(nll[1:].max()) < 0.5  # b predicted from b: right
    # and the packed forward equals a plain forward over the same tokens
    ids = jnp.concatenate([jnp.full((pc.budget,), a), hor])
    plain = bm.logits_fn(p, cfg, ids[None])[0, pc.budget - 1: pc.budget - 1 + H]
    np.testing.assert_allclose(nll, bm.token_nll(plain, hor), atol=1e-4)


def test_gradients_reach_every_gistnet_and_lensnet_parameter_and_never_the_base(setup):
    m, g, l, base = setup
    tokens = jnp.asarray(_batch(n=2))
    loss = lambda ps, bp: objective.batch_loss(ps, bp, tokens, jax.random.PRNGKey(0), m)[0]  # noqa
    grads, gb = jax.jit(jax.grad(loss, argnums=(0, 1)))({"gist": g, "lens": l}, base)
    for name in ("gist", "lens"):
        for path, v in jax.tree_util.tree_flatten_with_path(grads[name])[0]:
            assert float(jnp.max(jnp.abs(v))) > 0, f"no gradient reaches {name}{path}"
    assert all(float(jnp.max(jnp.abs(v))) == 0 for v in jax.tree.leaves(gb))


def test_substitution_wcs_train_gistnet_against_the_recent_window(setup):
    """n_subst > 0: the KL term is 0 when the gist reproduces the raw block exactly (here: a
    base that ignores its context), positive otherwise, and its gradient reaches GistNet."""
    *_, base = setup
    cfg = CFG.replace(phase="gist", n_wc=2, n_subst=3, subst_kl_weight=1.0)
    base_cfg = bm.LlamaConfig.tiny()
    m, g, l = models.build_models(cfg, base_cfg, base)
    tokens = jnp.asarray(_batch(n=2))
    # one compiled loss-and-gradient, the base an argument: reused for the context-blind base
    loss_and_grad = jax.jit(jax.value_and_grad(lambda g_, bp: objective.batch_loss(
        {"gist": g_, "lens": l}, bp, tokens, jax.random.PRNGKey(0), m), has_aux=True))
    (loss, met), grads = loss_and_grad(g, base)
    assert float(met["subst_kl"]) > 0 and np.isfinite(float(loss))
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(grads))
    # a context-blind base (attention outputs zeroed) cannot tell gist from block: KL = 0
    blind = dict(base, layers={**base["layers"], "wo": jnp.zeros_like(base["layers"]["wo"])})
    (_, met0), _ = loss_and_grad(g, blind)
    assert abs(float(met0["subst_kl"])) < 1e-5 and abs(float(met0["subst_gap"])) < 1e-5
    assert abs(float(met0["subst_minus_drop"])) < 1e-5


def test_content_term_compares_the_right_gist_with_another_blocks_gist(setup):
    """content_weight > 0 adds the substitution windows again with another block's gist in the
    slot; the other rows' figures are unchanged, a context-blind base cannot tell the two apart
    (hinge = margin), and the term has a gradient into GistNet."""
    *_, base = setup
    cfg = CFG.replace(phase="gist", n_wc=2, n_subst=3)
    base_cfg = bm.LlamaConfig.tiny()
    tokens = jnp.asarray(_batch(n=2))
    key = jax.random.PRNGKey(0)

    m_plain, g, l = models.build_models(cfg, base_cfg, base)
    m_content, g_c, l_c = models.build_models(
        cfg.replace(content_weight=1.0, content_margin=0.05), base_cfg, base)
    for a, b in zip(jax.tree.leaves((g, l)), jax.tree.leaves((g_c, l_c))):  # the same networks
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # one compile: the content loss's value and gradient, with the plain run's metrics alongside
    # (the base an argument, so the context-blind base reuses it)
    def content_loss(g_, bp):
        _, plain_met = objective.batch_loss({"gist": g_, "lens": l}, bp, tokens, key, m_plain)
        loss, met = objective.batch_loss({"gist": g_, "lens": l}, bp, tokens, key, m_content)
        return loss, (met, plain_met)

    run = jax.jit(jax.value_and_grad(content_loss, has_aux=True))
    (_, (met, plain)), grads = run(g, base)
    for k in ("nll_subst", "subst_minus_drop", "subst_kl", "nll_recent"):
        np.testing.assert_allclose(float(met[k]), float(plain[k]), rtol=1e-5, atol=1e-6)
    assert abs(float(met["subst_minus_wrong"])) > 1e-6
    assert all(np.isfinite(np.asarray(v)).all() for v in jax.tree.leaves(grads))
    blind = dict(base, layers={**base["layers"], "wo": jnp.zeros_like(base["layers"]["wo"])})
    (_, (met0, _)), _ = run(g, blind)
    assert abs(float(met0["subst_minus_wrong"])) < 1e-5
    np.testing.assert_allclose(float(met0["content"]), 0.05, atol=1e-5)
    with pytest.raises(Exception, match="n_subst"):
        CFG.replace(content_weight=1.0)


def test_same_batch_same_loss_on_one_device_and_on_an_8_device_mesh(setup):
    m, g, l, base = setup
    assert len(jax.devices()) == 8
    tokens = _batch(seed=3)
    params = {"gist": g, "lens": l}
    losses = []
    for n in (1, 8):
        mesh = train_step_mod.make_mesh(n)
        rep, data = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
        f = jax.jit(lambda ps, bp, t: objective.batch_loss(ps, bp, t, jax.random.PRNGKey(1), m)[0],
                    in_shardings=(rep, rep, data), out_shardings=rep)
        losses.append(float(f(jax.device_put(params, rep), jax.device_put(base, rep),
                              jax.device_put(tokens, data))))
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)


def _final_params(workdir):
    mgr = checkpoints.manager(workdir, CFG)
    r = mgr.restore(mgr.latest_step())
    return r


def _restore_state(workdir, setup):
    m, g, l, _ = setup
    template = train_step_mod.init_state(m, g, l)
    state, data, meta = checkpoints.restore_checkpoint(checkpoints.manager(workdir, CFG), template)
    return state, data, meta


def test_train_cli_runs_resumes_exactly_survives_a_killed_save_and_lowers_the_loss(
        tmp_path, setup, capsys, monkeypatch):
    """One compiled step serves all of these (the step cache), so they share one test."""
    from mc_jax.cli.commands import main

    # the step traces once in this whole test: a retrace across steps, or a resume that
    # recompiles the step, raises (chex counts the traces of the step's body)
    monkeypatch.setattr(train_step_mod, "train_step",
                        chex.assert_max_traces(train_step_mod.train_step, n=1))
    # 1. an uninterrupted run of 12 steps through the CLI, on the 8-device mesh
    full = tmp_path / "full"
    assert main(["train", "--config", "tiny", "--workdir", str(full), "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 12 and summary["checkpoint"].endswith("checkpoints")
    rows = [json.loads(x) for x in (full / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert list((full / "tb").iterdir()), "no TensorBoard events written"

    # 2. the loss falls (mean of the last 3 steps vs the first 3)
    first = np.mean([r["loss"] for r in rows[:3]])
    last = np.mean([r["loss"] for r in rows[-3:]])
    assert last < first, (first, last)

    # 3. interrupted after step 8, a save of step 10 killed half-way, resumed to 12:
    # bit-identical. The interrupted run is the full run's workdir as a kill after its step-8
    # save leaves it (steps 1-8 need not be trained twice): checkpoints up to 8, metrics rows
    # logged past it
    part = tmp_path / "part"
    shutil.copytree(full, part)
    ckpts = part / "checkpoints"
    assert sorted(int(d.name) for d in ckpts.iterdir() if d.name.isdigit()) == [8, 10, 12]
    for step in (10, 12):
        shutil.rmtree(ckpts / str(step))
    # what a kill during Orbax's save leaves: an unfinalised temporary step folder
    tmp_step = ckpts / "10.orbax-checkpoint-tmp-1234567890"
    shutil.copytree(ckpts / "8", tmp_step)
    for f in sorted(tmp_step.rglob("*")):
        if f.is_file() and f.stat().st_size > 64:
            f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
            break
    res = loop.run(CFG, part, steps=12, resume=True, progress=False)  # no retrace (chex)
    assert res["steps"] == 12
    # each step logged once, the resumed steps with the uninterrupted run's losses
    part_rows = [json.loads(x) for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in part_rows] == list(range(1, 13))
    assert [r["loss"] for r in part_rows] == [r["loss"] for r in rows]
    a, da, _ = _restore_state(full, setup)
    b, db, _ = _restore_state(part, setup)
    assert da == db
    for x, y in zip(jax.tree.leaves((a.gist, a.lens, a.opt)), jax.tree.leaves((b.gist, b.lens,
                                                                                b.opt))):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))

    # 4. a workdir with checkpoints is not silently overwritten
    assert main(["train", "--config", "tiny", "--workdir", str(full), "--no-progress"]) == 1
    assert "--resume" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_steps(tmp_path_factory):
    """A 2-step run of the tiny config (checkpoint 2) for the tests below to copy."""
    w = tmp_path_factory.mktemp("two_steps") / "run"
    loop.run(CFG, w, steps=2, progress=False)
    return w


def _copy_run(src, dst):
    shutil.copytree(src, dst, dirs_exist_ok=True)
    (dst / ".lock").unlink(missing_ok=True)
    return dst


def test_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, setup, monkeypatch,
                                                                   two_steps):
    _copy_run(two_steps, tmp_path)  # a run of 2 steps
    real = models.load_frozen_base

    def poisoned(cfg):  # same shapes: the cached compiled step is reused
        bcfg, params, tok = real(cfg)
        layers = dict(params["layers"], wq=params["layers"]["wq"].at[0, 0, 0].set(jnp.nan))
        params = dict(params, layers=layers)
        return bcfg, params, tok

    monkeypatch.setattr(loop, "load_frozen_base", poisoned)
    with pytest.raises(loop.TrainingDivergedError, match="NaN/inf at step 3"):
        loop.run(CFG, tmp_path, steps=4, resume=True, progress=False)
    assert checkpoints.manager(tmp_path, CFG).latest_step() == 2


def test_networks_export_round_trip(tmp_path, setup):
    m, g, l, _ = setup
    state = train_step_mod.init_state(m, g, l)
    checkpoints.export_networks(tmp_path / "nets", m, state, {"steps": 0}, dtype="float32")
    gist, lens, info = nets_io.load_networks(tmp_path / "nets")
    assert info["steps"] == 0 and info["train_config"]["name"] == "tiny"
    for a, b in zip(jax.tree.leaves(nnx.state(gist, nnx.Param)), jax.tree.leaves(g)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_init_from_warm_starts_both_networks_and_rejects_a_checkpoint_of_other_sizes(tmp_path,
                                                                                      setup):
    """`init_from`: a run starts from an exported pair's parameters (a fresh optimiser); an
    export of other sizes or a directory without one is refused with the reason."""
    m, g, l, _ = setup
    before = [np.asarray(v).copy() for v in jax.tree.leaves((g, l))]
    bumped = jax.tree.map(lambda v: v + 0.25, (g, l))
    checkpoints.export_networks(tmp_path / "src", m, train_step_mod.init_state(m, *bumped), {"steps": 7},
                          dtype="float32")
    cfg = CFG.replace(init_from=str(tmp_path / "src"))
    loop.run(cfg, tmp_path / "run", steps=0, progress=False, export=tmp_path / "out")
    gist, lens, info = nets_io.load_networks(tmp_path / "out")
    assert info["train_config"]["init_from"] == str(tmp_path / "src")
    for mod, want in ((gist, bumped[0]), (lens, bumped[1])):
        got = jax.tree.leaves(nnx.state(mod, nnx.Param))
        assert len(got) == len(jax.tree.leaves(want))
        for a, b in zip(got, jax.tree.leaves(want)):  # the run exports in bf16
            np.testing.assert_array_equal(np.asarray(a),
                                          np.asarray(b).astype(jnp.bfloat16).astype(np.float32))
    g1, l1 = checkpoints.warm_start(m, g, l, tmp_path / "src")
    for a, b in zip(jax.tree.leaves((g1, l1)), jax.tree.leaves(bumped)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    for a, b in zip(jax.tree.leaves((g, l)), before):  # the caller's states are not touched
        np.testing.assert_array_equal(np.asarray(a), b)
    base_cfg, base_params, _ = models.load_frozen_base(CFG)
    m2, g2, l2 = models.build_models(CFG.replace(gist_width=32), base_cfg, base_params)
    with pytest.raises(ConfigError, match="does not fit this config: parameter gist/"):
        checkpoints.warm_start(m2, g2, l2, tmp_path / "src")
    with pytest.raises(ConfigError, match="no networks.safetensors"):
        checkpoints.warm_start(m, g, l, tmp_path / "run")


def test_gist_info_nce_matches_a_reference_and_rewards_gists_that_tell_blocks_apart(setup):
    """gist_info_nce against a plain numpy InfoNCE; log N for a constant gist; near 0 and top-1
    = 1 for gists that are their blocks' (centred) mean embeddings; in the loss with its weight."""
    rng = np.random.default_rng(0)
    N, D, t = 12, 16, 0.1
    g, e = rng.normal(size=(N, D)), rng.normal(size=(N, D))

    def ref(g, e):
        u = lambda v: (v - v.mean(0)) / (np.linalg.norm(v - v.mean(0), axis=1, keepdims=True)  # noqa
                                         + 1e-6)
        lg = u(g) @ u(e).T / t
        lse = np.log(np.exp(lg - lg.max(1, keepdims=True)).sum(1)) + lg.max(1)
        return (lse - np.diag(lg)).mean(), (lg.argmax(1) == np.arange(N)).mean()

    for a, b in ((g, e), (e + 0.1 * g, e)):
        got = gco.gist_info_nce(jnp.asarray(a, jnp.float32), jnp.asarray(b, jnp.float32), t)
        np.testing.assert_allclose([float(x) for x in got], ref(a, b), rtol=1e-4, atol=1e-5)
    const, _ = gco.gist_info_nce(jnp.ones((N, D)), jnp.asarray(e, jnp.float32), t)
    np.testing.assert_allclose(float(const), np.log(N), rtol=1e-5)
    own, top1 = gco.gist_info_nce(jnp.asarray(e, jnp.float32), jnp.asarray(e, jnp.float32), t)
    assert float(top1) == 1.0 and float(own) < 0.1
    *_, base = setup
    cfg = XCFG.replace(phase="gist")
    m, g0, l0 = models.build_models(cfg, bm.LlamaConfig.tiny(), base)
    tokens = jnp.asarray(_batch(n=2))
    f = lambda c, g_: objective.batch_loss({"gist": g_, "lens": l0}, base, tokens,  # noqa: E731
                                           jax.random.PRNGKey(0), models.Models(**{**m.__dict__,
                                                                                  "cfg": c}))
    c1 = cfg.replace(gist_info_weight=0.5)

    def weighted_minus_plain(g_):  # both losses and the gradient of their difference: one compile
        (loss0, met0), (loss1, met1) = f(cfg, g_), f(c1, g_)
        return loss1 - loss0, (loss0, met0, loss1, met1)

    (_, (loss0, met0, loss1, met1)), grads = jax.jit(
        jax.value_and_grad(weighted_minus_plain, has_aux=True))(g0)
    np.testing.assert_allclose(float(loss1 - loss0), 0.5 * float(met0["gist_info"]), rtol=1e-4)
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(grads))


def test_resume_accepts_a_run_saved_before_a_config_field_existed(tmp_path, setup, two_steps):
    """A field added to TrainConfig later (or by an experiment's config subclass) counts as its
    default in an older run's config.json; a real difference is still refused."""
    _copy_run(two_steps, tmp_path)  # a run of 2 steps
    saved = json.loads((tmp_path / "config.json").read_text())
    del saved["subst_recent"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert loop.run(CFG, tmp_path, steps=2, resume=True, progress=False)["steps"] == 2
    # the run's config.json has none of the experiment config's fields
    assert "gist_info_weight" not in json.loads((tmp_path / "config.json").read_text())
    assert loop.run(XCFG, tmp_path, steps=2, resume=True, progress=False)["steps"] == 2
    with pytest.raises(ConfigError, match="differs in: gist_info_weight"):
        loop.run(XCFG.replace(gist_info_weight=0.5), tmp_path, steps=2, resume=True,
                 progress=False)


def test_gist_recon_reads_each_block_back_after_its_gist(setup):
    """gist_recon_nll on a constructed example: with attention switched off (wo = 0) each logit
    depends on its own input only, so the gist slot alone must predict the block's first token and
    token j-1 alone token j; without the gist the prefix's last token predicts the first one.
    In the train step the term enters with its weight, leaves every other draw and figure
    unchanged, and has a gradient into GistNet; bad settings are refused by name."""
    *_, base = setup
    base_cfg = bm.LlamaConfig.tiny()
    blind = dict(base, layers={**base["layers"], "wo": jnp.zeros_like(base["layers"]["wo"])})
    rng = np.random.default_rng(1)
    B, P_, K = 3, 4, CFG.block_size
    ids = jnp.asarray(rng.integers(0, base_cfg.vocab_size, (B, P_ + K)), jnp.int32)
    emb = bm.embed_tokens(blind, ids).astype(jnp.float32)
    gists = jnp.asarray(rng.normal(size=(B, base_cfg.d_model)), jnp.float32)
    targets = ids[:, P_:]
    got = gco.gist_recon_nll(blind, base_cfg, gists, emb[:, :P_], emb[:, P_:], targets)
    got_none = gco.gist_recon_nll(blind, base_cfg, gists, emb[:, :P_], emb[:, P_:], targets,
                                  with_gist=False)

    @jax.jit  # one compile for every call (the same shapes)
    def alone_(x_D, target):
        lg, _ = bm.forward(blind, base_cfg, x_D[None, None], jnp.zeros((1, 1), jnp.int32))
        return bm.token_nll(lg, jnp.reshape(target, (1, 1)))[0, 0]

    def alone(x_D, target):  # NLL of `target` from one input at position 0 (wo = 0: no context)
        return float(alone_(x_D, jnp.int32(target)))

    for b in range(B):
        want = [alone(gists[b], int(targets[b, 0]))] + [
            alone(emb[b, P_ + j - 1], int(targets[b, j])) for j in range(1, K)]
        np.testing.assert_allclose(np.asarray(got[b]), want, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(float(got_none[b, 0]), alone(emb[b, P_ - 1],
                                                                int(targets[b, 0])), rtol=1e-4)
        np.testing.assert_allclose(np.asarray(got_none[b, 1:]), want[1:], rtol=1e-4, atol=1e-4)

    cfg = XCFG.replace(phase="gist")
    m, g0, l0 = models.build_models(cfg, base_cfg, base)
    tokens = jnp.asarray(_batch(n=2))
    f = lambda c, g_: objective.batch_loss({"gist": g_, "lens": l0}, base, tokens,  # noqa: E731
                                           jax.random.PRNGKey(0), models.Models(**{**m.__dict__,
                                                                                  "cfg": c}))
    c1 = cfg.replace(recon_weight=0.5, recon_blocks=4, recon_prefix=8)
    c2 = c1.replace(recon_content_weight=1.0, recon_margin=10.0)  # hinge always active

    def recon_minus_plain(g_):  # the three losses and the gradient of c1's term: one compile
        (loss0, met0), (loss1, met1) = f(cfg, g_), f(c1, g_)
        return loss1 - loss0, (loss0, met0, loss1, met1, f(c2, g_))

    (_, (loss0, met0, loss1, met1, (loss2, met2))), grads = jax.jit(
        jax.value_and_grad(recon_minus_plain, has_aux=True))(g0)
    np.testing.assert_allclose(float(loss1 - loss0), 0.5 * float(met1["recon"]), rtol=1e-4)
    for k in met0:
        np.testing.assert_allclose(float(met1[k]), float(met0[k]), rtol=1e-5, atol=1e-6,
                                   err_msg=k) if k not in ("loss", "gist_loss") else None
    assert np.isfinite(float(met1["recon"])) and float(met1["recon"]) > 0
    assert abs(float(met1["recon_minus_wrong"])) > 0  # another block's gist is another input
    assert any(float(jnp.max(jnp.abs(v))) > 0 for v in jax.tree.leaves(grads))
    np.testing.assert_allclose(float(loss2 - loss1),
                               0.5 * (10.0 + float(met1["recon_minus_wrong"])), rtol=1e-3)
    for bad, name in ((dict(recon_blocks=1), "recon_blocks"), (dict(recon_prefix=0), "recon_prefix"),
                      (dict(recon_blocks=CFG.seq_len // CFG.block_size), "recon_blocks")):
        with pytest.raises(Exception, match=name):
            XCFG.replace(recon_weight=1.0, **bad)
    with pytest.raises(Exception, match="recon_weight"):
        XCFG.replace(recon_content_weight=1.0)
