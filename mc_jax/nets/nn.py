"""Small Flax NNX building blocks shared by GistNet and LensNet.

Pre-LayerNorm transformer pieces: multi-head attention (optionally with rotate-half RoPE over
local positions, optionally with a key-validity mask), a GELU MLP, a self-attention block and a
cross-attention block. Every op takes arbitrary leading batch dims ("..."), so a caller can feed
[N, K, C] blocks or [B, E, C] entries without vmap.

Parameters are always float32; `dtype` is the compute dtype (float32 or bfloat16). Attention
logits and softmax are computed in float32 whatever the compute dtype.

Letters: T query positions, S key positions, H heads, F head dim, C width.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mc_jax.errors import ConfigError

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# Finite, so a query whose keys are all masked attends uniformly instead of producing NaN.
_MASK_VALUE = -1e30


def compute_dtype(name: str):
    """Maps a config dtype name ('float32' | 'bfloat16') to a jnp dtype."""
    if name not in _DTYPES:
        raise ConfigError(f"dtype {name!r} is not supported; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def apply_rope(x_xTxHxF: jax.Array, positions_T: jax.Array, base: float) -> jax.Array:
    """Rotate-half RoPE: pairs channel i with channel i + F/2."""
    f = x_xTxHxF.shape[-1]
    if f % 2:
        raise ConfigError(f"RoPE needs an even head dim, got {f}; pick width/heads even")
    inv_freq_F2 = base ** (-jnp.arange(0, f, 2, dtype=jnp.float32) / f)
    ang_TxF2 = positions_T.astype(jnp.float32)[:, None] * inv_freq_F2[None, :]
    cos_Tx1xF2 = jnp.cos(ang_TxF2)[:, None, :]
    sin_Tx1xF2 = jnp.sin(ang_TxF2)[:, None, :]
    x = x_xTxHxF.astype(jnp.float32)
    x1, x2 = x[..., : f // 2], x[..., f // 2:]
    out = jnp.concatenate([x1 * cos_Tx1xF2 - x2 * sin_Tx1xF2,
                           x2 * cos_Tx1xF2 + x1 * sin_Tx1xF2], axis=-1)
    return out.astype(x_xTxHxF.dtype)


class Attention(nnx.Module):
    """Multi-head attention from queries of width C to keys/values of width `kv_width`."""

    def __init__(self, width: int, heads: int, *, kv_width: int | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        if width % heads:
            raise ConfigError(f"width {width} is not divisible by heads {heads}")
        kv_width = width if kv_width is None else kv_width
        self.heads = heads
        self.head_dim = width // heads
        self.dtype = dtype
        lin = lambda i, o: nnx.Linear(i, o, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.q = lin(width, width)
        self.k = lin(kv_width, width)
        self.v = lin(kv_width, width)
        self.o = lin(width, width)

    def __call__(self, q_xTxC: jax.Array, kv_xSxC: jax.Array, *,
                 kv_mask_xS: jax.Array | None = None,
                 q_positions_T: jax.Array | None = None, kv_positions_S: jax.Array | None = None,
                 rope_base: float = 10000.0) -> jax.Array:
        split = lambda y: y.reshape(*y.shape[:-1], self.heads, self.head_dim)
        q_xTxHxF = split(self.q(q_xTxC))
        k_xSxHxF = split(self.k(kv_xSxC))
        v_xSxHxF = split(self.v(kv_xSxC))
        if q_positions_T is not None:
            q_xTxHxF = apply_rope(q_xTxHxF, q_positions_T, rope_base)
            k_xSxHxF = apply_rope(k_xSxHxF, kv_positions_S, rope_base)
        logits_xHxTxS = jnp.einsum("...thf,...shf->...hts", q_xTxHxF, k_xSxHxF,
                                   preferred_element_type=jnp.float32) / jnp.sqrt(self.head_dim)
        if kv_mask_xS is not None:
            logits_xHxTxS = jnp.where(kv_mask_xS[..., None, None, :], logits_xHxTxS, _MASK_VALUE)
        probs_xHxTxS = jax.nn.softmax(logits_xHxTxS, axis=-1).astype(self.dtype)
        out_xTxHxF = jnp.einsum("...hts,...shf->...thf", probs_xHxTxS, v_xSxHxF.astype(self.dtype))
        return self.o(out_xTxHxF.reshape(*out_xTxHxF.shape[:-2], -1))


class Mlp(nnx.Module):
    """Linear -> GELU -> Linear."""

    def __init__(self, width: int, hidden: int, *, out: int | None = None, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.up = nnx.Linear(width, hidden, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)
        self.down = nnx.Linear(hidden, width if out is None else out, dtype=dtype,
                               param_dtype=jnp.float32, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.gelu(self.up(x)))


def _layer_norm(width: int, dtype, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(width, epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, rngs=rngs)


class SelfBlock(nnx.Module):
    """Pre-LN bidirectional self-attention block: x + Attn(LN x), then + MLP(LN x)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.ln_attn = _layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.ln_mlp = _layer_norm(width, dtype, rngs)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

    def __call__(self, x_xTxC: jax.Array, *, mask_xT: jax.Array | None = None,
                 positions_T: jax.Array | None = None, rope_base: float = 10000.0) -> jax.Array:
        h = self.ln_attn(x_xTxC)
        x_xTxC = x_xTxC + self.attn(h, h, kv_mask_xS=mask_xT, q_positions_T=positions_T,
                                    kv_positions_S=positions_T, rope_base=rope_base)
        return x_xTxC + self.mlp(self.ln_mlp(x_xTxC))


class CrossBlock(nnx.Module):
    """Pre-LN cross-attention block: q + Attn(LN q, LN kv), then + MLP(LN q)."""

    def __init__(self, width: int, heads: int, mlp_ratio: int = 4, *, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.ln_q = _layer_norm(width, dtype, rngs)
        self.ln_kv = _layer_norm(width, dtype, rngs)
        self.attn = Attention(width, heads, dtype=dtype, rngs=rngs)
        self.ln_mlp = _layer_norm(width, dtype, rngs)
        self.mlp = Mlp(width, mlp_ratio * width, dtype=dtype, rngs=rngs)

    def __call__(self, q_xTxC: jax.Array, kv_xSxC: jax.Array, *,
                 kv_mask_xS: jax.Array | None = None) -> jax.Array:
        q_xTxC = q_xTxC + self.attn(self.ln_q(q_xTxC), self.ln_kv(kv_xSxC), kv_mask_xS=kv_mask_xS)
        return q_xTxC + self.mlp(self.ln_mlp(q_xTxC))


def rms_normalise(x_xD: jax.Array, eps: float = 1e-6) -> jax.Array:
    """x / RMS(x) over the last axis, in float32."""
    x = x_xD.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def count_params(module: nnx.Module) -> int:
    """Number of scalar parameters (nnx.Param leaves) in a module."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(module, nnx.Param)))
