"""The Python API: a frozen base model with a MegaContext memory, in a few calls.

    import mc_jax
    mc = mc_jax.MegaContext.load(budget=1024)          # SmolLM2-135M + the shipped networks
    mc.ingest(open("book.txt").read())                 # history of any length (tree capacity)
    print(mc.answer("Who built the ark?"))             # greedy answer after the working context
    print(mc.focus()[:3])                              # what the base sees: spans and levels

`MegaContext` wraps one `runtime.session.Session` (one jit-compiled step per 32-token block; the
shapes never depend on the history length). Text given to `ingest`, `generate` and `score`
continues one history: whole blocks enter the tree at once, a trailing partial block waits
(`pending`) until the next call completes it or a question is asked after it.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from mc_jax.base import loading
from mc_jax.base.chat import build_prompt
from mc_jax.base.sampling import stop_ids
from mc_jax.core.working_context import to_host_entries
from mc_jax.errors import InputError, MissingResourceError
from mc_jax.nets.io import load_nets
from mc_jax.runtime.answer import answer_question
from mc_jax.runtime.session import Session


class MegaContext:
    """A base model, GistNet/LensNet and a working-context budget over one growing history."""

    def __init__(self, session: Session, info: dict | None = None):
        self.session = session
        self.info = info or {}
        self.pending: list[int] = []  # tokens after the last whole block, not yet in the tree

    @classmethod
    def load(cls, base=None, networks=None, budget: int = 1024, *, policy: str = "lens",
             capacity_tokens: int = 1 << 16, dtype=None, log=None, **session_kw):
        """base: a .gguf file, a Hugging Face directory, or a loaded base model (None: the
        embedded SmolLM2-135M-Instruct). networks: an exported GistNet/LensNet directory (None:
        the shipped pair; without trained networks for this base: mean-pool gists and the
        recency policy). session_kw: further `Session` arguments (position_mode, kv_mode, ...)."""
        model = base if hasattr(base, "params") else loading.load_base(base, dtype=dtype)
        try:
            gist, lens, info = load_nets(model, networks, need_trained=networks is not None,
                                         log=log)
        except MissingResourceError:
            if networks is not None:
                raise
            gist, lens, info = load_nets(model, None, need_trained=False, meanpool=True)
        if lens is None and policy == "lens":
            policy = "recency"
        tc = info.get("train_config", {})
        session_kw.setdefault("position_mode", tc.get("position_mode", "compact"))
        session_kw.setdefault("rope_damping", bool(tc.get("rope_damping", False)))
        s = Session(model, budget, gist, lens, policy=policy, capacity_tokens=capacity_tokens,
                    **session_kw)
        return cls(s, info)

    @property
    def model(self):
        return self.session.model

    @property
    def block_size(self) -> int:
        return self.session.cfg.block_size

    @property
    def num_tokens(self) -> int:
        """History length: tokens in the tree plus the pending partial block."""
        return len(self.session.ids) + len(self.pending)

    def _encode(self, text_or_ids) -> list[int]:
        if isinstance(text_or_ids, str):
            return list(self.model.tokenizer.encode(text_or_ids))
        return [int(t) for t in np.asarray(text_or_ids).reshape(-1)]

    def ingest(self, text_or_ids: str | Sequence[int]) -> int:
        """Append to the history (no base-model forward: GistNet builds the tree, focus keeps
        the working context within budget). Returns the history length in tokens."""
        ids = self.pending + self._encode(text_or_ids)
        K = self.block_size
        n_full = len(ids) // K * K
        if n_full:
            self.session.ingest(np.asarray(ids[:n_full], np.int32))
        self.pending = ids[n_full:]
        return self.num_tokens

    def generate(self, prompt: str | Sequence[int] = "", max_new_tokens: int = 64, *,
                 temperature: float = 0.0, top_p: float = 1.0) -> str:
        """Continue the history (after `prompt`) with up to max_new_tokens sampled tokens
        (greedy at temperature 0); generation stops at the base's end-of-turn ids. The prompt and
        the sampled blocks become part of the history (a block is sampled whole, so tokens after
        a stop id in its block stay in the history too)."""
        given = np.asarray(self.pending + self._encode(prompt), np.int32)
        if not self.session.ids and not given.size:
            raise InputError("generate needs a history or a prompt to continue")
        K, stops, out = self.block_size, stop_ids(self.model), []
        self.pending = []
        while given.size > K:  # whole blocks of the prompt are teacher forced
            self.session.step(given[:K], teacher=True)
            given = given[K:]
        while len(out) < max_new_tokens:
            info = self.session.step(given, n_given=len(given), teacher=False,
                                     temperature=temperature, top_p=top_p)
            new = np.asarray(info.tokens_K)[len(given):].tolist()
            given = np.zeros((0,), np.int32)
            for t in new:
                if t in stops or len(out) >= max_new_tokens:
                    return self.model.tokenizer.decode(out)
                out.append(int(t))
        return self.model.tokenizer.decode(out)

    def answer(self, question: str, max_new_tokens: int = 32, *, chat: bool = True,
               answer_prefix: str | None = None) -> str:
        """Greedy answer to `question`, the evaluators' path (`runtime.answer.answer_question`):
        the question's first whole block (with the pending tokens before it) is ingested so focus
        refocuses with it in view, kept raw; the prompt goes through the base's chat template
        (the user turn's opening before the working context, the assistant turn after the
        question, starting with `answer_prefix`) unless chat=False, which appends
        [question || answer_prefix] verbatim. The question is not added to the history."""
        if not self._encode(question):
            raise InputError("the question is empty")
        pr = build_prompt(self.model.tokenizer, question, chat=chat, answer_prefix=answer_prefix)
        return answer_question(self.session, np.asarray(self.pending, np.int32), pr,
                               max_new_tokens)

    def score(self, text: str | Sequence[int]) -> dict:
        """Teacher-forced NLL of `text` continuing the history, one refocus per block (what
        `mc-jax score` reports). Whole blocks are scored and enter the history; a trailing
        partial block stays pending. The first token of a history has no context and is not
        scored."""
        ids = self.pending + self._encode(text)
        K = self.block_size
        n_full = len(ids) // K * K
        first = len(self.session.ids) == 0
        nll = []
        for b in range(0, n_full, K):
            info = self.session.step(np.asarray(ids[b:b + K], np.int32), teacher=True)
            nll.extend(np.asarray(info.nll_K)[1 if first and b == 0 else 0:].tolist())
        self.pending = ids[n_full:]
        if not nll:
            raise InputError(f"score needs at least one whole block of {K} tokens "
                             f"(got {len(ids)} with the pending ones)")
        mean = float(np.mean(nll))
        return dict(tokens=len(nll), nll=mean, perplexity=math.exp(mean))

    def focus(self) -> list[dict]:
        """The working context in order: one dict per entry with its token span [start, end)
        and level (0 = raw tokens, l >= 1 = one gist of K^l tokens)."""
        K = self.block_size
        n = len(self.session.ids)
        out = []
        for level, node, cost, _ in to_host_entries(self.session.state.wc):
            span = K ** max(level, 1)
            start = node * span
            if level == 0 and cost == 0:
                continue  # the empty open block
            out.append(dict(start=start, end=min(start + span, n), level=level))
        return out
