"""GistNet: compresses K=32 vectors into one gist vector (SPEC §2).

Architecture of one level (`_GistCore`), all pre-LayerNorm with GELU MLPs:

    x_NxKxD --down--> h_NxKxC                        (C = config.width)
    h = SelfBlock(h) x n_layers                      (bidirectional, RoPE over positions 0..K-1)
    p1_Nx1xC = CrossBlock(slot1, h)                  (learned slot query pools K -> 1)
    h = h + p1                                       (broadcast the pooled vector back over K)
    h = SelfBlock(h) x n_refine_layers               (attend again, RoPE)
    p2_NxC = CrossBlock(slot2, h)                    (second slot query pools K -> 1)
    g_NxD = rms_normalise(up(LN p2)) * gain_D        (gain initialised to embed_rms)

Scale matching: the output is RMS-normalised per vector and multiplied by a learned per-channel
gain initialised to `embed_rms` (the mean RMS of the base model's token embeddings, supplied by the
caller), so at init every gist has exactly the RMS of a typical token embedding.

The baseline (`MeanPoolGist`, config.kind == "mean_pool") is mean(x over K) -> Linear (init to
identity) -> the same scale matching. Both share the interface `model(level, children_xKxD)`.

Levels: `level` is the level being produced (1 = from token embeddings, l >= 2 from level l-1
gists), a static Python int in [1, depth]. With `share_weights_across_levels` one core serves
every level; GistNet then adds a learned per-level bias (zero at init) to the token states so the
shared network can still tell levels apart.

Outputs are float32 whatever the compute dtype (the final normalisation runs in float32).

Crossing jit: modules are NNX pytrees; the documented pattern is

    graphdef, params = nnx.split(model)
    @jax.jit
    def f(params, x):
        gist_fn = gist_fn_from_state(graphdef, params)
        return gist_fn(1, x)

Letters: N blocks, K children per block (32), D d_model, C internal width.
"""
from __future__ import annotations

import dataclasses
import operator
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.errors import ConfigError
from mc_jax.nets.nn import CrossBlock, SelfBlock, compute_dtype, rms_normalise

GistFn = Callable[[int, jax.Array], jax.Array]

_KINDS = ("gistnet", "mean_pool")


@dataclasses.dataclass(frozen=True)
class GistNetConfig:
    """Static GistNet configuration.

    d_model: base-model embedding width (input and output width).
    width: internal width C (512 in the reference design).
    heads: attention heads (width / heads must be even for RoPE).
    n_layers: self-attention blocks before the first pooling (SPEC: 2).
    n_refine_layers: self-attention blocks between the two poolings (the "attend again" step).
    mlp_ratio: MLP hidden width = mlp_ratio * width.
    block_size: K, children per gist (32).
    depth: number of gist levels the model can produce (levels 1..depth).
    share_weights_across_levels: one set of weights for every level (plus a per-level bias).
    embed_rms: RMS of the base model's token embeddings; the output scale at init.
    rope_base: RoPE base over the K local positions.
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters are always float32).
    kind: 'gistnet' (the attention network) or 'mean_pool' (the baseline).
    reader_rank: rank of the gist reader (0 = none): low-rank deltas on the base model's linear
      maps that apply at gist slots only (`base_model.forward(adapter=..., adapt_BxT=...)`), so
      the base learns to read gists while every token row is computed by the frozen base.
    reader_dims: (name, n_layers, in, out) of the adapted maps (`base_model.adapter_dims`).
    """

    d_model: int
    width: int = 512
    heads: int = 8
    n_layers: int = 2
    n_refine_layers: int = 1
    mlp_ratio: int = 4
    block_size: int = 32
    depth: int = 2
    share_weights_across_levels: bool = False
    embed_rms: float = 1.0
    rope_base: float = 10000.0
    dtype: str = "float32"
    kind: str = "gistnet"
    reader_rank: int = 0
    reader_dims: tuple = ()

    def __post_init__(self):
        compute_dtype(self.dtype)
        object.__setattr__(self, "reader_dims", tuple(tuple(d) for d in self.reader_dims))
        if self.reader_rank < 0 or (self.reader_rank and not self.reader_dims):
            raise ConfigError("GistNetConfig: reader_rank must be >= 0, and a reader needs "
                              "reader_dims (base_model.adapter_dims of the base parameters)")
        if self.kind not in _KINDS:
            raise ConfigError(f"GistNetConfig.kind {self.kind!r} is unknown; use one of {_KINDS}")
        if self.width % self.heads or (self.width // self.heads) % 2:
            raise ConfigError(f"GistNetConfig: width {self.width} / heads {self.heads} must be an "
                              "even integer head dim (RoPE); change width or heads")
        if self.depth < 1 or self.block_size < 1 or self.n_layers < 0 or self.n_refine_layers < 0:
            raise ConfigError("GistNetConfig: depth and block_size must be >= 1, layer counts >= 0")
        if not self.embed_rms > 0:
            raise ConfigError(f"GistNetConfig.embed_rms must be > 0, got {self.embed_rms}; pass "
                              "the RMS of the base model's token embeddings")

    @classmethod
    def tiny(cls, d_model: int = 64, embed_rms: float = 1.0, **overrides) -> "GistNetConfig":
        """For tests: a few thousand parameters per level."""
        kw = dict(width=32, heads=2, mlp_ratio=2)
        return cls(d_model=d_model, embed_rms=embed_rms, **{**kw, **overrides})

    @classmethod
    def small(cls, d_model: int = 576, embed_rms: float = 1.0, **overrides) -> "GistNetConfig":
        """For CPU experiments."""
        kw = dict(width=256, heads=4)
        return cls(d_model=d_model, embed_rms=embed_rms, **{**kw, **overrides})

    @classmethod
    def reference(cls, d_model: int = 576, embed_rms: float = 1.0, **overrides) -> "GistNetConfig":
        """The reference design (width 512)."""
        kw = dict(width=512, heads=8)
        return cls(d_model=d_model, embed_rms=embed_rms, **{**kw, **overrides})


def _scale_gain(cfg: GistNetConfig) -> nnx.Param:
    return nnx.Param(jnp.full((cfg.d_model,), cfg.embed_rms, jnp.float32))


class _GistCore(nnx.Module):
    """One level's weights: K vectors -> one vector (see the module docstring)."""

    def __init__(self, cfg: GistNetConfig, *, rngs: nnx.Rngs):
        dt = compute_dtype(cfg.dtype)
        self.cfg = cfg
        self.down = nnx.Linear(cfg.d_model, cfg.width, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        block = lambda: SelfBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dtype=dt, rngs=rngs)
        cross = lambda: CrossBlock(cfg.width, cfg.heads, cfg.mlp_ratio, dtype=dt, rngs=rngs)
        slot = lambda: nnx.Param(jax.random.normal(rngs.params(), (cfg.width,), jnp.float32))
        self.blocks = nnx.List([block() for _ in range(cfg.n_layers)])
        self.slot1 = slot()
        self.pool1 = cross()
        self.refine = nnx.List([block() for _ in range(cfg.n_refine_layers)])
        self.slot2 = slot()
        self.pool2 = cross()
        self.ln_out = nnx.LayerNorm(cfg.width, epsilon=1e-5, dtype=dt, param_dtype=jnp.float32,
                                    rngs=rngs)
        self.up = nnx.Linear(cfg.width, cfg.d_model, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.gain = _scale_gain(cfg)

    def __call__(self, x_xKxD: jax.Array, level_bias_C: jax.Array | None = None) -> jax.Array:
        cfg = self.cfg
        dt = compute_dtype(cfg.dtype)
        pos_K = jnp.arange(cfg.block_size)
        h_xKxC = self.down(x_xKxD.astype(dt))
        if level_bias_C is not None:
            h_xKxC = h_xKxC + level_bias_C.astype(dt)
        for blk in self.blocks:
            h_xKxC = blk(h_xKxC, positions_T=pos_K, rope_base=cfg.rope_base)
        slot_shape = (*h_xKxC.shape[:-2], 1, cfg.width)
        p1_x1xC = self.pool1(jnp.broadcast_to(self.slot1[...].astype(dt), slot_shape), h_xKxC)
        h_xKxC = h_xKxC + p1_x1xC
        for blk in self.refine:
            h_xKxC = blk(h_xKxC, positions_T=pos_K, rope_base=cfg.rope_base)
        p2_x1xC = self.pool2(jnp.broadcast_to(self.slot2[...].astype(dt), slot_shape), h_xKxC)
        p2_xC = p2_x1xC[..., 0, :]
        y_xD = self.up(self.ln_out(p2_xC))
        return rms_normalise(y_xD) * self.gain[...]


class _MeanCore(nnx.Module):
    """Baseline: mean over K -> Linear (identity at init) -> scale matching."""

    def __init__(self, cfg: GistNetConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        eye = lambda key, shape, dtype: jnp.eye(shape[0], shape[1], dtype=dtype)
        self.proj = nnx.Linear(cfg.d_model, cfg.d_model, kernel_init=eye,
                               dtype=compute_dtype(cfg.dtype), param_dtype=jnp.float32, rngs=rngs)
        self.gain = _scale_gain(cfg)

    def __call__(self, x_xKxD: jax.Array, level_bias_C: jax.Array | None = None) -> jax.Array:
        del level_bias_C
        mean_xD = jnp.mean(x_xKxD.astype(jnp.float32), axis=-2)
        y_xD = self.proj(mean_xD.astype(compute_dtype(self.cfg.dtype)))
        return rms_normalise(y_xD) * self.gain[...]


class _GistModel(nnx.Module):
    """Shared level handling for GistNet and MeanPoolGist."""

    _core_cls: type = _GistCore

    def __init__(self, config: GistNetConfig, *, rngs: nnx.Rngs):
        self.config = config
        n_cores = 1 if config.share_weights_across_levels else config.depth
        self.cores = nnx.List([self._core_cls(config, rngs=rngs) for _ in range(n_cores)])
        if self._uses_level_bias():
            self.level_bias = nnx.Param(jnp.zeros((config.depth, config.width), jnp.float32))
        if config.reader_rank:
            init = bm.init_adapter(config.reader_dims, config.reader_rank, rngs.params())
            self.reader = nnx.Dict({n: nnx.Dict({k: nnx.Param(v) for k, v in ab.items()})
                                    for n, ab in init.items()})

    def reader_adapter(self) -> dict | None:
        """The gist reader as `base_model.forward(adapter=...)` arrays, or None without one."""
        if not self.config.reader_rank:
            return None
        return {n: {k: self.reader[n][k][...] for k in ("a", "b")} for n in self.reader}

    def _uses_level_bias(self) -> bool:
        c = self.config
        return c.share_weights_across_levels and c.depth > 1 and self._core_cls is _GistCore

    def __call__(self, level: int, children_xKxD: jax.Array) -> jax.Array:
        """Gists of the level `level` (static int in [1, depth]) from [..., K, D] children."""
        cfg = self.config
        try:
            level = operator.index(level)
        except TypeError:
            raise TypeError(f"level must be a static Python int, got {type(level).__name__}; "
                            "mark it static under jit") from None
        if not 1 <= level <= cfg.depth:
            raise ValueError(f"level {level} is outside [1, depth={cfg.depth}]; raise "
                             "GistNetConfig.depth to produce higher levels")
        if children_xKxD.shape[-2:] != (cfg.block_size, cfg.d_model):
            raise ValueError(f"children must have shape [..., {cfg.block_size}, {cfg.d_model}] "
                             f"(block_size, d_model), got {children_xKxD.shape}")
        if cfg.share_weights_across_levels:
            bias = self.level_bias[level - 1] if self._uses_level_bias() else None
            return self.cores[0](children_xKxD, bias)
        return self.cores[level - 1](children_xKxD)


class GistNet(_GistModel):
    """Learned 32 -> 1 compressor: `gists_xD = GistNet(cfg, rngs=...)(level, children_xKxD)`."""

    _core_cls = _GistCore


class MeanPoolGist(_GistModel):
    """Baseline compressor with GistNet's interface: mean -> Linear (identity init) -> scale."""

    _core_cls = _MeanCore


def build_gist_model(config: GistNetConfig, *, rngs: nnx.Rngs) -> _GistModel:
    """GistNet or MeanPoolGist, chosen by `config.kind`."""
    return (GistNet if config.kind == "gistnet" else MeanPoolGist)(config, rngs=rngs)


def as_gist_fn(model: _GistModel) -> GistFn:
    """The tree's gist function `gist_fn(level, children_NxKxD) -> gists_NxD` for a live model."""

    def gist_fn(level: int, children_NxKxD: jax.Array) -> jax.Array:
        return model(level, children_NxKxD)

    return gist_fn


def gist_fn_from_state(graphdef: nnx.GraphDef, state: nnx.State) -> GistFn:
    """`as_gist_fn(nnx.merge(graphdef, state))`, for use inside jit.

    `(graphdef, state) = nnx.split(model)` outside; `state` is the traced argument.
    """
    return as_gist_fn(nnx.merge(graphdef, state))
