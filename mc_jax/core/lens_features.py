"""What LensNet reads: the one builder of its inputs, for the runtime and for training.

Per entry: its vector (a gist's own vector; a LOD0 block's LOD1 gist, zeros for the open block,
which has none yet), level, span in tokens, distance to the cursor (blocks from the entry's end
to the cursor block, exclusive) and refocus steps since its last edit (`NEVER_EDITED` in both
training and the runtime today). Plus the tail gists: the newest top-level gist and the
`n_tail - 1` newest LOD1 gists (SPEC: 6 in all; `LensNetConfig.n_tail`), each with a mask.

The same working context has two layouts, and each has its builder here:
- `from_working_context`: the runtime's padded entry table (`WorkingContext`, E rows in WC order,
  the open block masked out) over a device `Tree`;
- `from_levels`: training's per-block level assignment (`level_N`, an entry on its first block,
  N rows) over the gists of one sequence.
Both give `LensInputs`; `score` feeds one to a LensNet. `tests/test_lens_parity.py` checks that
the two layouts of one working context give identical inputs on their valid rows.

Letters: E entry rows, N blocks, K block size, D d_model, U tail gists, M latents, C latent width.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.core.working_context import NEVER_EDITED


@flax.struct.dataclass
class LensInputs:
    """LensNet's inputs; any leading batch axes (x) are allowed."""

    vec_xExD: jax.Array
    mask_xE: jax.Array        # bool: the rows that are entries LensNet scores
    level_xE: jax.Array       # int32
    span_xE: jax.Array        # int32 tokens
    distance_xE: jax.Array    # int32 blocks
    since_edit_xE: jax.Array  # int32 refocus steps
    tail_xUxD: jax.Array
    tail_mask_xU: jax.Array   # bool
    # question-aware LensNets only (LensNetConfig.n_match / query); None otherwise
    match_xExR: jax.Array | None = None
    query_xQxD: jax.Array | None = None
    query_mask_xQ: jax.Array | None = None


def tail_gists(top_rows, n_top, lod1_rows, n_lod1, n_tail: int):
    """(tail [n_tail, D], mask [n_tail]): the newest complete top-level gist (row n_top - 1), then
    LOD1 gists n_lod1 - 1, n_lod1 - 2, ...; rows that do not exist yet are masked."""
    if n_tail == 0:
        return jnp.zeros((0, lod1_rows.shape[-1]), lod1_rows.dtype), jnp.zeros((0,), bool)
    idx1 = n_lod1 - 1 - jnp.arange(n_tail - 1)
    tail = jnp.concatenate([top_rows[jnp.clip(n_top - 1, 0, top_rows.shape[0] - 1)][None],
                            lod1_rows[jnp.clip(idx1, 0, lod1_rows.shape[0] - 1)]], axis=0)
    mask = jnp.concatenate([jnp.reshape(n_top > 0, (1,)), idx1 >= 0])
    return tail, mask


def from_working_context(wc: wcm.WorkingContext, tree, wcfg: wcm.WCConfig,
                         n_tail: int) -> LensInputs:
    """The runtime layout: one row per WC entry (E = wcfg.max_entries), the open block masked."""
    K, E = wcfg.block_size, wcfg.max_entries
    vec_ExD = mat.lens_inputs(wc, tree, wcfg)
    start_E, span_E = wcm.entry_spans(wc, wcfg)
    last_block = jnp.where(wc.level_E == 0, wc.node_E, (start_E + span_E - 1) // K)
    mask = wc.valid_E & (jnp.arange(E) != wcm.open_index(wc))
    dist = jnp.maximum(wc.num_tokens // K - last_block - 1, 0)
    counts = tree.counts(K)
    tail, tail_mask = tail_gists(tree.gists[-1], counts[-1], tree.gists[0], counts[0], n_tail)
    return LensInputs(vec_xExD=vec_ExD.astype(jnp.float32), mask_xE=mask,
                      level_xE=jnp.where(mask, wc.level_E, 0),
                      span_xE=jnp.where(mask, span_E, 0),
                      distance_xE=jnp.where(mask, dist, 0),
                      since_edit_xE=jnp.full((E,), NEVER_EDITED, jnp.int32),
                      tail_xUxD=tail.astype(jnp.float32), tail_mask_xU=tail_mask)


def from_levels(level_N: jax.Array, gists: tuple, *, block_size: int, depth: int,
                n_tail: int) -> LensInputs:
    """The training layout: one row per block, an entry on its first block (N = len(level_N)).

    gists: level l = 1..depth arrays [N // K^(l-1), D] of one sequence's complete nodes;
    level_N as in `training.windows` (-1: not covered).
    """
    K, N = block_size, level_N.shape[0]
    group = lambda lv: K ** (lv - 1)  # blocks per level-lv node
    b = jnp.arange(N)
    start = wcm.level_entry_starts(level_N, K, depth)
    vec = gists[0][:N]
    for lv in range(2, depth + 1):
        node_vec = gists[lv - 1][jnp.clip(b // group(lv), 0, gists[lv - 1].shape[0] - 1)]
        vec = jnp.where((level_N == lv)[:, None], node_vec, vec)
    span_blocks = jnp.asarray([1] + [group(lv) for lv in range(1, depth + 1)])[
        jnp.clip(level_N, 0, depth)]
    n_top = N // group(depth)
    tail, tail_mask = tail_gists(gists[depth - 1], n_top, gists[0], N, n_tail)
    return LensInputs(vec_xExD=vec, mask_xE=start, level_xE=jnp.maximum(level_N, 0),
                      span_xE=span_blocks * K, distance_xE=N - (b + span_blocks),
                      since_edit_xE=jnp.full((N,), NEVER_EDITED, jnp.int32),
                      tail_xUxD=tail, tail_mask_xU=tail_mask)


def score(lens, f: LensInputs, prev_latents_xMxC=None):
    """LensNet output (u per row, latents, extra heads) for inputs of either layout."""
    return lens(f.vec_xExD, f.mask_xE, level_xE=f.level_xE, span_xE=f.span_xE,
                distance_xE=f.distance_xE, since_edit_xE=f.since_edit_xE, tail_xUxD=f.tail_xUxD,
                tail_mask_xU=f.tail_mask_xU, prev_latents_xMxC=prev_latents_xMxC,
                match_xExR=f.match_xExR, query_xQxD=f.query_xQxD, query_mask_xQ=f.query_mask_xQ)
