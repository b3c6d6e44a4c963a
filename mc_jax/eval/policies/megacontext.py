"""The MegaContext policies of the evaluation sweeps (docs/results.md): a `Session` of the runtime
per history-length bucket, driven through the streaming protocol (`nll_stream`, `answer`).

recency: GistNet gists (trained; MissingResourceError without them), recency focus.
meanpool: mean-pool gists (no training needed), recency focus.
lens: GistNet gists + LensNet focus (trained networks needed).
The oracle (`mc_jax.eval.policies.oracle`) is a `MegaContextPolicy` that scores each block its
own way.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import bucket
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, ConfigError
from mc_jax.eval.policies.protocol import NotApplicable, check_blocks
from mc_jax.nets.io import load_nets
from mc_jax.base.chat import build_prompt
from mc_jax.runtime.answer import answer_question
from mc_jax.runtime.session import Session

MEGACONTEXT_POLICIES = ("recency", "meanpool", "lens")


class MegaContextPolicy:
    """nll_stream / answer over a Session (policies recency, meanpool, lens; `OraclePolicy`
    scores each block its own way through `_score_block`)."""

    def __init__(self, name, base_model, budget, gist_model, lens_model, policy, **kw):
        self.name, self.budget, self.model = name, int(budget), base_model
        self._gist, self._lens, self._policy, self._kw = gist_model, lens_model, policy, kw
        self.K = gist_model.config.block_size
        self._sessions: dict[int, Session] = {}
        self._stats = {"blocks": 0, "actions": 0, "recompute": 0}

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
               answer_prefix=None) -> str:
        """Question-aware greedy answer (`mc_jax.runtime.answer.answer_question`): the history
        is ingested, then the question's first whole blocks (the newest, protected, raw), so
        focus refocuses with the question in view; the rest of the prompt's tail follows the WC
        raw and the chat template's head precedes it (`mc_jax.base.chat.build_prompt`)."""
        K = self.K
        ids = bm.check_token_ids(history_ids, self.model.cfg).reshape(-1)
        pr = build_prompt(self.model.tokenizer, question, chat=chat, answer_prefix=answer_prefix)
        bm.check_token_ids(pr.tail, self.model.cfg)
        s = self._session(len(ids) + len(pr.tail) + K)
        n_full = len(ids) // K * K
        s.ingest(ids[:n_full])
        try:
            return answer_question(s, ids[n_full:], pr, max_new_tokens)
        except CapacityError as e:
            raise NotApplicable(str(e)) from e

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
