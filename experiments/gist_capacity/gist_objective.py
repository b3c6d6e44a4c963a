"""The gist-capacity experiment's loss variants for GistNet, with their config fields.

Three terms that try to keep block content in the gists (README.md: measured on CPU, none of
them turned GistNet's gists into content the frozen base reads):
- variance floor (`gist_var_weight`, `gist_var_target`): VICReg-style floor on the LOD1 gists'
  per-channel std across a sequence's blocks; keeps GistNet from collapsing to one harmless
  constant vector, which the cosine hinge cannot undo;
- InfoNCE (`gist_info_weight`, `gist_info_temp`): each LOD1 gist has to pick out its block's mean
  token embedding among the sequence's blocks (no base forward). Horizon losses alone drift
  GistNet towards content-free placeholders;
- reconstruction through the frozen base (`recon_weight`, `recon_blocks`, `recon_prefix`,
  `recon_content_weight`, `recon_margin`): recon_blocks blocks per sequence are laid out as
  [last recon_prefix tokens of the block before][gist][the block] and the base's NLL of the
  block's tokens is added with recon_weight. Meant as a loss with no placeholder optimum; it too
  taught mostly a content-free gain (fifth session). The same rows with another block's gist
  give `recon_minus_wrong` (content telemetry) and a hinge relu(recon_margin - (NLL(wrong) -
  NLL(right))) weighted by recon_content_weight.

`GistCapacityConfig` is a `TrainConfig` with these fields; its `gist_terms` hands the terms to
the library's objective (`mc_jax.training.objective`). Train with it through `mc-jax train`:

    mc-jax train --config experiments/gist_capacity/gist_objective.py:cpu_small:reader \
        --set gist_var_weight=0.1 --workdir runs/reader_r8

(`get_config("PRESET[:VARIANT]")`: a library preset and variant, default tiny.) The telemetry
`gist_std`, `gist_variance`, `gist_info` and `gist_info_top1` is logged on every GistNet step,
whatever the weights.
"""

import dataclasses

import jax
import jax.numpy as jnp

from mc_jax.base import base_model as bm
from mc_jax.errors import ConfigError
from mc_jax.training.config import TrainConfig, load_config
from mc_jax.training.forward import packed_logits


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


@dataclasses.dataclass(frozen=True)
class GistCapacityConfig(TrainConfig):
    """TrainConfig plus the fields of this experiment's GistNet terms (module docstring)."""

    gist_var_weight: float = 0.0
    gist_var_target: float = 0.5     # target per-channel std, as a fraction of the embedding RMS
    gist_info_weight: float = 0.0
    gist_info_temp: float = 0.1
    recon_weight: float = 0.0
    recon_blocks: int = 8
    recon_prefix: int = 8
    recon_content_weight: float = 0.0
    recon_margin: float = 0.1

    def __post_init__(self):
        super().__post_init__()
        K, N = self.block_size, self.seq_len // self.block_size
        if self.recon_weight > 0:
            if not 2 <= self.recon_blocks < N:
                raise ConfigError(f"recon_blocks must be in [2, {N - 1}] (blocks after the "
                                  f"first of seq_len {self.seq_len}), got {self.recon_blocks}")
            if not 1 <= self.recon_prefix <= K:
                raise ConfigError(f"recon_prefix must be in [1, {K}], got {self.recon_prefix}")
        if self.recon_content_weight > 0 and not self.recon_weight > 0:
            raise ConfigError("recon_content_weight > 0 needs recon_weight > 0")

    def gist_terms(self) -> tuple:
        terms = (self._variance_term, self._info_term)
        return terms + (self._recon_term,) if self.recon_weight > 0 else terms

    def _variance_term(self, ctx):
        g1 = ctx.gists[0][:ctx.m.pack.seq_blocks]
        variance, spread = gist_variance_floor(g1, self.gist_var_target, ctx.m.gist_cfg.embed_rms)
        loss = self.gist_var_weight * variance if self.gist_var_weight > 0 else None
        return loss, {"gist_std": spread, "gist_variance": variance}

    def _info_term(self, ctx):
        g1 = ctx.gists[0][:ctx.m.pack.seq_blocks]
        info, top1 = gist_info_nce(g1, jax.lax.stop_gradient(ctx.emb_NxKxD.mean(1)),
                                   self.gist_info_temp)
        loss = self.gist_info_weight * info if self.gist_info_weight > 0 else None
        return loss, {"gist_info": info, "gist_info_top1": top1}

    def _recon_term(self, ctx):
        pc = ctx.m.pack
        K, N, R, P = pc.block_size, pc.seq_blocks, self.recon_blocks, self.recon_prefix
        # own key, so the other draws are those of a run without the term
        rb = jax.random.choice(jax.random.fold_in(ctx.key, 0x5EC), jnp.arange(1, N), (R,),
                               replace=False)
        g_rows = ctx.gists[0][rb]
        # the same rows with another sampled block's gist: content telemetry and hinge
        g_both = jnp.concatenate([g_rows, jnp.roll(g_rows, 1, axis=0)])
        rb2 = jnp.concatenate([rb, rb])
        emb = ctx.emb_NxKxD
        nll_r = gist_recon_nll(ctx.base_params, ctx.m.base_cfg, g_both, emb[rb2 - 1, K - P:],
                               emb[rb2], ctx.ids_C.reshape(N, K)[rb2], ctx.adapter).mean(-1)
        right, wrong = nll_r[:R], nll_r[R:]
        recon_hinge = jnp.mean(jax.nn.relu(self.recon_margin - (wrong - right)))
        loss = self.recon_weight * (right.mean() + self.recon_content_weight * recon_hinge)
        return loss, {"recon": right.mean(), "recon_minus_wrong": right.mean() - wrong.mean()}


def from_train_config(cfg: TrainConfig, **kw) -> GistCapacityConfig:
    """The experiment config with cfg's library fields (the experiment's at their defaults)."""
    return GistCapacityConfig(**dict(dataclasses.asdict(cfg), **kw))


def get_config(variant=None) -> GistCapacityConfig:
    """`mc-jax train --config experiments/gist_capacity/gist_objective.py[:PRESET[:VARIANT]]`:
    a library preset (default tiny) with this experiment's fields, set with `--set`."""
    return from_train_config(load_config(variant or "tiny"))
