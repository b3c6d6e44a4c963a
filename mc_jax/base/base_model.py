"""The frozen base LLM: a Llama-family decoder as pure functions over a parameter pytree.

RMSNorm, rotate-half RoPE (configurable base, optional Gaussian damping per position), grouped-query
attention, SwiGLU, tied or untied output. One forward takes token ids or input embeddings, explicit
positions, a validity mask and an optional fixed-size KV cache, so the same function serves
prefill, K-token and single-token decode steps, and the working context's mix of tokens and gists.

The parameters are a plain dict pytree (layers stacked on a leading axis and run with `lax.scan`,
so compile time does not grow with depth). They are never differentiated or donated by mc_jax.

Shape letters: B batch, T new positions, S cache slots, D d_model, V vocab, L layers,
N query heads, G kv heads, F head dim, M ffn width.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.errors import CapacityError, ConfigError, TokenError

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Static architecture of a Llama-family decoder."""

    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_base: float = 10000.0
    rms_eps: float = 1e-5
    tie_embeddings: bool = True
    max_seq_len: int = 8192
    bos_id: int | None = None
    eos_id: int | None = None
    name: str = "llama"

    def __post_init__(self):
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"n_heads={self.n_heads} is not a multiple of n_kv_heads={self.n_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim={self.head_dim} must be even for RoPE")

    @classmethod
    def tiny(cls, **overrides) -> "LlamaConfig":
        """2 layers, d=64: the random model unit tests use."""
        kw = dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16,
                  ffn_dim=128, rope_base=10000.0, max_seq_len=4096, name="tiny")
        kw.update(overrides)
        return cls(**kw)


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.float32) -> Params:
    """Random parameters (for tests and tiny configs)."""
    D, L, N, G, F, M, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.ffn_dim, cfg.vocab_size)
    ks = jax.random.split(key, 9)

    def normal(k, shape, fan_in):
        return (jax.random.normal(k, shape, jnp.float32) / np.sqrt(fan_in)).astype(dtype)

    params = {
        "embed": normal(ks[0], (V, D), 1.0) * 0.5,
        "layers": {
            "attn_norm": jnp.ones((L, D), dtype),
            "wq": normal(ks[1], (L, D, N * F), D),
            "wk": normal(ks[2], (L, D, G * F), D),
            "wv": normal(ks[3], (L, D, G * F), D),
            "wo": normal(ks[4], (L, N * F, D), N * F),
            "ffn_norm": jnp.ones((L, D), dtype),
            "w_gate": normal(ks[5], (L, D, M), D),
            "w_up": normal(ks[6], (L, D, M), D),
            "w_down": normal(ks[7], (L, M, D), M),
        },
        "final_norm": jnp.ones((D,), dtype),
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = normal(ks[8], (D, V), D)
    return params


def cast_params(params: Params, dtype) -> Params:
    """Cast every floating leaf (bf16 compute: cast once, not per call)."""
    return jax.tree.map(lambda p: p.astype(dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                        params)


def param_shapes(cfg: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Expected shape of every leaf, flattened with '/' (used to validate loaded weights)."""
    D, L, N, G, F, M, V = (cfg.d_model, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                           cfg.ffn_dim, cfg.vocab_size)
    shapes = {
        "embed": (V, D), "final_norm": (D,),
        "layers/attn_norm": (L, D), "layers/wq": (L, D, N * F), "layers/wk": (L, D, G * F),
        "layers/wv": (L, D, G * F), "layers/wo": (L, N * F, D), "layers/ffn_norm": (L, D),
        "layers/w_gate": (L, D, M), "layers/w_up": (L, D, M), "layers/w_down": (L, M, D),
    }
    if not cfg.tie_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


@flax.struct.dataclass
class KVCache:
    """Fixed-size KV cache: slot s holds the rotated key/value of the s-th cached position.

    k, v: [L, B, S, G, F]; valid_BxS marks filled slots. Slot order is attention order (a slot
    attends to valid slots at or before it); RoPE positions are whatever the caller passed.
    """

    k: jax.Array
    v: jax.Array
    valid_BxS: jax.Array

    @property
    def size(self) -> int:
        return self.k.shape[2]


def init_cache(cfg: LlamaConfig, batch: int, size: int, dtype=jnp.float32) -> KVCache:
    if size > cfg.max_seq_len:
        raise CapacityError(
            f"KV cache of {size} slots exceeds the model's context of {cfg.max_seq_len}; "
            "use a smaller budget or a model with a longer context")
    shape = (cfg.n_layers, batch, size, cfg.n_kv_heads, cfg.head_dim)
    return KVCache(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   valid_BxS=jnp.zeros((batch, size), bool))


def rms_norm(x, w, eps):
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * w.astype(jnp.float32)).astype(x.dtype)


def rope_tables(positions_BxT, sigma_BxT, head_dim: int, base: float):
    """cos/sin tables [B, T, F/2], Gaussian-damped by exp(-(w*sigma)^2/2) per frequency w."""
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)  # [F/2]
    angle = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    if sigma_BxT is not None:
        damp = jnp.exp(-0.5 * (inv_freq * sigma_BxT.astype(jnp.float32)[..., None]) ** 2)
        cos, sin = cos * damp, sin * damp
    return cos, sin


def apply_rope(x_BxTxNxF, cos_BxTxF2, sin_BxTxF2):
    """Rotate-half RoPE: pairs (i, i + F/2)."""
    half = x_BxTxNxF.shape[-1] // 2
    x1, x2 = x_BxTxNxF[..., :half].astype(jnp.float32), x_BxTxNxF[..., half:].astype(jnp.float32)
    c, s = cos_BxTxF2[:, :, None, :], sin_BxTxF2[:, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x_BxTxNxF.dtype)


def embed_tokens(params: Params, ids) -> jax.Array:
    return jnp.take(params["embed"], ids, axis=0)


def embedding_rms(params: Params) -> float:
    """RMS norm of the token embeddings: GistNet matches its output scale to this."""
    e = np.asarray(params["embed"], np.float32)
    return float(np.sqrt(np.mean(np.sum(e * e, axis=-1))))


def _attend(q_BxTxNxF, k_BxSxGxF, v_BxSxGxF, mask_BxTxS):
    return jax.nn.dot_product_attention(q_BxTxNxF, k_BxSxGxF, v_BxSxGxF,
                                        mask=mask_BxTxS[:, None, :, :])


def _attend_chunked(q_BxTxNxF, k_BxTxGxF, v_BxTxGxF, valid_BxT, chunk: int):
    """Causal attention over T inputs (no cache), `chunk` queries at a time: each chunk's
    [chunk, T] scores exist only inside its step and are recomputed for the backward pass
    (`jax.checkpoint`), so memory is O(T * chunk) instead of O(T^2). The queries are padded to
    a multiple of chunk (the padding rows' outputs are dropped)."""
    B, T, N, F = q_BxTxNxF.shape
    n = -(-T // chunk)
    q = jnp.pad(q_BxTxNxF, ((0, 0), (0, n * chunk - T), (0, 0), (0, 0)))
    q_nxBxCxNxF = q.reshape(B, n, chunk, N, F).swapaxes(0, 1)

    @jax.checkpoint
    def one(args):
        i, q = args
        rows_C = i * chunk + jnp.arange(chunk)
        mask = (jnp.arange(T)[None, :] <= rows_C[:, None])[None] & valid_BxT[:, None, :]
        return _attend(q, k_BxTxGxF, v_BxTxGxF, mask)

    out = jax.lax.map(one, (jnp.arange(n), q_nxBxCxNxF))
    return out.swapaxes(0, 1).reshape(B, n * chunk, N, F)[:, :T]


def forward(params: Params, cfg: LlamaConfig, inputs, positions_BxT, *, valid_BxT=None,
            sigma_BxT=None, cache: KVCache | None = None, cache_index=None,
            return_hidden: bool = False, adapter=None, adapt_BxT=None,
            capture_qk: int | None = None, remat: bool = False, attn_chunk: int | None = None):
    """Run the decoder.

    inputs: token ids [B, T] (int) or input embeddings [B, T, D] (float).
    positions_BxT: RoPE positions (int or float; gists may sit at a span centre).
    valid_BxT: False marks padding; padding never influences valid positions.
    sigma_BxT: Gaussian RoPE damping width per position (0 = plain RoPE).
    cache, cache_index: write the T new keys/values at slots [cache_index, cache_index + T) and
      attend to every valid slot at or before each query's slot. Without a cache, plain causal
      attention over the T inputs.
    adapter, adapt_BxT: optional low-rank deltas (see `init_adapter`) added to the listed linear
      maps at the rows where adapt_BxT is True only (the gist slots). Rows where it is False are
      computed exactly as without an adapter, so a context with no gists is the frozen base.
      adapt_BxT is ignored without an adapter.
    capture_qk: an int n runs only the first n layers (without a cache) and returns their queries
      and keys before RoPE, (q [n, B, T, N, F], k [n, B, T, G, F]) (`layer_qk`).
    remat, attn_chunk (training memory; the values are the same): remat recomputes each layer
      in the backward pass instead of keeping its activations (`jax.checkpoint` per layer; only
      the layers' inputs are kept); attn_chunk=c computes causal attention c queries at a time
      when there is no cache and T > c (`_attend_chunked`), so no [T, T] score matrix is ever
      whole.
    Returns (logits_BxTxV float32, new cache or None) — or the final hidden states instead of the
    logits when return_hidden.
    """
    if jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer):
        x_BxTxD = embed_tokens(params, inputs)
    else:
        x_BxTxD = inputs.astype(params["embed"].dtype)
    B, T, _ = x_BxTxD.shape
    N, G, F = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if valid_BxT is None:
        valid_BxT = jnp.ones((B, T), bool)
    cos, sin = rope_tables(positions_BxT, sigma_BxT, F, cfg.rope_base)

    chunked = cache is None and attn_chunk is not None and 0 < attn_chunk < T
    if cache is None:
        mask_BxTxS = None if chunked else (jnp.tril(jnp.ones((T, T), bool))[None]
                                           & valid_BxT[:, None, :])
        cache_valid_BxS = None
    else:
        S = cache.size
        idx = jnp.asarray(0 if cache_index is None else cache_index, jnp.int32)
        cache_valid_BxS = jax.lax.dynamic_update_slice(cache.valid_BxS, valid_BxT, (0, idx))
        slot_q_T = idx + jnp.arange(T)
        causal_TxS = jnp.arange(S)[None, :] <= slot_q_T[:, None]
        mask_BxTxS = causal_TxS[None] & cache_valid_BxS[:, None, :]
    # A fully masked (padding) row gets a finite uniform softmax in dot_product_attention: no NaN.
    lp = params["layers"]
    if adapter is not None:
        if adapt_BxT is None:
            raise ValueError("an adapter needs adapt_BxT (which rows it applies to)")
        lp = {**lp, "adapter": adapter}
        gate_BxTx1 = adapt_BxT[..., None].astype(x_BxTxD.dtype)

    def lin(name, h, w):
        y = jnp.einsum("btd,de->bte", h, w[name])
        ad = w.get("adapter", {}).get(name)
        if ad is not None:
            delta = jnp.einsum("btr,re->bte", jnp.einsum("btd,dr->btr", h, ad["a"].astype(h.dtype)),
                               ad["b"].astype(h.dtype))
            y = y + gate_BxTx1 * delta
        return y

    def layer(x, inputs_l, capture=False):
        w, k_cache_l, v_cache_l = inputs_l
        h = rms_norm(x, w["attn_norm"], cfg.rms_eps)
        q = lin("wq", h, w)
        k = lin("wk", h, w)
        v = lin("wv", h, w)
        if "bq" in w:  # Qwen2-style attention bias
            q, k, v = q + w["bq"], k + w["bk"], v + w["bv"]
        q, k, v = q.reshape(B, T, N, F), k.reshape(B, T, G, F), v.reshape(B, T, G, F)
        if "q_norm" in w:  # Qwen3-style per-head q/k RMSNorm
            q, k = rms_norm(q, w["q_norm"], cfg.rms_eps), rms_norm(k, w["k_norm"], cfg.rms_eps)
        pre_qk = (q, k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if k_cache_l is not None:
            k_all = jax.lax.dynamic_update_slice(k_cache_l, k.astype(k_cache_l.dtype), (0, idx, 0, 0))
            v_all = jax.lax.dynamic_update_slice(v_cache_l, v.astype(v_cache_l.dtype), (0, idx, 0, 0))
        else:
            k_all, v_all = k, v
        if chunked:
            att = _attend_chunked(q, k_all.astype(q.dtype), v_all.astype(q.dtype), valid_BxT,
                                  int(attn_chunk))
        else:
            att = _attend(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask_BxTxS)
        x = x + lin("wo", att.reshape(B, T, N * F), w)
        h = rms_norm(x, w["ffn_norm"], cfg.rms_eps)
        gate = lin("w_gate", h, w)
        up = lin("w_up", h, w)
        x = x + lin("w_down", jax.nn.silu(gate) * up, w)
        if capture:
            return x, pre_qk
        return x, (k_all, v_all) if k_cache_l is not None else None

    if capture_qk is not None:  # the first capture_qk layers only, their pre-RoPE q and k
        lp_n = jax.tree.map(lambda a: a[:capture_qk], lp)
        _, qk = jax.lax.scan(lambda x, w: layer(x, (w, None, None), True), x_BxTxD, lp_n)
        return qk
    if cache is None:
        body = lambda x, w: layer(x, (w, None, None))  # noqa: E731
        x_BxTxD, _ = jax.lax.scan(jax.checkpoint(body) if remat else body, x_BxTxD, lp)
        new_cache = None
    else:
        x_BxTxD, (k_new, v_new) = jax.lax.scan(layer, x_BxTxD, (lp, cache.k, cache.v))
        new_cache = KVCache(k=k_new, v=v_new, valid_BxS=cache_valid_BxS)
    h_BxTxD = rms_norm(x_BxTxD, params["final_norm"], cfg.rms_eps)
    if return_hidden:
        return h_BxTxD, new_cache
    return lm_head(params, cfg, h_BxTxD), new_cache


def layer_qk(params: Params, cfg: LlamaConfig, ids_BxT, positions_BxT, n_layers: int,
             valid_BxT=None):
    """Queries and keys before RoPE of the first `n_layers` layers for token ids [B, T] at the
    given positions (causal attention over the T inputs): (q [n, B, T, N, F], k [n, B, T, G, F]).
    The retrieval features read them (`mc_jax.eval.policies.retrieve`)."""
    if not 1 <= int(n_layers) <= cfg.n_layers:
        raise ValueError(f"n_layers must be in [1, {cfg.n_layers}], got {n_layers}")
    return forward(params, cfg, ids_BxT, positions_BxT, valid_BxT=valid_BxT,
                   capture_qk=int(n_layers))


def lm_head(params: Params, cfg: LlamaConfig, h_xD):
    """Logits (float32) of final-norm hidden states of any leading shape [..., D] -> [..., V]:
    the tied embedding or the separate output matrix. The one output head of the package."""
    head = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    return jnp.einsum("...d,dv->...v", h_xD, head.astype(h_xD.dtype),
                      preferred_element_type=jnp.float32)


def token_nll(logits_BxTxV, targets_BxT):
    """Per-position negative log-likelihood (float32)."""
    logp = jax.nn.log_softmax(logits_BxTxV.astype(jnp.float32), axis=-1)
    return -jnp.take_along_axis(logp, targets_BxT[..., None], axis=-1)[..., 0]


ADAPTER_TARGETS = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


def adapter_dims(params: Params, targets=ADAPTER_TARGETS) -> tuple[tuple[str, int, int, int], ...]:
    """(name, n_layers, in, out) of each adaptable linear map of a base model's parameters."""
    lp = params["layers"]
    missing = [t for t in targets if t not in lp]
    if missing:
        raise ValueError(f"adapter targets {missing} are not linear maps of this base model "
                         f"(it has {sorted(lp)})")
    return tuple((t, *map(int, lp[t].shape)) for t in targets)


def init_adapter(dims, rank: int, key: jax.Array) -> dict:
    """Low-rank deltas {name: {"a": [L, in, r], "b": [L, r, out]}} for `forward(adapter=...)`:
    a ~ N(0, 1/in), b = 0, so a fresh adapter changes nothing."""
    keys = jax.random.split(key, len(dims))
    return {n: {"a": jax.random.normal(k, (L, i, rank), jnp.float32) / np.sqrt(i),
                "b": jnp.zeros((L, rank, o), jnp.float32)}
            for k, (n, L, i, o) in zip(keys, dims)}


def check_token_ids(ids, cfg: LlamaConfig) -> np.ndarray:
    """Host-side check: integer dtype and every id in [0, vocab). Returns an int32 array."""
    arr = np.asarray(ids)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TokenError(f"token ids must be integers, got dtype {arr.dtype}")
    if arr.size and (arr.min() < 0 or arr.max() >= cfg.vocab_size):
        bad = arr[(arr < 0) | (arr >= cfg.vocab_size)].ravel()[:5].tolist()
        raise TokenError(
            f"token id(s) {bad} outside the vocabulary [0, {cfg.vocab_size}) of model "
            f"'{cfg.name}': the ids come from a different tokenizer or are corrupt")
    return arr.astype(np.int32)


@functools.partial(jax.jit, static_argnames=("cfg",))
def logits_fn(params: Params, cfg: LlamaConfig, ids_BxT, valid_BxT=None):
    """Jitted plain causal forward from token ids with positions 0..T-1."""
    B, T = ids_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    return forward(params, cfg, ids_BxT, pos, valid_BxT=valid_BxT)[0]
