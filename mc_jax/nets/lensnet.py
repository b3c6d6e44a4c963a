"""LensNet: a Perceiver IO that scores every working-context entry with u in [-1, 1] (SPEC §2).

u > 0: the entry wants more detail (expand); u < 0: it can lose detail (collapse).

    entries_xExD --LN--down--> e_xExC, + metadata embeddings       (one token per WC entry)
    tail_xUxD    --LN--down--> t_xUxC, + learned tail-slot embedding
    z_xMxC = latents_MxC (+ prev_latents if config.incremental)
    z = CrossBlock(z, [e ; t], mask)                                  (encode: M x (E + U))
    z = SelfBlock(z) x n_latent_layers                                (M x M)
    y_xExC = CrossBlock(e, z)                                         (decode: E x M)
    u_xE = tanh(MLP(LN y)), 0 where the entry is masked
    delta_nll_xE = MLP'(LN y) (optional head, unbounded), 0 where masked

Every attention is entries x latents or latents x latents, so cost and memory grow linearly in E.
Masked entries are excluded as keys of the encoder, and each decoder query only sees the latents,
so a masked entry's vector or metadata cannot change any valid entry's score.

Metadata features (each an integer per entry, embedded by a learned table of width C and summed):
- level: 0 for a LOD0 block, l for a level-l gist; table of max_level + 1 rows (levels above
  max_level are clipped into the top row, so set max_level to the tree depth);
- span width in tokens, distance to the cursor in blocks, refocus steps since the last edit:
  log2 buckets, bucket(x) = 0 for x <= 0, else floor(log2 x) + 1 (1 -> 1, 2..3 -> 2, 4..7 -> 3,
  32 -> 6, 1024 -> 11), with the last of `n_log_buckets` buckets collecting everything larger.
  For an entry that was never edited pass a large value (e.g. 2**30): it lands in the top bucket.

Tail gists (newest top-level gist + 5 newest LOD1 gists) enter as extra encoder keys with their own
validity mask and a learned embedding per tail slot.

Question-aware inputs (issue 19; both off by default, so earlier checkpoints load unchanged):
- `n_match` > 0: per entry R = n_match float retrieval features (key-match scores of the base's
  attention from the query, lexical match; `mc_jax.eval.policies.lensq.match_features`), mapped
  by a Linear R -> C and added to the entry's token, so an entry's score can read its own match
  directly through the decoder's residual;
- `query`: the query's token vectors (e.g. the question's embeddings) [..., Q, D] with a mask
  enter as extra encoder keys beside the tail, with a learned query embedding.

Batching: every input may carry the same leading batch dims ("..."); no vmap is needed. A fully
masked row (no valid entry or tail gist) gives finite outputs (uniform attention), u = 0.

Letters: E entries, U tail gists (6), M latents, C d_lens, D d_model.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from mc_jax.errors import ConfigError
from mc_jax.nets.nn import CrossBlock, Mlp, SelfBlock, compute_dtype


@dataclasses.dataclass(frozen=True)
class LensNetConfig:
    """Static LensNet configuration.

    d_model: width of entry / tail vectors (the base model's embedding width).
    d_lens: internal width C.
    heads: attention heads.
    n_latents: M, size of the latent array.
    n_latent_layers: latent self-attention blocks after the encoder cross-attention.
    mlp_ratio: MLP hidden width = mlp_ratio * d_lens.
    n_tail: number of tail gists (SPEC: 6).
    max_level: highest entry level (the tree depth); level table has max_level + 1 rows.
    n_log_buckets: log2 buckets for span / distance / steps-since-edit.
    incremental: start from learned latents + the previous call's latents.
    delta_nll_head: also predict per-entry delta-NLL (unbounded) from the same decoder output.
    n_match: per-entry retrieval features read (0: none; see the module docstring).
    query: read the query's token vectors as extra encoder keys.
    dtype: compute dtype, 'float32' or 'bfloat16' (parameters are always float32).
    """

    d_model: int
    d_lens: int = 256
    heads: int = 4
    n_latents: int = 64
    n_latent_layers: int = 2
    mlp_ratio: int = 4
    n_tail: int = 6
    max_level: int = 2
    n_log_buckets: int = 32
    incremental: bool = False
    delta_nll_head: bool = False
    n_match: int = 0
    query: bool = False
    dtype: str = "float32"

    def __post_init__(self):
        compute_dtype(self.dtype)
        if self.d_lens % self.heads:
            raise ConfigError(f"LensNetConfig: d_lens {self.d_lens} is not divisible by heads "
                              f"{self.heads}")
        if self.n_match < 0:
            raise ConfigError(f"LensNetConfig: n_match must be >= 0, got {self.n_match}")
        if self.n_latents < 1 or self.n_tail < 0 or self.max_level < 1 or self.n_log_buckets < 2:
            raise ConfigError("LensNetConfig: need n_latents >= 1, n_tail >= 0, max_level >= 1, "
                              "n_log_buckets >= 2")

    @classmethod
    def tiny(cls, d_model: int = 64, **overrides) -> "LensNetConfig":
        """For tests."""
        kw = dict(d_lens=32, heads=2, n_latents=8, n_latent_layers=1, mlp_ratio=2)
        return cls(d_model=d_model, **{**kw, **overrides})

    @classmethod
    def small(cls, d_model: int = 576, **overrides) -> "LensNetConfig":
        """For CPU experiments."""
        kw = dict(d_lens=128, heads=4, n_latents=32, n_latent_layers=2)
        return cls(d_model=d_model, **{**kw, **overrides})

    @classmethod
    def reference(cls, d_model: int = 576, **overrides) -> "LensNetConfig":
        kw = dict(d_lens=256, heads=4, n_latents=64, n_latent_layers=3)
        return cls(d_model=d_model, **{**kw, **overrides})


@struct.dataclass
class LensNetOutput:
    """u_xE in [-1, 1] (0 where masked); delta_nll_xE or None; latents_xMxC for the next call."""

    u: jax.Array
    delta_nll: jax.Array | None
    latents: jax.Array


def log_bucket(x: jax.Array, n_buckets: int) -> jax.Array:
    """0 for x <= 0, else floor(log2 x) + 1, capped at n_buckets - 1. Exact on integers."""
    x = x.astype(jnp.int32)
    bits = 32 - jax.lax.clz(jnp.maximum(x, 1))  # floor(log2 x) + 1 for x >= 1
    return jnp.minimum(jnp.where(x <= 0, 0, bits), n_buckets - 1)


class LensNet(nnx.Module):
    """Perceiver IO scorer; see the module docstring."""

    def __init__(self, config: LensNetConfig, *, rngs: nnx.Rngs):
        c = config
        dt = compute_dtype(c.dtype)
        self.config = c
        self.ln_in = nnx.LayerNorm(c.d_model, epsilon=1e-5, dtype=dt, param_dtype=jnp.float32,
                                   rngs=rngs)
        self.down = nnx.Linear(c.d_model, c.d_lens, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        emb = lambda n: nnx.Embed(n, c.d_lens, dtype=dt, param_dtype=jnp.float32, rngs=rngs)
        self.level_emb = emb(c.max_level + 1)
        self.span_emb = emb(c.n_log_buckets)
        self.distance_emb = emb(c.n_log_buckets)
        self.since_edit_emb = emb(c.n_log_buckets)
        init = nnx.initializers.normal(0.02)
        self.tail_emb = nnx.Param(init(rngs.params(), (max(c.n_tail, 1), c.d_lens), jnp.float32))
        self.latents = nnx.Param(init(rngs.params(), (c.n_latents, c.d_lens), jnp.float32))
        self.encoder = CrossBlock(c.d_lens, c.heads, c.mlp_ratio, dtype=dt, rngs=rngs)
        self.processor = nnx.List([SelfBlock(c.d_lens, c.heads, c.mlp_ratio, dtype=dt, rngs=rngs)
                                   for _ in range(c.n_latent_layers)])
        self.decoder = CrossBlock(c.d_lens, c.heads, c.mlp_ratio, dtype=dt, rngs=rngs)
        ln = lambda: nnx.LayerNorm(c.d_lens, epsilon=1e-5, dtype=dt, param_dtype=jnp.float32,
                                   rngs=rngs)
        self.ln_u = ln()
        self.u_head = Mlp(c.d_lens, c.d_lens, out=1, dtype=dt, rngs=rngs)
        if c.delta_nll_head:
            self.ln_delta = ln()
            self.delta_head = Mlp(c.d_lens, c.d_lens, out=1, dtype=dt, rngs=rngs)
        if c.n_match:
            self.match_in = nnx.Linear(c.n_match, c.d_lens, dtype=dt, param_dtype=jnp.float32,
                                       rngs=rngs)
        if c.query:
            self.query_emb = nnx.Param(init(rngs.params(), (1, c.d_lens), jnp.float32))

    def __call__(self, entries_xExD: jax.Array, entry_mask_xE: jax.Array, *,
                 level_xE: jax.Array, span_xE: jax.Array, distance_xE: jax.Array,
                 since_edit_xE: jax.Array, tail_xUxD: jax.Array, tail_mask_xU: jax.Array,
                 prev_latents_xMxC: jax.Array | None = None, match_xExR: jax.Array | None = None,
                 query_xQxD: jax.Array | None = None,
                 query_mask_xQ: jax.Array | None = None) -> LensNetOutput:
        """Scores E entries; per-entry arrays have the shape of `entries_xExD[..., 0]`."""
        c = self.config
        self._check_shapes(entries_xExD, entry_mask_xE, level_xE, span_xE, distance_xE,
                           since_edit_xE, tail_xUxD, tail_mask_xU, prev_latents_xMxC)
        self._check_query(entries_xExD, match_xExR, query_xQxD, query_mask_xQ)
        dt = compute_dtype(c.dtype)
        batch = entries_xExD.shape[:-2]
        entry_mask_xE = entry_mask_xE.astype(bool)
        tail_mask_xU = tail_mask_xU.astype(bool)

        meta_xExC = (self.level_emb(jnp.clip(level_xE, 0, c.max_level))
                     + self.span_emb(log_bucket(span_xE, c.n_log_buckets))
                     + self.distance_emb(log_bucket(distance_xE, c.n_log_buckets))
                     + self.since_edit_emb(log_bucket(since_edit_xE, c.n_log_buckets)))
        e_xExC = self.down(self.ln_in(entries_xExD.astype(dt))) + meta_xExC.astype(dt)
        if c.n_match:
            e_xExC = e_xExC + self.match_in(match_xExR.astype(dt))
        t_xUxC = self.down(self.ln_in(tail_xUxD.astype(dt))) + self.tail_emb[: c.n_tail].astype(dt)
        kv, kv_mask = [e_xExC, t_xUxC], [entry_mask_xE, tail_mask_xU]
        if c.query:
            kv.append(self.down(self.ln_in(query_xQxD.astype(dt))) + self.query_emb[...].astype(dt))
            kv_mask.append(query_mask_xQ.astype(bool))
        kv_xSxC = jnp.concatenate(kv, axis=-2)
        kv_mask_xS = jnp.concatenate(kv_mask, axis=-1)

        z_xMxC = jnp.broadcast_to(self.latents[...], (*batch, c.n_latents, c.d_lens))
        if prev_latents_xMxC is not None:
            z_xMxC = z_xMxC + prev_latents_xMxC.astype(jnp.float32)
        z_xMxC = self.encoder(z_xMxC.astype(dt), kv_xSxC, kv_mask_xS=kv_mask_xS)
        for blk in self.processor:
            z_xMxC = blk(z_xMxC)

        y_xExC = self.decoder(e_xExC, z_xMxC)
        u_xE = jnp.tanh(self.u_head(self.ln_u(y_xExC))[..., 0].astype(jnp.float32))
        u_xE = jnp.where(entry_mask_xE, u_xE, 0.0)
        delta_xE = None
        if c.delta_nll_head:
            delta_xE = self.delta_head(self.ln_delta(y_xExC))[..., 0].astype(jnp.float32)
            delta_xE = jnp.where(entry_mask_xE, delta_xE, 0.0)
        return LensNetOutput(u=u_xE, delta_nll=delta_xE, latents=z_xMxC.astype(jnp.float32))

    def _check_query(self, entries, match, query, query_mask):
        c = self.config
        if (match is not None) != bool(c.n_match):
            raise ConfigError(f"LensNetConfig.n_match is {c.n_match}: pass match_xExR "
                              f"[..., E, {c.n_match}] exactly when n_match > 0")
        if match is not None and match.shape != (*entries.shape[:-1], c.n_match):
            raise ValueError(f"match_xExR must be {(*entries.shape[:-1], c.n_match)}, got "
                             f"{match.shape}")
        if (query is not None) != c.query or (query_mask is not None) != c.query:
            raise ConfigError(f"LensNetConfig.query is {c.query}: pass query_xQxD and "
                              "query_mask_xQ exactly when it is True")
        if query is not None:
            if query.shape[:-2] != entries.shape[:-2] or query.shape[-1] != c.d_model \
                    or query_mask.shape != query.shape[:-1]:
                raise ValueError(f"query must be [..., Q, d_model={c.d_model}] with the entries' "
                                 f"batch dims {entries.shape[:-2]} and a mask [..., Q]; got "
                                 f"{query.shape} and {query_mask.shape}")

    def _check_shapes(self, entries, entry_mask, level, span, distance, since_edit, tail, tail_mask,
                      prev_latents):
        c = self.config
        if entries.ndim < 2 or entries.shape[-1] != c.d_model:
            raise ValueError(f"entries must be [..., E, d_model={c.d_model}], got {entries.shape}")
        lead_e = entries.shape[:-1]
        for name, a in (("entry_mask", entry_mask), ("level", level), ("span", span),
                        ("distance", distance), ("since_edit", since_edit)):
            if a.shape != lead_e:
                raise ValueError(f"{name} must have shape {lead_e} (entries without d_model), "
                                 f"got {a.shape}")
        want_tail = (*entries.shape[:-2], c.n_tail, c.d_model)
        if tail.shape != want_tail or tail_mask.shape != want_tail[:-1]:
            raise ValueError(f"tail gists must be {want_tail} with mask {want_tail[:-1]} "
                             f"(n_tail={c.n_tail}), got {tail.shape} and {tail_mask.shape}")
        if prev_latents is not None:
            if not c.incremental:
                raise ConfigError("prev_latents was passed but LensNetConfig.incremental is False; "
                                  "set incremental=True or pass prev_latents=None")
            want = (*entries.shape[:-2], c.n_latents, c.d_lens)
            if prev_latents.shape != want:
                raise ValueError(f"prev_latents must be {want}, got {prev_latents.shape}")


def initial_latents(config: LensNetConfig, batch_shape: tuple[int, ...] = ()) -> jax.Array:
    """Zero previous latents, for the first call of an incremental LensNet (fixed shape)."""
    return jnp.zeros((*batch_shape, config.n_latents, config.d_lens), jnp.float32)
