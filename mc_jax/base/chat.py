"""Question prompts around a history: the base's chat template, or a plain continuation.

An answer prompt is [head || history || tail] (`AnswerPrompt`): with a chat template the user
turn holds [history || "\\n\\n" || question] and the assistant turn starts with the answer
prefix; without one (or with chat=False) head is empty and tail is [question || answer prefix]
verbatim (the old "append the question ids" prompt).

Rendering. jinja2 is not a dependency of mc_jax, so the template is not executed: a template in
the ChatML form (it contains `<|im_start|>`, as SmolLM2's does) is rendered as ChatML,
including the default system message that such a template inserts when the conversation has none
(SmolLM2: "You are a helpful AI assistant named SmolLM, trained by Hugging Face"). Any other
template raises `InputError` for chat=True (pass chat=False for a plain prompt). The special
tokens are encoded by the tokenizer as its added (single-id) tokens.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from mc_jax.errors import InputError

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
QUESTION_SEP = "\n\n"  # between the history and the question inside the user turn
_DEFAULT_SYSTEM = re.compile(re.escape(IM_START) + r"system\n(.*?)" + re.escape(IM_END), re.S)


@dataclasses.dataclass(frozen=True)
class AnswerPrompt:
    """head [H] before the history, tail [T] after it; the question is tail[q_start:q_end]."""

    head: np.ndarray
    tail: np.ndarray
    q_start: int
    q_end: int
    chat: bool

    def around(self, history_ids) -> np.ndarray:
        """The whole prompt [head || history || tail]."""
        return np.concatenate([self.head, np.asarray(history_ids, np.int32).reshape(-1),
                               self.tail]).astype(np.int32)


def chat_template(tokenizer) -> str | None:
    return getattr(tokenizer, "chat_template", None) or None


def chat_style(tokenizer) -> str | None:
    """"chatml" when the tokenizer's template is ChatML, None without a template; InputError
    for a template this module cannot render."""
    t = chat_template(tokenizer)
    if t is None:
        return None
    if IM_START in t:
        return "chatml"
    raise InputError("the base's chat template is not in the ChatML form (<|im_start|>) and "
                     "jinja2 is not installed to render it; ask with chat=False (--no-chat)")


def default_system(tokenizer) -> str | None:
    """The system message a ChatML template inserts when the conversation has none."""
    t = chat_template(tokenizer) or ""
    m = _DEFAULT_SYSTEM.search(t)
    return m.group(1) if m else None


def _ids(tokenizer, x) -> list[int]:
    if x is None:
        return []
    if isinstance(x, str):
        return list(tokenizer.encode(x))
    return [int(t) for t in np.asarray(x).reshape(-1)]


def build_prompt(tokenizer, question, *, chat: bool = True,
                 answer_prefix=None) -> AnswerPrompt:
    """The answer prompt around a history. `question` and `answer_prefix`: text or token ids.

    chat=True and a ChatML template: head = [system turn, if the template has a default one] +
    "<|im_start|>user\\n"; tail = "\\n\\n" + question + "<|im_end|>\\n<|im_start|>assistant\\n"
    + answer prefix. Otherwise (chat=False, or a tokenizer without a template): head = [],
    tail = question + answer prefix, verbatim (the caller words a plain prompt itself)."""
    q = _ids(tokenizer, question)
    if not q:
        raise InputError("the question is empty")
    pre = _ids(tokenizer, answer_prefix)
    style = chat_style(tokenizer) if chat else None
    if style is None:
        tail = q + pre
        return AnswerPrompt(np.zeros(0, np.int32), np.asarray(tail, np.int32), 0, len(q), False)
    enc = tokenizer.encode
    sysm = default_system(tokenizer)
    head = (enc(f"{IM_START}system\n{sysm}{IM_END}\n") if sysm is not None else []) + \
        enc(f"{IM_START}user\n")
    sep = enc(QUESTION_SEP)
    tail = sep + q + enc(f"{IM_END}\n{IM_START}assistant\n") + pre
    return AnswerPrompt(np.asarray(head, np.int32), np.asarray(tail, np.int32), len(sep),
                        len(sep) + len(q), True)


def plain_question(question: str) -> str:
    """The plain (chat=False) question text of `mc-jax generate`: "\\n\\nQuestion: Q\\nAnswer:"."""
    return f"\n\nQuestion: {question}\nAnswer:"
