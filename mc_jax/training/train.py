"""Training GistNet and LensNet against the frozen base (SPEC §3), one jit-compiled sharded step.

Per sequence of C + H tokens:
1. GistNet builds the tree of the C history tokens (every level in one vectorised call).
2. N1 working contexts ending at the cursor: the all-LOD0 recent window, plus N1 - 1 random legal
   mixtures of LOD0 / LOD1 / LOD2 covering the whole history (`training_wc.sample_mixture`).
3. One packed forward per WC, [WC || H horizon tokens], loss = next-token NLL of the H horizon
   tokens only (the logit at slot W - 1 + h predicts horizon token h).
4. GistNet loss: mean horizon NLL of the gist-bearing WCs (gradient through the frozen base into
   the gists), + a contrastive hinge on the cosine of neighbouring LOD1 gists, + optional KL to the
   full-context teacher.
5. LensNet loss from measured utilities (stop-gradient): for each mixture, a few random legal
   single edits are evaluated; d = NLL increase from losing the detail at that entry
   (expansion: NLL(wc) - NLL(expanded); collapse: NLL(collapsed) - NLL(wc)); the regression target is
   tanh(d / scale - lambda) (lambda: the regularised-argmin penalty per edit), + pairwise softplus
   ranking, + a push towards the sign of the slate's argmin (best WC penalised by its edit
   distance) when an edit wins, + a zero-sum budget term, + a penalty on illegal directions
   (u > 0 on LOD0 blocks, u < 0 on protected blocks and top-level gists).
6. One `jax.jit` over a Mesh ('data' axis): the batch is sharded, parameters replicated, the train
   state donated; the base parameters are a separate, replicated, never-differentiated argument.

Letters: B batch, C history, H horizon, N blocks, K block size, D d_model, W budget, P = W + H,
M mixtures, E edits per mixture, V vocab.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mc_jax.base import base_model as bm
from mc_jax.training import windows as twc
from mc_jax.errors import ConfigError, McJaxError
from mc_jax.nets.gistnet import GistNetConfig, as_gist_fn, build_gist_model
from mc_jax.nets.io import fill_params, save_networks
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from mc_jax.training.config import TrainConfig, add_train_args, load_config


class TrainingDivergedError(McJaxError):
    """A NaN or inf loss: the run stops and keeps its last good checkpoint."""


# ----------------------------------------------------------------------------------------------
# models

@dataclasses.dataclass(frozen=True, eq=False)
class Models:
    """Everything static about a run: configs, NNX graph definitions, the frozen base."""

    cfg: TrainConfig
    base_cfg: bm.LlamaConfig
    pack: twc.PackConfig
    gist_cfg: GistNetConfig
    lens_cfg: LensNetConfig
    gist_graph: Any
    lens_graph: Any
    tokenizer: Any = None


def load_frozen_base(cfg: TrainConfig):
    """(LlamaConfig, params, tokenizer or None) for cfg.base."""
    if cfg.base == "tiny":
        bcfg = bm.LlamaConfig.tiny()
        return bcfg, bm.init_params(bcfg, jax.random.PRNGKey(1234)), None
    from mc_jax.base.loading import load_base

    m = load_base(None if cfg.base == "default" else cfg.base, dtype=cfg.base_dtype)
    return m.cfg, m.params, m.tokenizer


def build_models(cfg: TrainConfig, base_cfg: bm.LlamaConfig, base_params, tokenizer=None,
                 seed: int | None = None):
    """Models (static) and freshly initialised GistNet / LensNet states."""
    pack = twc.PackConfig(seq_blocks=cfg.seq_len // 32, budget=cfg.budget, horizon=cfg.horizon,
                          depth=cfg.depth, protect_blocks=cfg.protect_blocks,
                          position_mode=cfg.position_mode, rope_damping=cfg.rope_damping)
    if cfg.budget + cfg.horizon > base_cfg.max_seq_len:
        raise ConfigError(f"budget {cfg.budget} + horizon {cfg.horizon} exceeds the base "
                          f"model's context of {base_cfg.max_seq_len}")
    rms = bm.embedding_rms(base_params)
    gist_cfg = GistNetConfig(d_model=base_cfg.d_model, width=cfg.gist_width,
                             heads=cfg.gist_heads, depth=cfg.depth,
                             share_weights_across_levels=cfg.gist_shared, embed_rms=rms,
                             dtype=cfg.compute_dtype, reader_rank=cfg.gist_reader_rank,
                             reader_dims=bm.adapter_dims(base_params) if cfg.gist_reader_rank
                             else ())
    lens_cfg = LensNetConfig(d_model=base_cfg.d_model, d_lens=cfg.lens_width,
                             heads=cfg.lens_heads, n_latents=cfg.lens_latents,
                             n_latent_layers=cfg.lens_layers, max_level=cfg.depth,
                             delta_nll_head=True, dtype=cfg.compute_dtype)
    seed = cfg.seed if seed is None else seed
    gist_graph, gist_state = nnx.split(build_gist_model(gist_cfg, rngs=nnx.Rngs(seed)))
    lens_graph, lens_state = nnx.split(LensNet(lens_cfg, rngs=nnx.Rngs(seed + 1)))
    models = Models(cfg=cfg, base_cfg=base_cfg, pack=pack, gist_cfg=gist_cfg, lens_cfg=lens_cfg,
                    gist_graph=gist_graph, lens_graph=lens_graph, tokenizer=tokenizer)
    return models, gist_state, lens_state


# ----------------------------------------------------------------------------------------------
# losses

def build_gists(gist_fn, tok_emb_NxKxD, depth: int, K: int = 32) -> tuple:
    """All gist levels of a block-aligned history (complete nodes only)."""
    gists, below = [], tok_emb_NxKxD
    for level in range(1, depth + 1):
        n = below.shape[0]
        if n == 0:
            gists.append(jnp.zeros((1, tok_emb_NxKxD.shape[-1]), jnp.float32))
            below = below[:0]
            continue
        g = gist_fn(level, below).astype(jnp.float32)
        gists.append(g)
        n_up = g.shape[0] // K
        below = g[: n_up * K].reshape(n_up, K, g.shape[-1])
    # keep at least one row per level so gathers stay in bounds
    return tuple(g if g.shape[0] else jnp.zeros((1, tok_emb_NxKxD.shape[-1])) for g in gists)


def packed_logits(base_params, base_cfg: bm.LlamaConfig, x_BxPxD, pos_BxP, valid_BxP, W: int,
                  H: int, sigma_BxP=None, adapter=None, adapt_BxP=None):
    """Logits [B, H, V] of the H positions after a W-slot working context (the logit at slot
    W - 1 + h predicts horizon token h); only those H rows go through the output head.
    adapter, adapt_BxP: the gist reader and the gist slots it applies to (or None)."""
    h_BxPxD, _ = bm.forward(base_params, base_cfg, x_BxPxD.astype(base_params["embed"].dtype),
                            pos_BxP, valid_BxT=valid_BxP, sigma_BxT=sigma_BxP, return_hidden=True,
                            adapter=adapter, adapt_BxT=adapt_BxP)
    h_BxHxD = h_BxPxD[:, W - 1: W - 1 + H]
    head = base_params["embed"].T if base_cfg.tie_embeddings else base_params["lm_head"]
    return jnp.einsum("bhd,dv->bhv", h_BxHxD, head.astype(h_BxHxD.dtype),
                      preferred_element_type=jnp.float32)


def horizon_nll(base_params, m: Models, x_BxPxD, pos_BxP, sigma_BxP, valid_BxP, targets_BxH,
                return_logits: bool = False, per_token: bool = False, adapter=None,
                adapt_BxP=None):
    """Mean next-token NLL of the H horizon tokens per row (the logit at W-1+h predicts token h).

    per_token: return the [B, H] NLLs instead of their mean.
    adapter, adapt_BxP: the gist reader and its slots (`twc.gist_slots`), or None."""
    sigma = sigma_BxP if m.pack.rope_damping else None
    logits = packed_logits(base_params, m.base_cfg, x_BxPxD, pos_BxP, valid_BxP, m.pack.budget,
                           m.pack.horizon, sigma, adapter, adapt_BxP)
    nll_BxH = bm.token_nll(logits, targets_BxH)
    if per_token:
        return nll_BxH
    if return_logits:
        return nll_BxH.mean(-1), logits
    return nll_BxH.mean(-1)


def kl_from_teacher(t_logits, s_logits):
    """Mean over positions of KL(teacher || student); the teacher gets no gradient."""
    t_logp = jax.nn.log_softmax(jax.lax.stop_gradient(t_logits), -1)
    return jnp.sum(jnp.exp(t_logp) * (t_logp - jax.nn.log_softmax(s_logits, -1)), -1).mean()


def gist_variance_floor(g_NxD, target_frac: float, embed_rms: float):
    """VICReg-style floor on the gists' per-channel std across a sequence's blocks: (mean hinge
    relu(target - std) / target, with target = target_frac x embed_rms; the spread, mean std /
    embed_rms)."""
    target = target_frac * embed_rms
    std_D = jnp.sqrt(jnp.var(g_NxD, axis=0) + 1e-6)
    return jnp.mean(jax.nn.relu(target - std_D)) / target, jnp.mean(std_D) / embed_rms


def gist_info_nce(g_NxD, e_NxD, temp: float):
    """InfoNCE between the LOD1 gists of a sequence and their blocks' mean token embeddings:
    each gist has to pick out its own block among the sequence's blocks (cosine of the
    sequence-centred vectors / temp). Returns (loss, top-1 accuracy). A constant gist scores
    log N; content that tells the blocks apart lowers it."""
    def unit(v):
        v = v - v.mean(0, keepdims=True)
        return v / (jnp.linalg.norm(v, axis=-1, keepdims=True) + 1e-6)

    logits = unit(g_NxD) @ unit(e_NxD).T / temp
    diag = jnp.diagonal(logits)
    loss = jnp.mean(jax.nn.logsumexp(logits, -1) - diag)
    top1 = jnp.mean((jnp.argmax(logits, -1) == jnp.arange(g_NxD.shape[0])).astype(jnp.float32))
    return loss, top1


def gist_recon_nll(base_params, base_cfg: bm.LlamaConfig, gists_BxD, prefix_BxPxD, block_BxKxD,
                   targets_BxK, adapter=None, with_gist: bool = True):
    """Autoencoding through the frozen base: [B, K] NLL of each block's tokens, each row laid out
    as [prefix P token embeddings][gist][the block's K token embeddings] at compact positions
    0..P+K; the logit at the gist slot predicts the block's first token. The prefix (the end of
    the block before) keeps the gist off position 0, which the base uses as an attention sink.
    with_gist=False drops the gist slot: [prefix][block], the no-gist reference.
    adapter: the gist reader, applied at the gist slot only."""
    P, K = prefix_BxPxD.shape[1], block_BxKxD.shape[1]
    B = block_BxKxD.shape[0]
    if with_gist:
        x = jnp.concatenate([prefix_BxPxD, gists_BxD[:, None].astype(prefix_BxPxD.dtype),
                             block_BxKxD], 1)
        first = P
    else:
        x, first, adapter = jnp.concatenate([prefix_BxPxD, block_BxKxD], 1), P - 1, None
    L = x.shape[1]
    adapt = None if adapter is None else jnp.zeros((B, L), bool).at[:, P].set(True)
    # the K rows from `first` on, through the output head only (as for a WC of first + 1 slots)
    logits = packed_logits(base_params, base_cfg, x, jnp.broadcast_to(jnp.arange(L), (B, L)),
                           jnp.ones((B, L), bool), first + 1, K, adapter=adapter, adapt_BxP=adapt)
    return bm.token_nll(logits, targets_BxK)


def _pearson(a, b, mask):
    """Pearson correlation of two masked vectors (a cheap in-step telemetry figure)."""
    w = mask.astype(jnp.float32)
    n = jnp.maximum(w.sum(), 1.0)
    am, bm_ = (a * w).sum() / n, (b * w).sum() / n
    cov = ((a - am) * (b - bm_) * w).sum()
    return cov / jnp.sqrt(((a - am) ** 2 * w).sum() * ((b - bm_) ** 2 * w).sum() + 1e-12)


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

    g1 = gists[0][:N]
    g1n = g1 / (jnp.linalg.norm(g1, axis=-1, keepdims=True) + 1e-6)
    cos = jnp.sum(g1n[1:] * g1n[:-1], axis=-1)
    contrastive = jnp.mean(jax.nn.relu(cos - cfg.contrastive_margin)) if N > 1 else 0.0
    variance, spread = gist_variance_floor(g1, cfg.gist_var_target, m.gist_cfg.embed_rms)
    info, info_top1 = gist_info_nce(g1, jax.lax.stop_gradient(emb_NxKxD.mean(1)),
                                    cfg.gist_info_temp)
    metrics = {"nll_recent": nll_recent, "nll_mix": nll_mix.mean(),
               "gist_info": info, "gist_info_top1": info_top1,
               "nll_gap": nll_mix.mean() - nll_recent, "contrastive": contrastive,
               "gist_std": spread, "gist_variance": variance,
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
            content = jnp.mean(jax.nn.relu(cfg.content_margin - (nll_wrong - nll_sub)))
            gist_loss = gist_loss + cfg.content_weight * content
            metrics.update(content=content, subst_minus_wrong=nll_sub.mean() - nll_wrong.mean())
        if cfg.gist_var_weight > 0:
            gist_loss = gist_loss + cfg.gist_var_weight * variance
        if cfg.gist_info_weight > 0:
            gist_loss = gist_loss + cfg.gist_info_weight * info
        if cfg.recon_weight > 0:
            # own key, so the other draws are those of a run without the term
            R, P = cfg.recon_blocks, cfg.recon_prefix
            rb = jax.random.choice(jax.random.fold_in(key, 0x5EC), jnp.arange(1, N), (R,),
                                   replace=False)
            g_rows = gists[0][rb]
            # the same rows with another sampled block's gist: content telemetry and hinge
            g_both = jnp.concatenate([g_rows, jnp.roll(g_rows, 1, axis=0)])
            rb2 = jnp.concatenate([rb, rb])
            nll_r = gist_recon_nll(base_params, m.base_cfg, g_both, emb_NxKxD[rb2 - 1, K - P:],
                                   emb_NxKxD[rb2], ids.reshape(N, K)[rb2], adapter).mean(-1)
            right, wrong = nll_r[:R], nll_r[R:]
            recon_hinge = jnp.mean(jax.nn.relu(cfg.recon_margin - (wrong - right)))
            gist_loss = gist_loss + cfg.recon_weight * (right.mean()
                                                        + cfg.recon_content_weight * recon_hinge)
            metrics.update(recon=right.mean(), recon_minus_wrong=right.mean() - wrong.mean())
        if cfg.kl_weight > 0:
            full = jnp.concatenate([ids, targets])[None]
            tlogits, _ = bm.forward(base_params, m.base_cfg, full, jnp.arange(C + H)[None])
            kl = kl_from_teacher(tlogits[0, C - 1:C - 1 + H], logits[1:cfg.n_wc])
            gist_loss = gist_loss + cfg.kl_weight * kl
            metrics["kl"] = kl
        loss = loss + gist_loss
        metrics["gist_loss"] = gist_loss
    if cfg.phase in ("lens", "joint"):
        lens_loss, lens_metrics = _lens_loss(lens_state, base_params, levels[1:cfg.n_wc],
                                             nll_mix, jax.lax.stop_gradient(gists), emb_NxKxD,
                                             hor_emb, targets, k_edit, m,
                                             jax.lax.stop_gradient(adapter))
        loss = loss + cfg.lens_weight * lens_loss
        metrics.update(lens_metrics)
    metrics["loss"] = loss
    return loss, metrics


def lens_scores(lens_state, levels_MxN, gists, m: Models):
    """LensNet output for a batch of WCs given as level assignments (training layout)."""
    lens = nnx.merge(m.lens_graph, lens_state)
    f = jax.vmap(lambda lv: twc.entry_features(lv, gists, m.pack))(levels_MxN)
    M, N = levels_MxN.shape
    out = lens(f["vec"], f["mask"], level_xE=f["level"], span_xE=f["span"],
               distance_xE=f["distance"], since_edit_xE=jnp.full((M, N), 2 ** 30, jnp.int32),
               tail_xUxD=f["tail"], tail_mask_xU=f["tail_mask"])
    return out, f


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


def _lens_loss(lens_state, base_params, levels_MxN, nll_M, gists, emb, hor_emb, targets, key,
               m: Models, adapter=None):
    nll_M = jax.lax.stop_gradient(nll_M)
    blocks, kinds, evalid, nll_e = measure_edits(base_params, levels_MxN, gists, emb, hor_emb,
                                                 targets, key, m, adapter)
    return lens_loss_measured(lens_state, levels_MxN, nll_M, nll_e, blocks, kinds, evalid, gists,
                              m)


def lens_loss_measured(lens_state, levels_MxN, nll_M, nll_e, blocks, kinds, evalid, gists,
                       m: Models):
    """LensNet loss and metrics from already measured single-edit NLLs nll_e [M, E] (online:
    `_lens_loss`; offline, from a cached label set: `mc_jax.training.lens_fit`)."""
    cfg, pc = m.cfg, m.pack
    d, t = utility_targets(nll_M, nll_e, kinds, cfg)
    out, f = lens_scores(lens_state, levels_MxN, gists, m)
    u_e = edit_scores(out.u, f["mask"], levels_MxN, blocks, kinds, pc)
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
    emask = f["mask"].astype(jnp.float32)
    budget = (((out.u * emask).sum(-1) / jnp.maximum(emask.sum(-1), 1.0)) ** 2).mean()
    b = jnp.arange(pc.seq_blocks)
    protected = b >= pc.seq_blocks - pc.protect_blocks
    lod0 = f["level"] == 0
    top = f["level"] == pc.depth
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


# ----------------------------------------------------------------------------------------------
# train state and step

@flax.struct.dataclass
class TrainState:
    step: jax.Array
    gist: Any
    lens: Any
    opt: Any
    key: jax.Array  # base key: step t draws from fold_in(key, t), so a resumed run draws the same


def make_optimizer(cfg: TrainConfig, params) -> optax.GradientTransformation:
    sched = optax.warmup_cosine_decay_schedule(
        0.0, cfg.lr, max(cfg.warmup_steps, 1), max(cfg.steps, cfg.warmup_steps + 1),
        end_value=cfg.lr * 0.1)
    train = optax.chain(optax.clip_by_global_norm(cfg.clip_norm),
                        optax.adamw(sched, weight_decay=cfg.weight_decay))
    trains = {"gist": cfg.phase in ("gist", "joint"), "lens": cfg.phase in ("lens", "joint")}
    labels = {k: jax.tree.map(lambda _: "train" if trains[k] else "freeze", v)
              for k, v in params.items()}
    return optax.multi_transform({"train": train, "freeze": optax.set_to_zero()}, labels)


def init_state(m: Models, gist_state, lens_state) -> TrainState:
    params = {"gist": gist_state, "lens": lens_state}
    opt = make_optimizer(m.cfg, params).init(params)
    return TrainState(step=jnp.zeros((), jnp.int32), gist=gist_state, lens=lens_state, opt=opt,
                      key=jax.random.PRNGKey(m.cfg.seed))


def batch_loss(params, base_params, tokens_BxT, key, m: Models):
    keys = jax.random.split(key, tokens_BxT.shape[0])
    losses, metrics = jax.vmap(
        lambda t, k: sequence_loss(params["gist"], params["lens"], base_params, t, k, m))(
        tokens_BxT, keys)
    return losses.mean(), jax.tree.map(jnp.mean, metrics)


def train_step(state: TrainState, base_params, tokens_BxT, m: Models):
    params = {"gist": state.gist, "lens": state.lens}
    key = jax.random.fold_in(state.key, state.step)
    (loss, metrics), grads = jax.value_and_grad(batch_loss, has_aux=True)(
        params, base_params, tokens_BxT, key, m)
    tx = make_optimizer(m.cfg, params)
    updates, opt = tx.update(grads, state.opt, params)
    params = optax.apply_updates(params, updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    metrics["finite"] = jnp.isfinite(loss).astype(jnp.float32)
    new = TrainState(step=state.step + 1, gist=params["gist"], lens=params["lens"], opt=opt,
                     key=state.key)
    # never carry a non-finite update forward: the host stops on `finite == 0`
    new = jax.tree.map(lambda a, b: jnp.where(jnp.isfinite(loss), a, b), new, state)
    return new, metrics


def make_mesh(n_devices: int | None = None) -> Mesh:
    devs = np.array(jax.devices()[: n_devices or len(jax.devices())])
    return Mesh(devs, ("data",))


_STEP_CACHE: dict = {}
TRACE_COUNT = {"train_step": 0}


def compile_train_step(m: Models, mesh: Mesh):
    """The jitted step for this config and mesh (cached: a resumed run in the same process, or a
    second run of the same config, reuses the compiled step)."""
    key = (m.cfg, m.base_cfg, tuple(d.id for d in mesh.devices.flat))
    if key not in _STEP_CACHE:
        rep = NamedSharding(mesh, P())
        data = NamedSharding(mesh, P("data"))

        def step(s, bp, t):
            TRACE_COUNT["train_step"] += 1  # Python side effect: runs once per trace
            return train_step(s, bp, t, m)

        _STEP_CACHE[key] = jax.jit(step, donate_argnums=(0,), in_shardings=(rep, rep, data),
                                   out_shardings=(rep, rep))
    return _STEP_CACHE[key]


# ----------------------------------------------------------------------------------------------
# data

class SyntheticBatches:
    """Deterministic random token windows (for the tiny base): batch i depends on (seed, i) only.

    Documents repeat short phrases so the far history carries information about the horizon.
    """

    def __init__(self, cfg: TrainConfig, vocab: int, mesh: Mesh | None):
        self.cfg, self.vocab, self.mesh, self.index = cfg, vocab, mesh, 0

    def _batch(self, i):
        rng = np.random.default_rng([self.cfg.seed, i])
        T = self.cfg.seq_len + self.cfg.horizon
        phrases = rng.integers(0, self.vocab, (self.cfg.batch_size, 16, 24))
        pick = rng.integers(0, 16, (self.cfg.batch_size, T // 24 + 1))
        seq = np.take_along_axis(phrases, pick[..., None], 1).reshape(self.cfg.batch_size, -1)
        return seq[:, :T].astype(np.int32)

    def __next__(self):
        b = self._batch(self.index)
        self.index += 1
        if self.mesh is None:
            return {"tokens": jnp.asarray(b)}
        return {"tokens": jax.device_put(b, NamedSharding(self.mesh, P("data")))}

    def __iter__(self):
        return self

    def get_state(self):
        return {"kind": "synthetic", "next_index": self.index, "seed": self.cfg.seed}

    def set_state(self, state):
        if state.get("kind") != "synthetic":
            raise ConfigError("checkpointed data state is not from the synthetic source")
        self.index = int(state["next_index"])


def make_batches(cfg: TrainConfig, m: Models, mesh: Mesh, split: str = "train"):
    if cfg.data == "synthetic":
        return SyntheticBatches(cfg, m.base_cfg.vocab_size, mesh)
    from mc_jax.data import pipeline as data

    src = data.open_split(split, m.tokenizer, data_dir=cfg.data_dir)
    wcfg = data.WindowConfig(cfg.seq_len + cfg.horizon, cfg.batch_size, seed=cfg.seed)
    return data.make_batch_iterator(src, wcfg, mesh=mesh)


# ----------------------------------------------------------------------------------------------
# checkpoints

def _manager(workdir: Path, cfg: TrainConfig):
    import orbax.checkpoint as ocp

    opts = ocp.CheckpointManagerOptions(max_to_keep=cfg.keep_checkpoints, create=True,
                                        enable_async_checkpointing=False)
    return ocp.CheckpointManager((workdir / "checkpoints").absolute(), options=opts)


def save_checkpoint(mgr, state: TrainState, data_state: dict, meta: dict):
    import orbax.checkpoint as ocp

    step = int(state.step)
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=ocp.args.JsonSave(data_state),
                                           meta=ocp.args.JsonSave(meta)))
    mgr.wait_until_finished()


def restore_checkpoint(mgr, template: TrainState, step: int | None = None):
    import orbax.checkpoint as ocp

    step = mgr.latest_step() if step is None else step
    if step is None:
        return None
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, template)
    try:
        r = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                      data=ocp.args.JsonRestore(),
                                                      meta=ocp.args.JsonRestore()))
    except Exception as e:  # orbax raises several types for damaged files
        raise McJaxError(f"checkpoint step {step} in {mgr.directory} cannot be restored "
                         f"({type(e).__name__}: {e}); delete that step folder to fall back to "
                         "the previous one") from e
    return r.state, r.data, r.meta


def export_networks(path: Path, m: Models, state: TrainState, meta: dict, dtype="bfloat16"):
    """Small standalone checkpoint of GistNet + LensNet (`nets.io.save_networks`), with this
    run's training config in its networks.json."""
    save_networks(path, state.gist, state.lens, m.gist_cfg, m.lens_cfg,
                  dict(meta, train_config=json.loads(m.cfg.to_json())), dtype)


def warm_start(m: Models, gist_state, lens_state, path: str | Path):
    """GistNet / LensNet states of this run's shapes, with the parameters of an exported
    checkpoint (`init_from`): fine-tuning starts there, with a fresh optimiser."""
    from safetensors.numpy import load_file

    from mc_jax.errors import CorruptFileError

    f = Path(path) / "networks.safetensors"
    if not f.is_file():
        raise ConfigError(f"init_from={path}: no networks.safetensors there (give a directory "
                          "written by `mc-jax train --export` or `mc-jax fit-lens`)")
    try:
        flat = load_file(str(f))
    except Exception as e:
        raise CorruptFileError(f"{f}: checkpoint is damaged ({e})") from e
    out = []
    for name, graph, st in (("gist", m.gist_graph, gist_state), ("lens", m.lens_graph,
                                                                  lens_state)):
        mod = nnx.merge(graph, jax.tree.map(jnp.copy, st))  # leave the caller's state as it is
        fill_params(mod, name, flat, ConfigError,
                     f"init_from={path} does not fit this config: parameter")
        out.append(nnx.split(mod)[1])
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# the loop

def _writer(workdir: Path):
    try:
        from tensorboardX import SummaryWriter
        return SummaryWriter(str(workdir / "tb"))
    except Exception:  # noqa: BLE001 - TensorBoard is optional output
        return None


def run(cfg: TrainConfig, workdir: str | Path, *, resume: bool = False, steps: int | None = None,
        n_devices: int | None = None, progress: bool = True, export: str | Path | None = None,
        log=None) -> dict:
    """Train; returns the summary printed as the last JSON line by the CLI."""
    from tqdm import tqdm

    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    total = steps if steps is not None else cfg.steps
    base_cfg, base_params, tok = load_frozen_base(cfg)
    m, gist_state, lens_state = build_models(cfg, base_cfg, base_params, tok)
    if cfg.init_from:  # a resumed run's checkpoint then overrides it
        gist_state, lens_state = warm_start(m, gist_state, lens_state, cfg.init_from)
        log(f"GistNet and LensNet start from {cfg.init_from}")
    mesh = make_mesh(n_devices)
    if cfg.batch_size % mesh.size:
        raise ConfigError(f"batch_size {cfg.batch_size} is not a multiple of the "
                          f"{mesh.size} devices of the mesh")
    rep = NamedSharding(mesh, P())
    base_params = jax.device_put(base_params, rep)
    state = jax.device_put(init_state(m, gist_state, lens_state), rep)
    batches = make_batches(cfg, m, mesh)
    mgr = _manager(workdir, cfg)
    meta = {"config": json.loads(cfg.to_json()), "base": base_cfg.name}
    if resume and (workdir / "config.json").exists():
        saved = json.loads((workdir / "config.json").read_text())
        # a field added to TrainConfig after the run started counts as its default
        defaults = json.loads(type(cfg)().to_json())
        diff = sorted(k for k, v in json.loads(cfg.to_json()).items()
                      if saved.get(k, defaults[k]) != v)
        if diff:
            raise ConfigError(f"--resume with a different config than {workdir}/config.json "
                              f"(differs in: {', '.join(diff)}); an exact resume needs the same "
                              "config")
    if resume:
        restored = restore_checkpoint(mgr, state)
        if restored is not None:
            state, data_state, _ = restored
            state = jax.device_put(state, rep)
            batches.set_state(data_state)
            log(f"resumed from step {int(state.step)} ({mgr.directory})")
        else:
            log("no checkpoint to resume from: starting fresh")
    elif mgr.latest_step() is not None:
        raise ConfigError(f"{workdir} already holds checkpoints; pass --resume to continue or "
                          "use another --workdir")
    (workdir / "config.json").write_text(cfg.to_json())
    step_fn = compile_train_step(m, mesh)
    writer = _writer(workdir)
    metrics_file = open(workdir / "metrics.jsonl", "a")
    start = int(state.step)
    first_loss = last_loss = None
    pending = None  # (step, metrics) of the step dispatched last: read after the next dispatch

    def consume(step_i, mets, dt):
        nonlocal first_loss, last_loss
        mets = {k: float(v) for k, v in jax.device_get(mets).items()}
        if mets["finite"] == 0.0:
            raise TrainingDivergedError(
                f"loss became NaN/inf at step {step_i}: stopping; the last good checkpoint in "
                f"{workdir / 'checkpoints'} is kept (lower lr or check the data)")
        first_loss = mets["loss"] if first_loss is None else first_loss
        last_loss = mets["loss"]
        mets.update(step=step_i, step_time=dt)
        metrics_file.write(json.dumps(mets) + "\n")
        metrics_file.flush()
        if writer is not None:
            for k, v in mets.items():
                writer.add_scalar(f"train/{k}", v, step_i)
        return mets

    bar = tqdm(range(start, total), initial=start, total=total, disable=not progress,
               desc=f"train {cfg.name}", file=sys.stderr, dynamic_ncols=True)
    t_last = time.perf_counter()
    try:
        for i in bar:
            batch = next(batches)
            state, mets = step_fn(state, base_params, batch["tokens"])
            if pending is not None:
                now = time.perf_counter()
                shown = consume(pending[0], pending[1], now - t_last)
                t_last = now
                bar.set_postfix(loss=f"{shown['loss']:.4f}", nll_mix=f"{shown['nll_mix']:.3f}",
                                s=f"{shown['step_time']:.1f}")
            pending = (i + 1, mets)
            if (i + 1) % cfg.checkpoint_every == 0 or i + 1 == total:
                consume(pending[0], pending[1], time.perf_counter() - t_last)
                t_last = time.perf_counter()
                pending = None
                save_checkpoint(mgr, state, batches.get_state(), dict(meta, step=i + 1))
        if pending is not None:
            consume(pending[0], pending[1], time.perf_counter() - t_last)
    finally:
        bar.close()
        metrics_file.close()
        if writer is not None:
            writer.close()
    ckpt = str((workdir / "checkpoints").absolute())
    summary = {"steps": int(state.step), "first_loss": first_loss, "last_loss": last_loss,
               "checkpoint": ckpt, "workdir": str(workdir)}
    if export:
        export_networks(Path(export), m, state, dict(meta, steps=int(state.step),
                                                     last_loss=last_loss))
        summary["exported"] = str(export)
    return summary


def maybe_init_distributed():
    """Multi-host: `launch/train_multihost.sh` sets MC_JAX_COORDINATOR, MC_JAX_NUM_PROCESSES and
    MC_JAX_PROCESS_ID; every process then runs the same program over the global mesh."""
    import os

    coord = os.environ.get("MC_JAX_COORDINATOR")
    if coord:
        jax.distributed.initialize(coordinator_address=coord,
                                   num_processes=int(os.environ["MC_JAX_NUM_PROCESSES"]),
                                   process_id=int(os.environ["MC_JAX_PROCESS_ID"]))


def train_cli(args) -> int:
    maybe_init_distributed()
    cfg = load_config(args.config, args.set)
    summary = run(cfg, args.workdir, resume=args.resume, steps=args.steps,
                  n_devices=args.devices, progress=not args.no_progress, export=args.export)
    print(json.dumps(summary))
    return 0


def main(argv=None):
    args = add_train_args(argparse.ArgumentParser(prog="mc-jax train")).parse_args(argv)
    return train_cli(args)


if __name__ == "__main__":
    sys.exit(main())
