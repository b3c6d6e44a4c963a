"""`retrieve`: training-free finding with the base's own attention (issue 19, item 5; InfLLM's
way, measured in ../shared/RETRIEVAL.md and experiments/retrieval_heads).

Keys: the history is cut into windows of `window` tokens; each window is run through the first
layers of the frozen base alone, after the chat template's user-turn opening (a sink), at
compact positions, and the keys of its tokens are kept BEFORE RoPE. Queries: the question's
tokens, run in their own window after the last `window - 64` history tokens, also before RoPE,
then rotated to one fixed distance `delta`. Score of a block for one head: the softmax attention
mass over all stored keys that falls on the block's tokens, summed over the question's tokens;
the policy sums it over the selected heads (`HEADS`, chosen by the probe in
experiments/retrieval_heads on cases the evaluation never uses).

The policy: the `top` best blocks (default 1) and their neighbours (a fact that straddles a block
boundary spans two) are made raw by `core.focus.keep_blocks_raw`, best first; the rest of the WC
stays recency's (GistNet gists). Why one: on probe-seed niah_multikey cases (not evaluation
cases) `top=2` kept a distractor needle's block beside the gold one in 2 of 2 cases, and the base
read the distractor's number once (experiments/retrieval_heads/README.md). Cost: the keys are
the answering Session's (`Session(retrieval_heads=...)`, `mc_jax.runtime.retrieval_keys`): the
first max(layer)+1 layers of the base run over each 512-token window of the history while it is
ingested; the question's queries cost one more such window per answer.

Letters: L layers, n blocks, K block size, G KV heads, N query heads, F head dim, T tokens.
"""
from __future__ import annotations

import contextlib
import hashlib

import numpy as np

from mc_jax.errors import InputError
from mc_jax.core.focus import keep_blocks_raw
from mc_jax.eval.policies.megacontext import MegaContextPolicy, raw_history_blocks
from mc_jax.eval.policies.retrieval import RetrievalPolicy, make_gists
from mc_jax.runtime.retrieval_keys import (  # noqa: F401  (re-exported for the probes)
    DELTA, HEADS, WINDOW, _head_mass, _head_stats, _window_qk, head_scores, head_stats,
    history_keys, kv_heads_of, question_queries)

PPL_TOP = 4  # blocks retrieved per scored block in perplexity (see the module docstring)
_KEYS: dict = {}  # the last history's keys (one entry), memoised across policy instances


def sink_prefix(tokenizer) -> np.ndarray:
    """The chat template's user-turn opening (the windows' attention sink); none without one."""
    from mc_jax.base.chat import build_prompt

    try:
        return np.asarray(build_prompt(tokenizer, "?", chat=True).head, np.int32)
    except Exception:  # no chat template: no sink prefix
        return np.zeros(0, np.int32)


def with_neighbours(ranked, top: int, n: int) -> list[int]:
    """The `top` best blocks, each followed by its right then left neighbour (within [0, n))."""
    out: list[int] = []
    for b in ranked[:top]:
        for c in (b, b + 1, b - 1):
            if 0 <= c < n and c not in out:
                out.append(int(c))
    return out


class RetrievePolicy(RetrievalPolicy):
    """`retrieve`: the base's attention from the question finds the blocks (see the module
    docstring); they and their neighbours are kept raw, the rest recency gists."""

    def __init__(self, base_model, budget, gist_model, *, heads=HEADS, top: int = 1,
                 window: int = WINDOW, delta: int = DELTA, ppl_top: int = PPL_TOP, **kw):
        heads = tuple((int(a), int(b)) for a, b in heads)
        prefix = sink_prefix(base_model.tokenizer)
        # the Session keeps the history's keys as it ingests (mc_jax.runtime.retrieval_keys)
        kw.update(retrieval_heads=heads, retrieval_window=int(window), retrieval_prefix=prefix)
        super().__init__("retrieve", base_model, budget, gist_model, **kw)
        self.heads = heads
        self.top, self.window, self.delta = int(top), int(window), int(delta)
        if int(ppl_top) < 0:
            raise InputError(f"ppl_top={ppl_top}: the number of blocks to retrieve per scored "
                             "block must be >= 0")
        self.ppl_top = int(ppl_top)
        self._stats.update(ppl_refocus=0, ppl_kept=0)
        self._layers = sorted({layer for layer, _ in self.heads})
        self._kv = kv_heads_of(self.heads, base_model.cfg)
        self._sink = prefix
        self._live_keys = None  # the answering session's keys, set by _refocus

    def _prefix(self):
        return self._sink

    @contextlib.contextmanager
    def session_keys(self, s, n_blocks: int):
        """While inside: `block_stats` reads the session's keys of its first n_blocks blocks
        (computed at ingest) instead of computing them."""
        self._live_keys = s.retrieval_keys(n_blocks)
        try:
            yield
        finally:
            self._live_keys = None

    def _refocus(self, s, ids, prompt, gold_blocks) -> dict:
        with self.session_keys(s, len(ids) // self.K):
            return super()._refocus(s, ids, prompt, gold_blocks)

    # perplexity: the newest complete block is the query (module docstring, "Perplexity")
    nll_stream = MegaContextPolicy.nll_stream

    def _score_block(self, s, ids_K) -> np.ndarray:
        self.ppl_refocus(s)
        return super()._score_block(s, ids_K)

    def ppl_refocus(self, s) -> list[int]:
        """Before a teacher-forced block: the `ppl_top` history blocks that are not raw in the
        WC and that the newest complete block's tokens attend to most (`block_scores` with that
        block as the question, over the keys of the blocks before it) are made raw
        (`keep_blocks_raw`, best first; the oldest other raw blocks collapse for room). The next
        step's recency refocus rebuilds the WC, so each block chooses afresh. -> blocks kept."""
        K = self.K
        n = len(s.ids) // K - 1  # history blocks before the query block
        if self.ppl_top == 0 or n < 1:
            return []
        ids = np.asarray(s.ids, np.int32)
        with self.session_keys(s, n):
            scores = np.asarray(self.block_scores(ids[:n * K], ids[n * K:(n + 1) * K]))
        raw = set(raw_history_blocks(s.state.wc, n))
        order = [int(b) for b in np.argsort(-scores, kind="stable") if int(b) not in raw]
        wc, kept = keep_blocks_raw(s.state.wc, order[:self.ppl_top], s.cfg.wcfg, incoming=K)
        s.state = s.state.replace(wc=wc)
        self._stats["ppl_refocus"] += 1
        self._stats["ppl_kept"] += len(kept)
        return kept

    def block_stats(self, history_ids, question_ids):
        """(mass [H, n], excess [H, n]) per selected head and complete history block
        (`head_stats`). While answering, the keys are the session's (computed at ingest);
        otherwise they are computed here and memoised per history."""
        K = self.K
        n_layers = self._layers[-1] + 1
        k = self._live_keys
        if k is None:
            digest = (hashlib.sha1(np.asarray(history_ids, np.int32).tobytes()).hexdigest(),
                      id(self.model.params), tuple(self._layers), self.window)
            if digest not in _KEYS:
                k = history_keys(self.model, history_ids, n_layers, window=self.window,
                                 prefix=self._prefix(), K=K)
                _KEYS.clear()
                _KEYS[digest] = k[self._layers][..., self._kv, :]  # the layers, KV heads read
            k = _KEYS[digest]
        q = question_queries(self.model, np.asarray(history_ids)[:len(history_ids) // K * K],
                             question_ids, n_layers, window=self.window, prefix=self._prefix())
        return head_stats(q[self._layers], k, self.heads, self.model.cfg, self.delta,
                          layer_index=self._layers, kv_index=self._kv)

    def block_scores(self, history_ids, question_ids) -> np.ndarray:
        """Summed attention mass per complete history block [n] (memoised per history)."""
        return self.block_stats(history_ids, question_ids)[0].sum(axis=0)

    def rank(self, blocks_BxK, question_ids, gold_blocks):
        scores = self.block_scores(np.asarray(blocks_BxK).reshape(-1), question_ids)
        order = [int(b) for b in np.argsort(-scores, kind="stable")]
        return with_neighbours(order, self.top, len(scores)), scores.astype(np.float32)


def make_retrieve_policy(base_model, budget: int, checkpoint=None, *, gists: str = "trained",
                         **kw) -> RetrievePolicy:
    """The evaluator's `retrieve`. kw: heads, top, window, delta, and Session arguments."""
    own = {k: kw.pop(k) for k in ("heads", "top", "window", "delta", "ppl_top",
                                         "mask_gists") if k in kw}
    gist, kw = make_gists(base_model, budget, checkpoint, gists, kw)
    return RetrievePolicy(base_model, budget, gist, **own, **kw)


