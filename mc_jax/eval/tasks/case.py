"""The case a task generator returns, RULER's scorers, and the task registry."""

from __future__ import annotations

import dataclasses
from typing import Callable, Iterable

import numpy as np

from mc_jax.eval.tasks.assembly import Needle

# ------------------------------------------------------------------------------- scoring ----

def string_match_all(pred: str, refs: Iterable[str]) -> float:
    """RULER: mean over references of "the reference appears in the prediction"
    (case-insensitive), x100."""
    refs = list(refs)
    if not refs:
        raise ValueError("string_match_all needs at least one reference")
    p = pred.lower()
    return 100.0 * sum(r.lower() in p for r in refs) / len(refs)


def string_match_part(pred: str, refs: Iterable[str]) -> float:
    """RULER (QA): 100 if any reference appears in the prediction (case-insensitive), else 0."""
    refs = list(refs)
    if not refs:
        raise ValueError("string_match_part needs at least one reference")
    p = pred.lower()
    return 100.0 if any(r.lower() in p for r in refs) else 0.0


METRICS: dict[str, Callable[[str, Iterable[str]], float]] = {
    "string_match_all": string_match_all, "string_match_part": string_match_part}


# ---------------------------------------------------------------------------------- cases ----

@dataclasses.dataclass
class Case:
    """One generated test case. `history_ids` is the canonical history, the concatenation of its
    segments' encodings, to which every token span refers (`ids_match_text`: whether
    `tokenizer.encode(history)` gives the same ids; it does for SmolLM2 and bytes). The
    question follows the history and the answer prefix follows the question, as in RULER's prompt
    (history + question + answer_prefix); a chat template puts the prefix in the assistant turn."""

    task: str
    history: str
    history_ids: np.ndarray
    question: str
    answer_prefix: str
    references: list[str]
    metric: str
    needles: list[Needle]  # history order; .gold / .role ("anchor" | "gold" | "distractor")
    gold_blocks: list[int]  # blocks of block_size tokens that the gold needles' tokens touch
    distractor_blocks: list[int]
    n_tokens: int  # len(history_ids)
    target_tokens: int  # the length asked for
    depth: float | None  # asked for; None for the tasks without a needle
    needle_token: int | None  # token index of the anchor needle's first token
    target_token: float | None  # where the placement rule aimed that token
    segment_starts: np.ndarray  # token index of each segment (intro, sentences, needles)
    ids_match_text: bool | None  # None: not checked (check_text=False)
    block_size: int
    # seed, attempt, task, opts, haystack, value_kind, ..., intro_tokens, next_segment_tokens (the
    # length tolerance), after (indices of the needles placed after the anchor)
    meta: dict

    @property
    def anchor(self) -> Needle | None:
        return next((n for n in self.needles if n.role == "anchor"), None)

    @property
    def gold_needles(self) -> list[Needle]:
        return [n for n in self.needles if n.gold]

    @property
    def distractor_needles(self) -> list[Needle]:
        return [n for n in self.needles if not n.gold]

    @property
    def prompt(self) -> str:
        return self.history + self.question + self.answer_prefix

    def score(self, pred: str) -> float:
        return METRICS[self.metric](pred, self.references)


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    name: str
    build: Callable  # (enc, rc, rl, n_tokens, depth, **opts) -> dict
    metric: str
    uses_depth: bool = True


TASKS: dict[str, TaskSpec] = {}


def register_task(name: str, metric: str = "string_match_all", uses_depth: bool = True):
    def deco(fn):
        TASKS[name] = TaskSpec(name, fn, metric, uses_depth)
        return fn
    return deco
