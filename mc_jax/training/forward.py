"""The packed forward of training working contexts through the frozen base.

A training sequence's gists are built level by level (`build_gists`); each working context is
packed as [WC slots (left-padded to W) || H horizon tokens] (`training.windows.pack_many`) and
run in one base forward whose only scored rows are the H positions after the WC
(`packed_logits`); `horizon_nll` is the next-token NLL there.

Letters: B rows, N blocks, K block size, D d_model, W budget, H horizon, P = W + H, V vocab.
"""

from __future__ import annotations

import jax.numpy as jnp

from mc_jax.base import base_model as bm
from mc_jax.training.models import Models


def build_gists(gist_fn, tok_emb_NxKxD, depth: int, K: int | None = None) -> tuple:
    """All gist levels of a block-aligned history (complete nodes only); K defaults to the
    blocks' size, tok_emb_NxKxD.shape[1]."""
    K = tok_emb_NxKxD.shape[1] if K is None else K
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
                  H: int, sigma_BxP=None, adapter=None, adapt_BxP=None, remat: bool = False,
                  attn_chunk: int = 0):
    """Logits [B, H, V] of the H positions after a W-slot working context (the logit at slot
    W - 1 + h predicts horizon token h); only those H rows go through the output head.
    adapter, adapt_BxP: the gist reader and the gist slots it applies to (or None).
    remat, attn_chunk: `base_model.forward`'s memory options (TrainConfig's)."""
    h_BxPxD, _ = bm.forward(base_params, base_cfg, x_BxPxD.astype(base_params["embed"].dtype),
                            pos_BxP, valid_BxT=valid_BxP, sigma_BxT=sigma_BxP, return_hidden=True,
                            adapter=adapter, adapt_BxT=adapt_BxP, remat=remat,
                            attn_chunk=attn_chunk or None)
    return bm.lm_head(base_params, base_cfg, h_BxPxD[:, W - 1: W - 1 + H])


def horizon_nll(base_params, m: Models, x_BxPxD, pos_BxP, sigma_BxP, valid_BxP, targets_BxH,
                return_logits: bool = False, per_token: bool = False, adapter=None,
                adapt_BxP=None):
    """Mean next-token NLL of the H horizon tokens per row (the logit at W-1+h predicts token h).

    per_token: return the [B, H] NLLs instead of their mean.
    adapter, adapt_BxP: the gist reader and its slots (`windows.gist_slots`), or None."""
    sigma = sigma_BxP if m.pack.rope_damping else None
    logits = packed_logits(base_params, m.base_cfg, x_BxPxD, pos_BxP, valid_BxP, m.pack.budget,
                           m.pack.horizon, sigma, adapter, adapt_BxP,
                           remat=bool(getattr(m.cfg, "remat", False)),
                           attn_chunk=int(getattr(m.cfg, "attn_chunk", 0)))
    nll_BxH = bm.token_nll(logits, targets_BxH)
    if per_token:
        return nll_BxH
    if return_logits:
        return nll_BxH.mean(-1), logits
    return nll_BxH.mean(-1)
