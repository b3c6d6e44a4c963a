"""What every context policy is (`Policy`), what it may raise (`NotApplicable`, `Unavailable`),
and the scored blocks of the streaming protocol (`check_blocks`). Below every policy module, so
the policy modules and the registry import it and not each other.

Shape letters: N document tokens, K block size.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import numpy as np

from mc_jax.core.working_context import WCConfig
from mc_jax.errors import InputError

K = WCConfig.block_size  # the runtime's block size: every policy scores the same K-token blocks


class NotApplicable(Exception):
    """The policy cannot run this case (e.g. full context longer than the base model's context)."""


class Unavailable(Exception):
    """The policy's implementation (or its trained networks) does not exist yet."""


class Policy(Protocol):
    name: str
    budget: int

    def nll_stream(self, ids_N: np.ndarray, blocks: Sequence[int] | None = None) -> np.ndarray:
        ...

    last_focus: dict | None

    def answer(self, history_ids, question, max_new_tokens: int, *, chat: bool = True,
               answer_prefix=None, gold_blocks=None) -> str:
        """Greedy answer to `question` (text or ids) after the history: the question is the
        newest raw tokens, seen by the policy's focus where it has one, and the prompt goes
        through the base's chat template unless chat=False (`mc_jax.base.chat.build_prompt`).

        gold_blocks: the history blocks (block b = history tokens [Kb, Kb+K)) that hold the
        answer, when the caller knows them (a generated task); only `needle_oracle` reads them.

        After each answer the policy sets `self.last_focus` (a dict; see `FOCUS_KEYS`):
        "raw_blocks", the sorted history blocks whose tokens the base read raw (full: every
        block, a partial last one included; truncate/sinks: the blocks with any token in the
        kept window; MegaContext policies: the complete history blocks that are LOD0 entries of
        the WC the base reads), and "block_scores", a float array [len(history) // K] of the
        policy's relevance score of each complete history block against the question (bm25:
        BM25 scores; lens: LensNet's u) or None for a policy without a scorer. The retrieval
        policies add "kept" (`mc_jax.core.focus.keep_blocks_raw`'s list, in rank order)."""
        ...


FOCUS_KEYS = ("raw_blocks", "block_scores")  # the keys every policy's last_focus has


def blocks_touched(token_idx, K: int = K) -> list[int]:
    """Sorted blocks holding any of the token indices (for `last_focus["raw_blocks"]`)."""
    return sorted({int(t) // K for t in np.asarray(token_idx).reshape(-1)})


def default_blocks(n_tokens: int, K: int = K) -> list[int]:
    return list(range(1, n_tokens // K))


def check_blocks(ids_N: np.ndarray, blocks, K: int = K) -> list[int]:
    """The blocks to score (default: every complete block from 1); InputError for a block
    without a block of history before it or without all K of its tokens."""
    blocks = default_blocks(len(ids_N), K) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in blocks if b < 1 or (b + 1) * K > len(ids_N)]
    if bad:
        raise InputError(f"blocks {bad[:5]} cannot be scored in a document of {len(ids_N)} tokens: "
                         f"a scored block needs >= 1 block of history and all {K} of its tokens")
    return blocks
