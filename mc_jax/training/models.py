"""The static part of a training run: configs, NNX graph definitions, the frozen base.

`Models` is what every loss and the step close over (hashed by identity, never traced);
`build_models` derives the packing and the GistNet / LensNet configs from a `TrainConfig` and
initialises both networks; `load_frozen_base` gives the base model the run trains against.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base.loading import load_base
from mc_jax.errors import ConfigError
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from mc_jax.training import windows as twc
from mc_jax.training.config import TrainConfig


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
    m = load_base(None if cfg.base == "default" else cfg.base, dtype=cfg.base_dtype)
    return m.cfg, m.params, m.tokenizer


def build_models(cfg: TrainConfig, base_cfg: bm.LlamaConfig, base_params, tokenizer=None,
                 seed: int | None = None):
    """Models (static) and freshly initialised GistNet / LensNet states."""
    pack = twc.PackConfig(seq_blocks=cfg.seq_len // cfg.block_size, budget=cfg.budget,
                          horizon=cfg.horizon, depth=cfg.depth, block_size=cfg.block_size,
                          protect_blocks=cfg.protect_blocks, position_mode=cfg.position_mode,
                          rope_damping=cfg.rope_damping)
    if cfg.budget + cfg.horizon > base_cfg.max_seq_len:
        raise ConfigError(f"budget {cfg.budget} + horizon {cfg.horizon} exceeds the base "
                          f"model's context of {base_cfg.max_seq_len}")
    rms = bm.embedding_rms(base_params)
    gist_cfg = GistNetConfig(d_model=base_cfg.d_model, width=cfg.gist_width,
                             heads=cfg.gist_heads, depth=cfg.depth, block_size=cfg.block_size,
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
