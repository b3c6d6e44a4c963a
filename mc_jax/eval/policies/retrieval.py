"""Training-free reference policies for the retrieval benchmarks: `bm25` and `needle_oracle`.

Both are `MegaContextPolicy`s: the history is ingested with recency focus (GistNet gists, or
mean-pool gists with `gists="meanpool"`), the question's first blocks are ingested too, and at
answer time (the refocus hook of `mc_jax.runtime.answer.answer_question`) a ranked list of
history blocks is made raw with `mc_jax.core.focus.keep_blocks_raw` (best first, as far as the
budget allows: the oldest other raw blocks, then LOD1 sibling groups, collapse for room); the
rest of the WC stays recency's.

bm25: BM25 (the `bm25s` package) over the complete history blocks, each block a document of
  its token ids, against the question's token ids (the question only: not the chat template's
  wrapper, not the answer prefix). Blocks with a score > 0, best first (ties: older first).
  `last_focus["block_scores"]` are the BM25 scores.
needle_oracle: the `gold_blocks` the caller gives (a generated task knows where its needles
  are), in the given order. `NotApplicable` without them. An upper reference for retrieval at
  a budget, not a runnable policy.

Both record `last_focus["kept"]`, the blocks `keep_blocks_raw` kept raw, in rank order (the
protected newest blocks are raw anyway and not listed). `nll_stream` is `NotApplicable`: they
rank against a question, and teacher-forced perplexity has none.

Letters: N history tokens, K block size, B complete history blocks.
"""
from __future__ import annotations

import numpy as np

from mc_jax.core.focus import keep_blocks_raw
from mc_jax.errors import InputError
from mc_jax.eval.policies.megacontext import MegaContextPolicy, _check_budget, trained_networks
from mc_jax.eval.policies.protocol import NotApplicable
from mc_jax.nets.io import load_nets
from mc_jax.runtime.session import Session

RETRIEVAL_POLICIES = ("bm25", "needle_oracle")
GISTS = ("trained", "meanpool")


def bm25_scores(blocks_BxK: np.ndarray, query_ids) -> np.ndarray:
    """BM25 score [B] of each block (a document of its token ids) for the query's token ids."""
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # it logs every index build at DEBUG
    blocks_BxK = np.asarray(blocks_BxK)
    if len(blocks_BxK) == 0:
        return np.zeros(0, np.float32)
    r = bm25s.BM25()
    r.index([[str(t) for t in block] for block in blocks_BxK.tolist()], show_progress=False)
    scores = r.get_scores([str(int(t)) for t in np.asarray(query_ids).reshape(-1)])
    return np.asarray(scores, np.float32).reshape(len(blocks_BxK))


class RetrievalPolicy(MegaContextPolicy):
    """Recency focus while ingesting; at answer time `rank`'s blocks are kept raw."""

    def __init__(self, name, base_model, budget, gist_model, *, mask_gists: bool = False, **kw):
        # mask_gists: the base reads only the WC's raw blocks (the runtime's "truncate" policy:
        # gists take their slots in the budget but are masked out of attention)
        super().__init__(name, base_model, budget, gist_model, None,
                         "truncate" if mask_gists else "recency", **kw)
        self.mask_gists = bool(mask_gists)

    def nll_stream(self, ids_N, blocks=None) -> np.ndarray:
        raise NotApplicable(f"{self.name} ranks history blocks against a question; "
                            "teacher-forced perplexity has no question")

    def rank(self, blocks_BxK: np.ndarray, question_ids: np.ndarray, gold_blocks):
        """(blocks to keep raw, best first; block scores [B] or None)."""
        raise NotImplementedError

    def _refocus(self, s: Session, ids, prompt, gold_blocks) -> dict:
        K = self.K
        n = len(ids) // K
        ranked, scores = self.rank(ids[:n * K].reshape(n, K),
                                   np.asarray(prompt.tail[prompt.q_start:prompt.q_end]),
                                   gold_blocks)
        wc, kept = keep_blocks_raw(s.state.wc, ranked, s.cfg.wcfg)
        s.state = s.state.replace(wc=wc)
        return {"block_scores": scores, "kept": kept}


class BM25Policy(RetrievalPolicy):
    """`bm25`: the history blocks BM25 scores > 0 against the question, best first, raw."""

    def __init__(self, base_model, budget, gist_model, **kw):
        super().__init__("bm25", base_model, budget, gist_model, **kw)

    def rank(self, blocks_BxK, question_ids, gold_blocks):
        scores = bm25_scores(blocks_BxK, question_ids)
        order = np.argsort(-scores, kind="stable")  # ties: the older block first
        return [int(b) for b in order if scores[b] > 0], scores


class NeedleOraclePolicy(RetrievalPolicy):
    """`needle_oracle`: the caller's gold blocks (where the answer is), in the given order, raw."""

    def __init__(self, base_model, budget, gist_model, **kw):
        super().__init__("needle_oracle", base_model, budget, gist_model, **kw)

    def _check_answer(self, ids, gold_blocks) -> None:
        if gold_blocks is None or len(gold_blocks) == 0:
            raise NotApplicable(
                "needle_oracle keeps the blocks that hold the answer raw, so it needs "
                "gold_blocks (known for a generated task); none were given" if gold_blocks is None
                else "needle_oracle: gold_blocks is empty (the case has no needle to keep raw)")
        n = -(-len(ids) // self.K)
        bad = [int(b) for b in gold_blocks if not 0 <= int(b) < n]
        if bad:
            raise InputError(f"gold_blocks {bad[:5]} are not blocks of a history of {len(ids)} "
                             f"tokens (blocks 0..{n - 1} of {self.K} tokens)")

    def rank(self, blocks_BxK, question_ids, gold_blocks):
        return [int(b) for b in gold_blocks], None


def make_gists(base_model, budget: int, checkpoint, gists: str, kw: dict):
    """(GistNet, Session kwargs) of a retrieval policy. gists: "trained" (the GistNet of
    `checkpoint`, default the shipped one; MissingResourceError without it) or "meanpool"
    (mean-pool gists, no training)."""
    if gists == "meanpool":
        depth = kw.get("depth", 2)
        _check_budget(budget, depth)
        gist, _, _ = load_nets(base_model, None, need_trained=False, meanpool=True, depth=depth)
        return gist, kw
    if gists == "trained":
        gist, _, kw = trained_networks(base_model, budget, checkpoint, kw)
        return gist, kw
    raise InputError(f"gists={gists!r}: use one of {', '.join(GISTS)}")


def make_retrieval_policy(name: str, base_model, budget: int, checkpoint=None, *,
                          gists: str = "trained", **kw) -> RetrievalPolicy:
    """The evaluator's `bm25` or `needle_oracle` (gists: see `make_gists`). kw: Session
    arguments, as for `make_megacontext_policy`."""
    if name not in RETRIEVAL_POLICIES:
        raise NotImplementedError(f"unknown retrieval policy {name!r}")
    gist, kw = make_gists(base_model, budget, checkpoint, gists, kw)
    cls = BM25Policy if name == "bm25" else NeedleOraclePolicy
    return cls(base_model, budget, gist, **kw)
