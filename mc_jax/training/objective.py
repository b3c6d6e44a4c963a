"""The training objective (SPEC §3): the loss and metrics of one sequence, and of a batch.

Per sequence of C + H tokens:
1. GistNet builds the tree of the C history tokens (every level in one vectorised call).
2. N1 working contexts ending at the cursor: the all-LOD0 recent window, plus N1 - 1 random legal
   mixtures of LOD0 / LOD1 / LOD2 covering the whole history (`windows.sample_mixture`), plus
   optional substitution windows (the recent window with one block replaced by its gist, and the
   same with the block dropped) and their content control (another block's gist in the slot).
3. One packed forward of all of them, [WC || H horizon tokens] (`forward.horizon_nll`): loss =
   next-token NLL of the H horizon tokens only.
4. GistNet loss: mean horizon NLL of the gist-bearing WCs (gradient through the frozen base into
   the gists), + the neighbour cosine hinge, + the substitution terms, + any terms the config
   adds (`TrainConfig.gist_terms`, the experiments' hook), + optional KL to the full-context
   teacher (`gist_losses`).
5. LensNet loss from measured single-edit utilities (stop-gradient; `lens_losses`).

Letters: C history, H horizon, N blocks, K block size, D d_model, S substitution windows.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.nets.gistnet import as_gist_fn
from mc_jax.training import windows as twc
from mc_jax.training.forward import build_gists, horizon_nll
from mc_jax.training.gist_losses import content_hinge, kl_from_teacher, neighbour_cosine_hinge
from mc_jax.training.lens_losses import lens_loss
from mc_jax.training.models import Models


@dataclasses.dataclass(frozen=True)
class SequenceContext:
    """What an extra GistNet loss term (`TrainConfig.gist_terms`) sees of one sequence."""

    base_params: Any   # the frozen base (no gradient)
    m: Models
    key: jax.Array     # the sequence's key (a term draws from fold_in(key, its own constant))
    ids_C: jax.Array   # history token ids
    emb_NxKxD: jax.Array
    gists: tuple       # level 1..depth gists of the history (gradient flows into GistNet)
    adapter: Any       # the gist reader's adapter, or None


def sequence_loss(gist_state, lens_state, base_params, tokens_T, key, m: Models):
    """Loss and metrics for one sequence of C + H tokens."""
    cfg, pc = m.cfg, m.pack
    K, N, C, H, D = pc.block_size, pc.seq_blocks, pc.seq_len, pc.horizon, m.base_cfg.d_model
    ids, targets = tokens_T[:C], tokens_T[C:C + H]
    base_params = jax.lax.stop_gradient(base_params)
    emb_NxKxD = bm.embed_tokens(base_params, ids).reshape(N, K, D).astype(jnp.float32)
    hor_emb = bm.embed_tokens(base_params, targets).astype(jnp.float32)
    if cfg.phase == "lens":
        gist_state = jax.lax.stop_gradient(gist_state)
    gist_model = nnx.merge(m.gist_graph, gist_state)
    gists = build_gists(as_gist_fn(gist_model), emb_NxKxD, pc.depth, K)
    adapter = gist_model.reader_adapter()

    k_mix, k_edit, k_sub = jax.random.split(key, 3)
    mix_keys = jax.random.split(k_mix, cfg.n_wc - 1)
    rows = [twc.recent_window(pc)[None], jax.vmap(lambda k: twc.sample_mixture(k, pc))(mix_keys)]
    if cfg.n_subst:
        subst = jax.vmap(lambda k: twc.substitution_window(k, pc, cfg.subst_recent))(
            jax.random.split(k_sub, cfg.n_subst))
        # the same windows with the block dropped instead (level -1: absent): the paired
        # reference a gist has to beat (telemetry; no gradient reaches it)
        rows += [subst, jnp.where(subst == 1, twc.NOT_COVERED, subst)]
    levels = jnp.concatenate(rows)
    S = cfg.n_subst
    wrong_rows = S if cfg.content_weight > 0 else 0
    n_rows = cfg.n_wc + 2 * S + wrong_rows
    x, pos, sig, valid, mask = twc.pack_many(levels, emb_NxKxD, gists, hor_emb, pc)
    if wrong_rows:
        # content control: the substitution windows again, with the gist of a block N/2 away in
        # the slot. Horizon NLL with the right gist must beat it: a placeholder that helps
        # whatever it encodes gains nothing here.
        wrong = (jnp.roll(gists[0], N // 2, axis=0),) + tuple(gists[1:])
        packed = twc.pack_many(subst, emb_NxKxD, wrong, hor_emb, pc)
        x, pos, sig, valid, mask = (jnp.concatenate([a, b]) for a, b in
                                    zip((x, pos, sig, valid, mask), packed))
    tgt = jnp.broadcast_to(targets, (n_rows, H))
    rd = dict(adapter=adapter, adapt_BxP=mask)
    if cfg.kl_weight > 0 or cfg.n_subst:
        nll_wc, logits = horizon_nll(base_params, m, x, pos, sig, valid, tgt, return_logits=True,
                                     **rd)
    else:
        nll_wc = horizon_nll(base_params, m, x, pos, sig, valid, tgt, **rd)
    nll_recent, nll_mix = nll_wc[0], nll_wc[1:cfg.n_wc]
    nll_sub, nll_drop = nll_wc[cfg.n_wc:cfg.n_wc + S], nll_wc[cfg.n_wc + S:cfg.n_wc + 2 * S]

    contrastive = neighbour_cosine_hinge(gists[0][:N], cfg.contrastive_margin)
    metrics = {"nll_recent": nll_recent, "nll_mix": nll_mix.mean(),
               "nll_gap": nll_mix.mean() - nll_recent, "contrastive": contrastive,
               "wc_cost": jax.vmap(lambda lv: twc.wc_cost(lv, pc))(levels[1:cfg.n_wc]).mean()
               .astype(jnp.float32)}
    loss = jnp.float32(0.0)
    if cfg.n_subst:
        # teacher: the recent window's own distribution (same forward batch)
        subst_kl = kl_from_teacher(logits[0], logits[cfg.n_wc:cfg.n_wc + S])
        drop_kl = kl_from_teacher(logits[0], jax.lax.stop_gradient(
            logits[cfg.n_wc + S:cfg.n_wc + 2 * S]))
        metrics.update(nll_subst=nll_sub.mean(), subst_gap=nll_sub.mean() - nll_recent,
                       subst_kl=subst_kl, subst_minus_drop=nll_sub.mean() - nll_drop.mean(),
                       subst_kl_minus_drop=subst_kl - drop_kl)
    if cfg.phase in ("gist", "joint"):
        gist_loss = nll_mix.mean() + cfg.contrastive_weight * contrastive
        if cfg.n_subst:
            gist_loss = gist_loss + nll_sub.mean() + cfg.subst_kl_weight * subst_kl
        if wrong_rows:
            nll_wrong = nll_wc[cfg.n_wc + 2 * S:]
            content = content_hinge(nll_wrong, nll_sub, cfg.content_margin)
            gist_loss = gist_loss + cfg.content_weight * content
            metrics.update(content=content, subst_minus_wrong=nll_sub.mean() - nll_wrong.mean())
        ctx = SequenceContext(base_params=base_params, m=m, key=key, ids_C=ids,
                              emb_NxKxD=emb_NxKxD, gists=gists, adapter=adapter)
        for term in cfg.gist_terms():
            extra, term_metrics = term(ctx)
            if extra is not None:
                gist_loss = gist_loss + extra
            metrics.update(term_metrics)
        if cfg.kl_weight > 0:
            # the teacher reads as much history as the base's context holds (all of it when
            # C + H fits; else the newest max_seq_len - H tokens)
            full = jnp.concatenate([ids, targets])[-m.base_cfg.max_seq_len:][None]
            L = full.shape[1]
            tlogits, _ = bm.forward(base_params, m.base_cfg, full, jnp.arange(L)[None],
                                    attn_chunk=cfg.attn_chunk or None)
            kl = kl_from_teacher(tlogits[0, L - H - 1:L - 1], logits[1:cfg.n_wc])
            gist_loss = gist_loss + cfg.kl_weight * kl
            metrics["kl"] = kl
        loss = loss + gist_loss
        metrics["gist_loss"] = gist_loss
    if cfg.phase in ("lens", "joint"):
        lens_l, lens_metrics = lens_loss(lens_state, base_params, levels[1:cfg.n_wc], nll_mix,
                                         jax.lax.stop_gradient(gists), emb_NxKxD, hor_emb,
                                         targets, k_edit, m, jax.lax.stop_gradient(adapter))
        loss = loss + cfg.lens_weight * lens_l
        metrics.update(lens_metrics)
    metrics["loss"] = loss
    return loss, metrics


def batch_loss(params, base_params, tokens_BxT, key, m: Models):
    """Mean loss and metrics over a batch of sequences (one key per sequence)."""
    keys = jax.random.split(key, tokens_BxT.shape[0])
    losses, metrics = jax.vmap(
        lambda t, k: sequence_loss(params["gist"], params["lens"], base_params, t, k, m))(
        tokens_BxT, keys)
    return losses.mean(), jax.tree.map(jnp.mean, metrics)
