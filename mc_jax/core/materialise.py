"""A working context as base-model input: each entry's data gathered from the tree, then one
embedding and position per slot (SPEC section 2, "Materialising the WC").

`gather_entries` reads what each entry shows from a device tree (`tree_store.HostTree.gather`
does the same from host memory or disk); `materialise` turns that into embeddings, positions
(compact or global), Gaussian-RoPE sigma and masks for W slots.

Letters: E entry rows, K block size, D d_model, W slots (the budget).
"""

from __future__ import annotations

from typing import Callable

import flax.struct
import jax
import jax.numpy as jnp

from mc_jax.core.working_context import MODES, WCConfig, WorkingContext, entry_spans


@flax.struct.dataclass
class EntryData:
    """What each entry needs from the tree: paged in from device or host memory."""

    tokens_ExK: jax.Array  # int32; a LOD0 entry's block ids (zeros elsewhere)
    vec_ExD: jax.Array  # a gist's vector; a complete LOD0 block's LOD1 gist; zeros otherwise



@flax.struct.dataclass
class Materialised:
    x_WxD: jax.Array  # base-model input embeddings; zeros in invalid slots
    pos_W: jax.Array  # int32 positions (compact or global mode); 0 in invalid slots
    sigma_W: jax.Array  # float32 Gaussian-RoPE sigma: span width (tokens) for gists, 0 for LOD0
    valid_W: jax.Array  # bool
    slot_entry_W: jax.Array  # int32 entry of each slot, -1 when invalid
    entry_first_slot_E: jax.Array  # int32 first slot of each entry (= total cost when empty)
    level_E: jax.Array  # int32 per-entry metadata for LensNet ...
    span_E: jax.Array  # int32 tokens covered (the open block: its length)
    dist_E: jax.Array  # int32 cursor block - entry's last block (open block 0)
    age_E: jax.Array  # int32 steps since last edit
    valid_E: jax.Array  # bool



def gather_entries(wc: WorkingContext, tree, cfg: WCConfig) -> EntryData:
    """Device gather of each entry's tokens / vector from a device `mc_jax.core.tree.Tree`.

    Cost is E_max * (K + depth * D), independent of the tree's capacity.
    """
    K = cfg.block_size
    tok = tree.tokens_T
    is_tok = wc.valid_E & (wc.level_E == 0)
    # rows an entry does not need read index 0, so memory traffic is only what the WC shows
    idx_ExK = jnp.where(is_tok, wc.node_E, 0)[:, None] * K + jnp.arange(K)[None, :]
    tokens = jnp.where(is_tok[:, None], tok[jnp.clip(idx_ExK, 0, tok.shape[0] - 1)], 0)
    complete_block = is_tok & (wc.node_E < wc.num_tokens // K)
    view_level = jnp.where(wc.level_E == 0, 1, wc.level_E)
    vec = jnp.zeros((cfg.max_entries, tree.gists[0].shape[1]), tree.gists[0].dtype)
    for l in range(1, cfg.depth + 1):
        rows = tree.gists[l - 1]
        use = wc.valid_E & (view_level == l) & ((wc.level_E > 0) | complete_block)
        got = rows[jnp.clip(jnp.where(use, wc.node_E, 0), 0, rows.shape[0] - 1)]
        vec = jnp.where(use[:, None], got, vec)
    return EntryData(tokens_ExK=tokens.astype(jnp.int32), vec_ExD=vec)



def lens_inputs(wc: WorkingContext, tree, cfg: WCConfig) -> jax.Array:
    """[E, D] the vector LensNet sees per entry: a gist's own vector, a LOD0 block's LOD1
    gist (zeros for the open block, which has none yet, and for padding)."""
    return gather_entries(wc, tree, cfg).vec_ExD



def materialise(wc: WorkingContext, entries: EntryData, embed_fn: Callable, cfg: WCConfig,
                mode: str = "compact") -> Materialised:
    """Base-model input for the WC: embeddings, positions, sigma, masks and metadata.

    compact: positions 0..len-1 in WC order. global: absolute token index for LOD0 slots, and
    first token + span // 2 (the centre, rounded up) for gists.
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    K, W = cfg.block_size, cfg.w_max
    cum_E = jnp.cumsum(wc.cost_E)
    first_E = cum_E - wc.cost_E
    s = jnp.arange(W, dtype=jnp.int32)
    valid_W = s < cum_E[-1]
    ent_W = jnp.clip(jnp.searchsorted(cum_E, s, side="right"), 0, cfg.max_entries - 1)
    ent_W = ent_W.astype(jnp.int32)
    off_W = s - first_E[ent_W]
    lvl_W = wc.level_E[ent_W]
    is_tok = valid_W & (lvl_W == 0)
    ids_W = jnp.where(is_tok, entries.tokens_ExK[ent_W, jnp.clip(off_W, 0, K - 1)], 0)
    tok_x = embed_fn(ids_W)
    gist_x = entries.vec_ExD[ent_W].astype(tok_x.dtype)
    x = jnp.where(is_tok[:, None], tok_x, gist_x)
    x = jnp.where(valid_W[:, None], x, 0)
    start_E, span_E = entry_spans(wc, cfg)
    if mode == "compact":
        pos = s
    else:
        pos = jnp.where(lvl_W == 0, start_E[ent_W] + off_W, start_E[ent_W] + span_E[ent_W] // 2)
    pos = jnp.where(valid_W, pos, 0).astype(jnp.int32)
    sigma = jnp.where(valid_W & (lvl_W > 0), span_E[ent_W], 0).astype(jnp.float32)
    last_block = jnp.where(wc.level_E == 0, wc.node_E,
                           (start_E + span_E - 1) // K)
    dist = jnp.where(wc.valid_E, wc.num_tokens // K - last_block, 0)
    return Materialised(
        x_WxD=x, pos_W=pos, sigma_W=sigma, valid_W=valid_W,
        slot_entry_W=jnp.where(valid_W, ent_W, -1),
        entry_first_slot_E=first_E.astype(jnp.int32),
        level_E=wc.level_E, span_E=jnp.where(wc.valid_E, span_E, 0).astype(jnp.int32),
        dist_E=dist.astype(jnp.int32), age_E=wc.age_E, valid_E=wc.valid_E)



def materialise_tree(wc, tree, embed_fn, cfg: WCConfig, mode: str = "compact"):
    """materialise(wc, gather_entries(wc, tree, cfg), ...) for a device tree."""
    return materialise(wc, gather_entries(wc, tree, cfg), embed_fn, cfg, mode)
