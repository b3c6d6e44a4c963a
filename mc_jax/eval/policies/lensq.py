"""`lensq`: a question-aware LensNet finds the blocks (issue 19, items 2 and 4).

The LensNet (a Perceiver IO, `mc_jax.nets.lensnet` with `n_match` and `query`) scores every
complete history block as one entry: its LOD1 gist, level 1, span K, distance to the cursor in
blocks, and its retrieval features (`match_features`): the `retrieve` heads' attention from the
question onto the block (softmax mass and logit excess, as in `retrieve.head_stats`), the same
for its two neighbours, and BM25 (`retrieval.bm25_scores`) of the block and its neighbours; the
question's token embeddings enter as the query. It was fitted offline on synthetic retrieval
tasks of the training split whose gold blocks are free labels (experiments/lens_retrieval).

The policy keeps the same blocks raw as `retrieve` does for its scores: the best block and its
neighbours (`retrieve.with_neighbours`, top=1), the rest of the WC recency gists, so the two
differ only in the scorer. `lensq_zoom` (focus="zoom") instead zooms before answering
(`core.focus.zoom`, issue 19 item 3): refocus rounds on the LensNet's scores (a gist scores the
best of its blocks) expand every gist over a block with u > tau_expand, top level first, down to
raw blocks, collapsing the least wanted entries for room, until a round makes no move or 8
rounds have run; the scores it zooms on are `zoom_scores` (relative to the best block, with
neighbours), so the best block and its neighbours are always wanted and any other block within
ZOOM_WITHIN of the best too: how many end raw is then the LensNet's call and the budget's.
Its networks are the shipped GistNet and the fitted LensNet,
`mc_jax/assets/cpu_small_q` (`Unavailable` without them).

Letters: n blocks, K block size, H heads, R features, Q query tokens, D d_model.
"""
from __future__ import annotations

import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.core import lens_features as lf
from mc_jax.core.working_context import NEVER_EDITED
from mc_jax.base.sampling import bucket
from mc_jax.errors import InputError, MissingResourceError
from mc_jax.eval.policies.megacontext import raw_history_blocks
from mc_jax.eval.policies.retrieval import bm25_scores
from mc_jax.eval.policies.retrieve import RetrievePolicy, with_neighbours

ASSET = Path(__file__).resolve().parents[2] / "assets" / "cpu_small_q"
N_HEAD_FEATURES = 3  # per head: log mass ratio, logit excess, gap to the best block
N_MATCH = 7  # + summed-head mass: ratio, gap, left, right; bm25: own, left, right -> with H heads
Q_MAX = 128  # query tokens read (the question; longer ones keep their last Q_MAX)


def n_match(n_heads: int) -> int:
    return N_HEAD_FEATURES * n_heads + N_MATCH


def _shift(x, d):
    """x moved by d blocks along the last axis, zero filled (d = 1: the left neighbour's)."""
    out = np.zeros_like(x)
    if d > 0:
        out[..., d:] = x[..., :-d]
    else:
        out[..., :d] = x[..., -d:]
    return out


def match_features(mass_Hxn, excess_Hxn, bm25_n, n_q: int) -> np.ndarray:
    """[n, R] retrieval features of n blocks (R = `n_match(H)`), each O(1) and comparable
    across history lengths: log ratios of attention mass to the uniform share, logit excess,
    gaps to the best block, the neighbours' (a fact straddles a boundary), BM25 / its maximum."""
    mass = np.asarray(mass_Hxn, np.float64)
    H, n = mass.shape
    ratio = np.log(mass * n / max(n_q, 1) + 1e-3) / 5.0
    exc = np.clip(np.asarray(excess_Hxn, np.float64), -20.0, 0.0) / 5.0
    gap = ratio - ratio.max(axis=1, keepdims=True)
    tot = np.log(mass.sum(0) * n / max(H * n_q, 1) + 1e-3) / 5.0
    b = np.asarray(bm25_n, np.float64)
    b = b / b.max() if b.size and b.max() > 0 else np.zeros(n)
    cols = [ratio, exc, gap, tot[None], (tot - tot.max())[None], _shift(tot, 1)[None],
            _shift(tot, -1)[None], b[None], _shift(b, 1)[None], _shift(b, -1)[None]]
    return np.concatenate(cols, axis=0).T.astype(np.float32)


def bucket_entries(n: int) -> int:
    """Padded entry count: a multiple of 256 (few compiles across history lengths)."""
    return max(256, -(-n // 256) * 256)


def lens_inputs(gists_nxD, match_nxR, q_emb_QxD, E: int | None = None, *, block_size: int = 32,
                n_tail: int = 6) -> lf.LensInputs:
    """The flat layout LensNet reads here: one entry per block (padded to E rows) of span
    `block_size`, and the LensNet's `n_tail` tail slots empty."""
    n, D = gists_nxD.shape
    E = bucket_entries(n) if E is None else E
    pad = lambda a, rows: np.concatenate([a, np.zeros((rows - len(a),) + a.shape[1:], a.dtype)])
    b = np.arange(E)
    valid = b < n
    q = np.asarray(q_emb_QxD, np.float32)[-Q_MAX:]
    return lf.LensInputs(
        vec_xExD=jnp.asarray(pad(np.asarray(gists_nxD, np.float32), E)),
        mask_xE=jnp.asarray(valid), level_xE=jnp.asarray(np.where(valid, 1, 0), jnp.int32),
        span_xE=jnp.asarray(np.where(valid, block_size, 0), jnp.int32),
        distance_xE=jnp.asarray(np.where(valid, n - b - 1, 0), jnp.int32),
        since_edit_xE=jnp.full((E,), NEVER_EDITED, jnp.int32),
        tail_xUxD=jnp.zeros((n_tail, D), jnp.float32),
        tail_mask_xU=jnp.zeros(n_tail, bool),
        match_xExR=jnp.asarray(pad(np.asarray(match_nxR, np.float32), E)),
        query_xQxD=jnp.asarray(pad(q, Q_MAX)), query_mask_xQ=jnp.asarray(np.arange(Q_MAX) < len(q)))


@functools.partial(jax.jit, static_argnames=("graph",))
def _score(graph, state, f):
    from flax import nnx

    return lf.score(nnx.merge(graph, state), f).u


def lens_scores(lens, f: lf.LensInputs) -> jax.Array:
    from flax import nnx

    graph, state = nnx.split(lens)
    return _score(graph, state, f)


def block_gists(model, gist, ids, K: int) -> np.ndarray:
    """LOD1 gists [n, D] of the complete blocks of `ids` (GistNet over the token embeddings)."""
    n = len(ids) // K
    emb = bm.embed_tokens(model.params, jnp.asarray(np.asarray(ids, np.int32)[:n * K]))
    return np.asarray(gist(1, emb.reshape(n, K, -1)), np.float32)


def case_features(policy: RetrievePolicy, history_ids, question_ids) -> dict:
    """Everything `lensq` reads for one history and question (arrays of numpy)."""
    K = policy.K
    ids = np.asarray(history_ids, np.int32)
    q_ids = np.asarray(question_ids, np.int32).reshape(-1)
    n = len(ids) // K
    mass, excess = policy.block_stats(ids, q_ids)
    return dict(mass=mass, excess=excess, bm25=bm25_scores(ids[:n * K].reshape(n, K), q_ids),
                gists=block_gists(policy.model, policy._gist, ids, K),
                q_emb=np.asarray(bm.embed_tokens(policy.model.params, jnp.asarray(q_ids)),
                                 np.float32), n_q=len(q_ids))


def inputs_from_features(feat: dict, E: int | None = None, *, block_size: int = 32,
                         n_tail: int = 6) -> lf.LensInputs:
    m = match_features(feat["mass"], feat["excess"], feat["bm25"], int(feat["n_q"]))
    return lens_inputs(np.asarray(feat["gists"]), m, np.asarray(feat["q_emb"]), E,
                       block_size=block_size, n_tail=n_tail)


class LensQPolicy(RetrievePolicy):
    """`lensq`: the fitted question-aware LensNet ranks the blocks; the best and its neighbours
    are kept raw (see the module docstring)."""

    def __init__(self, base_model, budget, gist_model, lens_q, *, focus: str = "top",
                 zoom_rounds: int = 8, **kw):
        if focus not in ("top", "zoom"):
            raise InputError(f"lensq focus={focus!r}: use 'top' or 'zoom'")
        super().__init__(base_model, budget, gist_model, **kw)
        self.name = "lensq" if focus == "top" else "lensq_zoom"
        self.lens_q, self.focus, self.zoom_rounds = lens_q, focus, int(zoom_rounds)

    def _refocus(self, s, ids, prompt, gold_blocks) -> dict:
        if self.focus == "top":
            return super()._refocus(s, ids, prompt, gold_blocks)
        from mc_jax.core import focus as fm

        K, n = self.K, len(ids) // self.K
        with self.session_keys(s, n):
            u = self.block_scores(ids[:n * K], np.asarray(prompt.tail[prompt.q_start:
                                                                       prompt.q_end]))
        zs = zoom_scores(u)
        unit = K ** (s.cfg.wcfg.depth - 1)
        size = unit * int(bucket(-(-(len(s.ids) // K + 1) // unit)))
        pad = np.full(size, -1.0, np.float32)
        pad[:n] = zs
        wc, zlog = _zoom(s.state.wc, jnp.asarray(pad), s.cfg.wcfg, fm.FocusConfig(),
                         self.zoom_rounds)
        s.state = s.state.replace(wc=wc)
        z = jax.device_get(zlog)
        order = [int(b) for b in np.argsort(-u, kind="stable")]
        raw = set(raw_history_blocks(wc, n))
        tau = fm.FocusConfig().tau_expand
        return {"block_scores": u.astype(np.float32), "kept": [b for b in order if b in raw
                                                               and zs[b] > tau],
                "zoom": dict(rounds=int(z.rounds), stop=int(z.stop),
                             expands=[int(x) for x in z.expands_R[:int(z.rounds)]],
                             collapses=[int(x) for x in z.collapses_R[:int(z.rounds)]])}

    def block_scores(self, history_ids, question_ids) -> np.ndarray:
        feat = case_features(self, history_ids, question_ids)
        n = len(feat["gists"])
        f = inputs_from_features(feat, block_size=self.K, n_tail=self.lens_q.config.n_tail)
        return np.asarray(lens_scores(self.lens_q, f))[:n]


ZOOM_WITHIN = 0.15  # lensq_zoom wants the blocks within this of the best score (and neighbours)


def zoom_scores(u) -> np.ndarray:
    """The scores `lensq_zoom` zooms on: each block takes the best LensNet score of itself and
    its two neighbours (a fact may straddle a boundary), shifted so that those within
    ZOOM_WITHIN of the best block's score pass tau_expand (0.2). Relative, because the fitted
    LensNet ranks well but its absolute u is not calibrated (below 0 on every dev case, the gold
    included; experiments/lens_retrieval/README.md); chosen on the train2 dev cases."""
    u = np.asarray(u, np.float32)
    sm = u.copy()
    sm[1:] = np.maximum(sm[1:], u[:-1])
    sm[:-1] = np.maximum(sm[:-1], u[1:])
    return (sm - u.max() + 0.2 + ZOOM_WITHIN).astype(np.float32)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _zoom(wc, block_u, wcfg, fcfg, rounds):
    from mc_jax.core import focus as fm

    return fm.zoom(wc, block_u, wcfg, fcfg, rounds)


def make_lensq_policy(base_model, budget: int, checkpoint=None, **kw) -> LensQPolicy:
    """The evaluator's `lensq`: networks from `checkpoint` (default `ASSET`)."""
    from mc_jax.eval.policies.megacontext import _check_budget
    from mc_jax.nets.io import load_networks

    path = Path(checkpoint) if checkpoint is not None else ASSET
    if not (path / "networks.json").is_file():
        raise MissingResourceError(f"lensq needs a question-aware LensNet at {path} "
                                   "(experiments/lens_retrieval/fit.py writes it)")
    gist, lens, info = load_networks(path, base_model.cfg)
    if not lens.config.n_match or not lens.config.query:
        raise MissingResourceError(f"{path}: its LensNet is not question-aware (n_match "
                                   f"{lens.config.n_match}, query {lens.config.query})")
    _check_budget(budget, gist.config.depth)
    own = {k: kw.pop(k) for k in ("heads", "top", "window", "delta", "ppl_top", "mask_gists",
                                         "focus", "zoom_rounds")
           if k in kw}
    tc = info.get("train_config", {})
    kw.setdefault("position_mode", tc.get("position_mode", "compact"))
    kw.setdefault("rope_damping", bool(tc.get("rope_damping", False)))
    heads = info.get("lensq", {}).get("heads")
    if heads is not None:
        own.setdefault("heads", tuple(tuple(h) for h in heads))
    return LensQPolicy(base_model, budget, gist, lens, **own, **kw)
