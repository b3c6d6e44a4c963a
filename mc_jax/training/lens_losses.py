"""LensNet's training signal (SPEC §3): measured single-edit utilities and the losses on them.

For each mixture WC a few random legal single edits are evaluated with the frozen base
(`measure_edits`); d = NLL increase from losing the detail at that entry (expansion:
NLL(wc) - NLL(expanded); collapse: NLL(collapsed) - NLL(wc)) and the regression target is
tanh(d / scale - lambda) (`utility_targets`; lambda: the regularised-argmin penalty per edit).
`lens_loss_measured` adds pairwise softplus ranking, a push towards the sign of the slate's
argmin (best WC penalised by its edit distance) when an edit wins, a zero-sum budget term, a
penalty on illegal directions (u > 0 on LOD0 blocks, u < 0 on protected blocks and top-level
gists) and the delta-NLL head's Huber loss. Used online by the train step (`lens_loss`) and
offline on cached labels by `training.lens_fit`.

Letters: M WCs, E edits per WC, N blocks, K block size, D d_model, H horizon.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mc_jax.core import lens_features as lf
from mc_jax.training import windows as twc
from mc_jax.training.config import TrainConfig
from mc_jax.training.forward import horizon_nll
from mc_jax.training.models import Models


def _pearson(a, b, mask):
    """Pearson correlation of two masked vectors (a cheap in-step telemetry figure)."""
    w = mask.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    am, bm_ = (a * w).sum() / n, (b * w).sum() / n
    cov = ((a - am) * (b - bm_) * w).sum()
    return cov / jnp.sqrt(((a - am) ** 2 * w).sum() * ((b - bm_) ** 2 * w).sum() + 1e-12)


def lens_scores(lens_state, levels_MxN, gists, m: Models):
    """LensNet output for a batch of WCs given as level assignments (training layout), and its
    inputs (`core.lens_features.LensInputs` [M, N, ...], the builder the runtime uses too)."""
    lens = nnx.merge(m.lens_graph, lens_state)
    pc = m.pack
    f = jax.vmap(lambda lv: lf.from_levels(lv, gists, block_size=pc.block_size, depth=pc.depth,
                                           n_tail=lens.config.n_tail))(levels_MxN)
    return lf.score(lens, f), f


def edit_scores(u_MxN, mask_MxN, levels_MxN, blocks_MxE, kinds_MxE, pc: twc.PackConfig):
    """The score an allocator would read for each edit: u of the entry (mean over the sibling
    group for a group collapse)."""
    b = jnp.arange(pc.seq_blocks)
    lv = jnp.take_along_axis(levels_MxN, blocks_MxE, axis=1)
    span_c = jnp.asarray([1] + [pc.top_group_blocks(l + 1) for l in range(1, pc.depth + 1)])[
        jnp.clip(lv, 0, pc.depth)]
    width = jnp.where(kinds_MxE == twc.COLLAPSE, span_c, 1)
    R = ((b[None, None] >= blocks_MxE[..., None]) & (b[None, None] < (blocks_MxE + width)[..., None])
         & mask_MxN[:, None, :])
    return (u_MxN[:, None, :] * R).sum(-1) / jnp.maximum(R.sum(-1), 1)


def measure_edits(base_params, levels_MxN, gists, emb_NxKxD, hor_emb, targets, key, m: Models,
                  adapter=None):
    """Sample single edits per WC and measure their horizon NLL (no gradient; `adapter`: the
    gist reader, if any)."""
    pc, E = m.pack, m.cfg.n_edits
    M, N = levels_MxN.shape
    blocks, kinds, evalid = jax.vmap(lambda k, lv: twc.sample_edits(k, lv, E, pc))(
        jax.random.split(key, M), levels_MxN)
    edited = jax.vmap(lambda lv, bs, ks: jax.vmap(
        lambda b_, k_: twc.apply_edit(lv, b_, k_, pc))(bs, ks))(levels_MxN, blocks, kinds)
    x, pos, sig, valid, mask = twc.pack_many(edited.reshape(M * E, N), emb_NxKxD, gists, hor_emb,
                                             pc)
    nll_e = horizon_nll(base_params, m, x, pos, sig, valid,
                        jnp.broadcast_to(targets, (M * E, pc.horizon)), adapter=adapter,
                        adapt_BxP=mask).reshape(M, E)
    return blocks, kinds, evalid, jax.lax.stop_gradient(nll_e)


def utility_targets(nll_M, nll_MxE, kinds_MxE, cfg: TrainConfig):
    """d: NLL increase from losing detail at the edited entry; t = tanh(d / scale - lambda)."""
    d = jnp.where(kinds_MxE == twc.EXPAND, nll_M[:, None] - nll_MxE, nll_MxE - nll_M[:, None])
    t = jnp.tanh(d / cfg.utility_scale - cfg.edit_lambda)
    return d, t


def lens_loss(lens_state, base_params, levels_MxN, nll_M, gists, emb, hor_emb, targets, key,
              m: Models, adapter=None):
    """LensNet loss and metrics of M mixture WCs, their single edits measured here (online)."""
    nll_M = jax.lax.stop_gradient(nll_M)
    blocks, kinds, evalid, nll_e = measure_edits(base_params, levels_MxN, gists, emb, hor_emb,
                                                 targets, key, m, adapter)
    return lens_loss_measured(lens_state, levels_MxN, nll_M, nll_e, blocks, kinds, evalid, gists,
                              m)


def lens_loss_measured(lens_state, levels_MxN, nll_M, nll_e, blocks, kinds, evalid, gists,
                       m: Models):
    """LensNet loss and metrics from already measured single-edit NLLs nll_e [M, E] (online:
    `lens_loss`; offline, from a cached label set: `mc_jax.training.lens_fit`)."""
    cfg, pc = m.cfg, m.pack
    d, t = utility_targets(nll_M, nll_e, kinds, cfg)
    out, f = lens_scores(lens_state, levels_MxN, gists, m)
    u_e = edit_scores(out.u, f.mask_xE, levels_MxN, blocks, kinds, pc)
    w = evalid.astype(jnp.float32)
    nv = jnp.maximum(w.sum(), 1.0)
    reg = ((u_e - t) ** 2 * w).sum() / nv
    # pairwise ranking inside each WC: entries whose detail matters more score higher
    dd = d[:, :, None] - d[:, None, :]
    pair = (w[:, :, None] * w[:, None, :]) * (dd > 0.25 * cfg.utility_scale)
    du = u_e[:, :, None] - u_e[:, None, :]
    rank = (jax.nn.softplus(-4.0 * du) * pair).sum() / jnp.maximum(pair.sum(), 1.0)
    # regularised argmin over the slate {current WC, single edits}
    slate = jnp.concatenate([nll_M[:, None], jnp.where(
        evalid, nll_e + cfg.edit_lambda * cfg.utility_scale, jnp.inf)], axis=1)
    best = jnp.argmin(slate, axis=1)
    win = best > 0
    e_star = jnp.maximum(best - 1, 0)
    u_star = jnp.take_along_axis(u_e, e_star[:, None], 1)[:, 0]
    sgn = jnp.where(jnp.take_along_axis(kinds, e_star[:, None], 1)[:, 0] == twc.EXPAND, 1.0, -1.0)
    argmin = (jax.nn.softplus(-4.0 * sgn * u_star) * win).sum() / jnp.maximum(win.sum(), 1.0)
    # zero-sum budget regulariser and illegal directions
    emask = f.mask_xE.astype(jnp.float32)
    budget = (((out.u * emask).sum(-1) / jnp.maximum(emask.sum(-1), 1.0)) ** 2).mean()
    b = jnp.arange(pc.seq_blocks)
    protected = b >= pc.seq_blocks - pc.protect_blocks
    lod0 = f.level_xE == 0
    top = f.level_xE == pc.depth
    illegal = ((jax.nn.relu(out.u) * lod0 + jax.nn.relu(-out.u) * (protected[None] | top))
               * emask).sum() / jnp.maximum(emask.sum(), 1.0)
    delta_pred = jnp.take_along_axis(out.delta_nll, blocks, axis=1)
    delta = (optax.huber_loss(delta_pred, d / cfg.utility_scale) * w).sum() / nv
    loss = (reg + cfg.rank_weight * rank + argmin + cfg.budget_weight * budget
            + cfg.illegal_weight * illegal + cfg.delta_head_weight * delta)
    metrics = {"lens_loss": loss, "lens_reg": reg, "lens_rank": rank, "lens_argmin": argmin,
               "lens_budget": budget, "lens_illegal": illegal, "lens_delta": delta,
               "lens_corr": _pearson(u_e, d, evalid), "edit_d_mean": (d * w).sum() / nv,
               "edits_valid": w.mean()}
    return loss, metrics
