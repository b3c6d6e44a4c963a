"""The MegaContext policies of the evaluation sweeps (docs/results.md): a `Session` of the runtime
per history-length bucket, driven through the streaming protocol (`nll_stream`, `answer`).

recency: GistNet gists (trained; MissingResourceError without them), recency focus.
meanpool: mean-pool gists (no training needed), recency focus.
lens: GistNet gists + LensNet focus (trained networks needed).
The oracle (`mc_jax.eval.policies.oracle`) is a `MegaContextPolicy` that scores each block its
own way; the retrieval policies (`mc_jax.eval.policies.retrieval`: bm25, needle_oracle) are
`MegaContextPolicy`s that change the WC the base reads through `_refocus`.

After each `answer`, `last_focus` (see `mc_jax.eval.policies.protocol.Policy.answer`):
raw_blocks, the complete history blocks that are LOD0 in the WC the base reads (after the
question's blocks were ingested and `_refocus` ran); block_scores, LensNet's u of each complete
history block as a LOD1 entry for `lens` (`lens_block_scores`), None for recency and meanpool.
"""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import bucket
from mc_jax.core import lens_features as lf
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, ConfigError
from mc_jax.eval.policies.protocol import NotApplicable, check_blocks
from mc_jax.nets.io import load_nets
from mc_jax.base.chat import build_prompt
from mc_jax.runtime.answer import answer_question
from mc_jax.runtime.session import Session

MEGACONTEXT_POLICIES = ("recency", "meanpool", "lens")


def raw_history_blocks(wc: wcm.WorkingContext, n_blocks: int) -> list[int]:
    """Sorted complete history blocks (< n_blocks) that are LOD0 entries of the WC."""
    return sorted(node for level, node, _, _ in wcm.to_host_entries(wc)
                  if level == 0 and node < n_blocks)


@functools.partial(jax.jit, static_argnames=("rt",))
def lens_block_scores(rt, nets, tree):
    """LensNet u of every complete block of the tree as a LOD1 entry (the training layout,
    `lens_features.from_levels` with level 1 on every complete block; distances and tail gists
    are those of a cursor at the tree's last complete block). -> u [R], R the tree's LOD1 rows
    (static, so one compile per session); rows at or past the complete blocks are 0."""
    K, d = rt.cfg.block_size, rt.cfg.depth
    lens = nnx.merge(rt.lens_graph, nets["lens"])
    n_tail = lens.config.n_tail
    R = tree.gists[0].shape[0]
    n = tree.num_tokens // K
    b = jnp.arange(R)
    level_R = jnp.where(b < n, 1, -1).astype(jnp.int32)
    f = lf.from_levels(level_R, tree.gists, block_size=K, depth=d, n_tail=n_tail)
    # from_levels puts the cursor after its R rows; the tree's cursor is after block n - 1
    tail, tail_mask = lf.tail_gists(tree.gists[d - 1], n // K ** (d - 1), tree.gists[0], n,
                                    n_tail)
    f = f.replace(vec_xExD=f.vec_xExD.astype(jnp.float32),
                  distance_xE=jnp.where(b < n, n - b - 1, 0).astype(jnp.int32),
                  tail_xUxD=tail.astype(jnp.float32), tail_mask_xU=tail_mask)
    return lf.score(lens, f).u


class MegaContextPolicy:
    """nll_stream / answer over a Session (policies recency, meanpool, lens; `OraclePolicy`
    scores each block its own way through `_score_block`)."""

    def __init__(self, name, base_model, budget, gist_model, lens_model, policy, **kw):
        self.name, self.budget, self.model = name, int(budget), base_model
        self._gist, self._lens, self._policy, self._kw = gist_model, lens_model, policy, kw
        self.K = gist_model.config.block_size
        self._sessions: dict[int, Session] = {}
        self._stats = {"blocks": 0, "actions": 0, "recompute": 0}
        self.last_focus: dict | None = None

    def _session(self, n_tokens: int) -> Session:
        K = self.K
        cap = bucket(-(-n_tokens // K) + 2) * K
        if cap not in self._sessions:
            self._sessions[cap] = Session(self.model, self.budget, self._gist, self._lens,
                                          policy=self._policy, capacity_tokens=cap, **self._kw)
        s = self._sessions[cap]
        s.reset()
        return s

    def nll_stream(self, ids_N, blocks: Sequence[int] | None = None) -> np.ndarray:
        K = self.K
        ids = bm.check_token_ids(ids_N, self.model.cfg).reshape(-1)
        blocks = check_blocks(ids, blocks, K)
        if not blocks:
            return np.zeros((0, K), np.float32)
        s = self._session(len(ids))
        want = sorted(set(blocks))
        out: dict[int, np.ndarray] = {}
        b = 0
        for w in want:
            if w > b:
                s.ingest(ids[K * b:K * w])
                b = w
            out[w] = self._score_block(s, ids[K * w:K * w + K])
            b = w + 1
        self._end_stream(s)
        return np.stack([out[w] for w in blocks])

    def _score_block(self, s: Session, ids_K) -> np.ndarray:
        """NLL [K] of the next block, teacher forced; advances the session past it."""
        info = s.step(ids_K, teacher=True)
        self._stats["recompute"] += int(info.recompute)
        return np.asarray(info.nll_K, np.float32)

    def _end_stream(self, s: Session) -> None:
        self._stats["blocks"] += int(s.state.blocks)
        self._stats["actions"] += int(s.state.total_actions)

    def answer(self, history_ids, question, max_new_tokens: int, *, chat: bool = True,
               answer_prefix=None, gold_blocks=None) -> str:
        """Question-aware greedy answer (`mc_jax.runtime.answer.answer_question`): the history
        is ingested, then the question's first whole blocks (the newest, protected, raw), so
        focus refocuses with the question in view; `_refocus` may then change the WC the base
        reads; the rest of the prompt's tail follows the WC raw and the chat template's head
        precedes it (`mc_jax.base.chat.build_prompt`). Sets `last_focus` (module docstring).
        gold_blocks: only the policies that read them (needle_oracle) use them."""
        self.last_focus = None
        K = self.K
        ids = bm.check_token_ids(history_ids, self.model.cfg).reshape(-1)
        pr = build_prompt(self.model.tokenizer, question, chat=chat, answer_prefix=answer_prefix)
        bm.check_token_ids(pr.tail, self.model.cfg)
        self._check_answer(ids, gold_blocks)
        s = self._session(len(ids) + len(pr.tail) + K)
        n_full = len(ids) // K * K
        s.ingest(ids[:n_full])
        n_hist = len(ids) // K
        focus: dict = {}

        def refocus(s):
            focus.update(self._refocus(s, ids, pr, gold_blocks))
            focus["raw_blocks"] = raw_history_blocks(s.state.wc, n_hist)

        try:
            out = answer_question(s, ids[n_full:], pr, max_new_tokens, refocus=refocus)
        except CapacityError as e:
            raise NotApplicable(str(e)) from e
        self.last_focus = {"raw_blocks": focus.pop("raw_blocks"),
                           "block_scores": focus.pop("block_scores", None), **focus}
        return out

    def _check_answer(self, ids, gold_blocks) -> None:
        """Raise before any work if this policy cannot answer (needle_oracle without gold)."""

    def _refocus(self, s: Session, ids, prompt, gold_blocks) -> dict:
        """The refocus hook of `answer`: called with the question's blocks ingested, before the
        base reads the WC; may replace `s.state.wc`. Returns last_focus entries beside
        raw_blocks ("block_scores" at least). Here: LensNet's block scores for `lens`."""
        if self._policy != "lens":
            return {"block_scores": None}
        u = lens_block_scores(s.rt, s.nets, s.state.tree)
        return {"block_scores": np.asarray(u, np.float32)[:len(ids) // self.K]}

    def stats(self) -> dict:
        return dict(self._stats)


def _check_budget(budget, depth):
    try:
        wcm.WCConfig(w_max=int(budget), depth=depth)
    except ConfigError as e:
        raise NotApplicable(f"budget {budget}: {e}") from e


def trained_networks(base_model, budget, checkpoint, kw: dict):
    """(GistNet, LensNet or None, Session kwargs) of a policy that needs trained networks
    (MissingResourceError without them; NotApplicable for a budget too small for their depth).
    The positions and RoPE damping default to those the networks were trained with."""
    gist, lens, info = load_nets(base_model, checkpoint, need_trained=True)
    _check_budget(budget, gist.config.depth)
    tc = info.get("train_config", {})
    kw = dict(kw)
    kw.setdefault("position_mode", tc.get("position_mode", "compact"))
    kw.setdefault("rope_damping", bool(tc.get("rope_damping", False)))
    return gist, lens, kw


def make_megacontext_policy(name: str, base_model, budget: int, checkpoint=None, **kw):
    """The evaluator's MegaContext policy `name` (recency, meanpool, lens; see the module
    docstring). kw: position_mode, rope_damping, chunk, depth, seed (Session arguments)."""
    if name not in MEGACONTEXT_POLICIES:
        raise NotImplementedError(f"unknown MegaContext policy {name!r}")
    if name == "meanpool":
        _check_budget(budget, kw.get("depth", 2))
        gist, _, info = load_nets(base_model, None, need_trained=False, meanpool=True,
                                  depth=kw.get("depth", 2))
        return MegaContextPolicy(name, base_model, budget, gist, None, "recency", **kw)
    gist, lens, kw = trained_networks(base_model, budget, checkpoint, kw)
    pol = "lens" if name == "lens" else "recency"
    return MegaContextPolicy(name, base_model, budget, gist, lens if pol == "lens" else None,
                             pol, **kw)
