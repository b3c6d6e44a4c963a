"""Token-exact layout of a retrieval history: haystack sentences, needles inserted at sentence
boundaries, and the spans of every needle in characters and in tokens.

A history is a list of *segments* (the intro line, haystack sentences, needles), each encoded on its
own; the history's token ids are the concatenation, so every span is exact by construction and no
offsets API is needed from the tokenizer (any object with `encode` / `decode` will do).

Segment rule: every segment ends with a non-whitespace character and carries the whitespace that
separates it from the one before as its own leading characters ("\\nThe grass is green.",
" The sky is blue."). No pre-tokenizer of the GPT-2 / byte-level-BPE family (SmolLM2's included)
lets a pre-token run from a non-space character into the whitespace after it, so with this rule
`encode(history) == concatenation of the segments' ids` for those tokenizers and for bytes; the
generator checks it and records the answer in `Case.ids_match_text`. The one intro that ends in
whitespace (the passkey's "...there.\\n") is safe before a one-character lead, so the first
haystack sentence's lead is cut to one character there. `Case.history_ids` is the canonical form
either way: all token spans refer to it.

Placement rule (the anchor needle, the one the depth is about): the *body* is the history without
the intro, the anchor and the needles that must follow it (variable tracking's hops), B tokens; the
needles after the anchor take A tokens. The anchor goes to the body's sentence boundary whose offset
b is nearest to depth * (B + A) (ties: the earlier boundary), so its first token sits at
`len(intro) + b + lead` (lead: the separator tokens before its first word, 0 or 1), within half a
sentence of the requested depth (the target is `len(intro) + lead + depth * (B + A)`; when it lies
beyond B, i.e. a variable-tracking depth above B / (B + A), the anchor ends the body and its hops
follow at once). With `straddle`, the nearest boundary at which a block boundary falls strictly
inside the anchor's value tokens (or inside the needle, for a one-token value) is taken instead.

Length rule: haystack sentences are added in order while the whole history still fits the target,
so `target - history_tokens` lies in [0, tokens of the first sentence that did not fit).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Callable, Iterable, Iterator

import numpy as np

from mc_jax.errors import InputError

BLOCK_SIZE = 32  # the runtime's block size K (mc_jax.eval.policies.protocol.K); tests check it


class NoStraddle(InputError):
    """No sentence boundary of this layout lets the needle straddle (the generator redraws)."""


@dataclasses.dataclass(frozen=True)
class Piece:
    """A needle before layout: `lead` (its separator) + `text` (the needle sentence)."""

    text: str
    lead: str = "\n"
    role: str = "distractor"  # "anchor" | "gold" | "distractor"
    key: str | None = None
    values: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Needle:
    """A needle in the history: character span of its text (no separator), token span [start, end)
    of the tokens that cover that text, token spans of each occurrence of each value."""

    text: str
    role: str
    key: str | None
    values: tuple[str, ...]
    char_span: tuple[int, int]
    token_span: tuple[int, int]
    value_token_spans: tuple[tuple[int, int], ...]

    @property
    def gold(self) -> bool:
        return self.role != "distractor"


@dataclasses.dataclass
class _Seg:
    text: str  # with its lead
    ids: list
    piece: Piece | None = None
    rel: tuple | None = None  # (content token span, value token spans), relative to the segment


@dataclasses.dataclass
class Layout:
    history: str
    ids: np.ndarray
    segment_starts: np.ndarray  # token index where each segment starts (the intro first)
    needles: list  # of Needle, in history order
    intro_tokens: int
    anchor_index: int | None  # index into needles
    after_indices: list  # indices into needles of those placed after the anchor (hops)
    target_token: float | None  # len(intro) + lead + depth * (B + A)
    next_segment_tokens: int | None  # tokens of the first haystack sentence that did not fit


class Encoder:
    """`tokenizer.encode` with a cache (haystack sentences repeat) and the char -> token map of a
    needle (cumulative decodes of its own few tokens)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[str, list] = {}

    def __call__(self, text: str) -> list:
        ids = self._cache.get(text)
        if ids is None:
            ids = [int(i) for i in self.tok.encode(text)]
            if len(self._cache) < 200_000:
                self._cache[text] = ids
        return ids

    def token_span(self, ids: list, text: str, c0: int, c1: int) -> tuple[int, int]:
        """Tokens of `ids` (which encode `text`) that overlap the characters [c0, c1)."""
        decs = [self.tok.decode(ids[:k]) for k in range(len(ids) + 1)]
        if decs[-1] != text or not all(text.startswith(d) for d in decs):
            return 0, len(ids)  # not decodable piecewise (a split multi-byte char): all of it
        lens = [len(d) for d in decs]
        t0 = max(k for k in range(len(ids)) if lens[k] <= c0)
        t1 = min(k for k in range(1, len(ids) + 1) if lens[k] >= c1)
        return t0, t1


def blocks_of(span: tuple[int, int], block_size: int = BLOCK_SIZE) -> range:
    """Indices of the `block_size`-token blocks that the token span [start, end) touches."""
    s, e = span
    return range(s // block_size, (e - 1) // block_size + 1) if e > s else range(0)


def straddles(span: tuple[int, int], block_size: int = BLOCK_SIZE) -> bool:
    """Whether a block boundary falls strictly inside the token span (its tokens in 2+ blocks)."""
    return len(blocks_of(span, block_size)) >= 2


# ------------------------------------------------------------------------------- haystacks ----

_SENT_END = re.compile(r"[.!?][\"'\)\]\u201d\u2019]*$")


def split_sentences(text: str, kind: str = "prose", max_chars: int = 240) -> list[str]:
    """Cut a text into segments that obey the segment rule: each starts with the whitespace before
    it (the first gets "\\n\\n", a paragraph break for when the text is cycled) and ends with a
    non-space character. `prose`: a boundary is a whitespace run after . ! ? (closing quotes and
    brackets allowed) or any whitespace run holding a newline; `code`: newline runs only (one line
    per segment, indentation kept in the lead). Segments longer than `max_chars` are cut further at
    whitespace, so the placement and length granularity stays near one sentence."""
    if kind not in ("prose", "code"):
        raise InputError(f"unknown text kind {kind!r} (prose | code)")
    text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
    if not text:
        raise InputError("the haystack text is empty")
    cuts = [0]
    for m in re.finditer(r"\s+", text):
        i = m.start()
        if "\n" in m.group() or (kind == "prose" and _SENT_END.search(text[max(0, i - 4):i])):
            cuts.append(i)
    cuts.append(len(text))
    out = []
    for a, b in zip(cuts, cuts[1:]):
        piece = text[a:b]
        while len(piece) > max_chars:
            ws = [m.start() for m in re.finditer(r"\s+", piece) if 0 < m.start() <= max_chars]
            if not ws:
                break
            out.append(piece[:ws[-1]])
            piece = piece[ws[-1]:]
        out.append(piece)
    out[0] = "\n\n" + out[0]
    return out


def read_haystack(path, max_chars: int | None = None, offset: int = 0) -> str:
    """A haystack text from a file (UTF-8; a missing, empty or binary file is a clear error), from
    character `offset`, at most `max_chars` characters. Evaluation should read the validation split
    or the shipped texts, never training data."""
    from mc_jax.base.perplexity import read_text
    text = read_text(path)[offset:]
    return text if max_chars is None else text[:max_chars]


def cycle_from(segments: list[str], start: int) -> Iterator[str]:
    """The segments from `start` on, cycling."""
    n = len(segments)
    i = start % n
    while True:
        yield segments[i]
        i = (i + 1) % n


# ---------------------------------------------------------------------------------- layout ----

def layout(enc: Encoder, *, intro: str, hay: Iterable, n_tokens: int, rng,
           anchor: Piece | None = None, free_groups: list[list[Piece]] = (),
           after: list[Piece] = (), depth: float | None = None, straddle: bool = False,
           block_size: int = BLOCK_SIZE) -> Layout:
    """Fill `hay` (segment texts, or Pieces for a haystack made of needles) to `n_tokens` minus the
    intro and the needles, insert each free group at sorted random boundaries (order kept within a
    group), place the anchor by the placement rule, then `after` at sorted random boundaries after
    the anchor. `rng` is a `random.Random`."""
    segs_needles = [_needle_seg(enc, p) for g in free_groups for p in g]
    anchor_seg = _needle_seg(enc, anchor) if anchor is not None else None
    after_segs = [_needle_seg(enc, p) for p in after]
    intro_ids = enc(intro) if intro else []
    fixed = len(intro_ids) + sum(len(s.ids) for s in segs_needles + after_segs) + (
        len(anchor_seg.ids) if anchor_seg else 0)
    budget = n_tokens - fixed
    if budget < 0:
        raise InputError(f"a history of {n_tokens} tokens cannot hold the intro and the needles "
                         f"({fixed} tokens); ask for a longer history")
    body, used, next_len = [], 0, None
    for h in hay:
        if (not body and intro[-1:].isspace() and isinstance(h, str)
                and len(h) - len(h.lstrip()) > 1):
            # an intro ending in whitespace (the passkey's) is followed safely only by a one-char
            # lead; the first sentence may come first, so its lead is cut to one char wherever
            # it ends up
            h = ("\n" if "\n" in h[:len(h) - len(h.lstrip())] else " ") + h.lstrip()
        s = _needle_seg(enc, h) if isinstance(h, Piece) else _Seg(h, enc(h))
        if used + len(s.ids) > budget:
            next_len = len(s.ids)
            break
        body.append(s)
        used += len(s.ids)
    k = 0
    for g in free_groups:
        pos = sorted(rng.randint(0, len(body)) for _ in g)
        for i, p in enumerate(pos):
            body.insert(p + i, segs_needles[k])
            k += 1
    target = None
    if anchor_seg is not None:
        if depth is None or not 0.0 <= depth <= 1.0:
            raise InputError(f"depth must be in [0, 1], got {depth!r}")
        offs = np.concatenate([[0], np.cumsum([len(s.ids) for s in body], dtype=np.int64)])
        A = sum(len(s.ids) for s in after_segs)
        goal = depth * (float(offs[-1]) + A)
        order = sorted(range(len(offs)), key=lambda j: (abs(float(offs[j]) - goal), j))
        (c0, c1), vspans = anchor_seg.rel
        I = len(intro_ids)
        if straddle:
            span = vspans[0] if vspans and vspans[0][1] - vspans[0][0] >= 2 else (c0, c1)
            j = next((j for j in order if straddles((I + offs[j] + span[0], I + offs[j] + span[1]),
                                                    block_size)), None)
            if j is None:
                raise NoStraddle("no sentence boundary lets the needle straddle a block boundary")
        else:
            j = order[0]
        target = I + c0 + goal
        body.insert(j, anchor_seg)
        pos = sorted(rng.randint(j + 1, len(body)) for _ in after_segs)
        for i, p in enumerate(pos):
            body.insert(p + i, after_segs[i])
    elif after_segs:
        raise InputError("needles after an anchor need an anchor")
    return _finish(intro, intro_ids, body, anchor_seg, target, next_len, after_segs)


def fixed_layout(enc: Encoder, intro: str, texts: list[str]) -> Layout:
    """A history of exactly these segments (no needles): the word lists of cwe / fwe."""
    return _finish(intro, enc(intro) if intro else [], [_Seg(t, enc(t)) for t in texts], None,
                   None, None)


def _needle_seg(enc: Encoder, p: Piece) -> _Seg:
    if not p.text or p.text != p.text.strip() or (p.lead and p.lead.strip()):
        raise InputError(f"needle {p.text!r}: text must be stripped and lead whitespace")
    full = p.lead + p.text
    ids = enc(full)
    L = len(p.lead)
    content = enc.token_span(ids, full, L, len(full))
    vspans = []
    for v in p.values:
        for m in re.finditer(re.escape(v), p.text):
            vspans.append(enc.token_span(ids, full, L + m.start(), L + m.end()))
    return _Seg(full, ids, p, (content, tuple(vspans)))


def _finish(intro, intro_ids, body, anchor_seg, target, next_len, after_segs=()) -> Layout:
    texts, ids, starts, needles = [intro], list(intro_ids), [0], []
    char, anchor_index, after_ids, after_indices = len(intro), None, {id(s) for s in after_segs}, []
    for s in body:
        t0 = len(ids)
        starts.append(t0)
        if s.piece is not None:
            (c0, c1), vspans = s.rel
            L = len(s.piece.lead)
            if s is anchor_seg:
                anchor_index = len(needles)
            if id(s) in after_ids:
                after_indices.append(len(needles))
            needles.append(Needle(
                text=s.piece.text, role=s.piece.role, key=s.piece.key, values=s.piece.values,
                char_span=(char + L, char + len(s.text)), token_span=(t0 + c0, t0 + c1),
                value_token_spans=tuple((t0 + a, t0 + b) for a, b in vspans)))
        texts.append(s.text)
        ids.extend(s.ids)
        char += len(s.text)
    return Layout(history="".join(texts), ids=np.asarray(ids, np.int32),
                  segment_starts=np.asarray(starts, np.int64), needles=needles,
                  intro_tokens=len(intro_ids), anchor_index=anchor_index,
                  after_indices=after_indices,
                  target_token=target, next_segment_tokens=next_len)


def occurrences(haystack: str, needle: str) -> list[int]:
    """Start indices of every (overlapping) case-insensitive occurrence."""
    h, n = haystack.lower(), needle.lower()
    out, i = [], h.find(n)
    while i >= 0 and n:
        out.append(i)
        i = h.find(n, i + 1)
    return out


def only_in_gold(history: str, needles: list[Needle], strings: Iterable[str]) -> bool:
    """Every occurrence of every string lies inside a gold needle's text, and there is one."""
    gold = [n.char_span for n in needles if n.gold]
    for s in strings:
        occ = occurrences(history, s)
        if not occ or not all(any(a <= o and o + len(s) <= b for a, b in gold) for o in occ):
            return False
    return True


def draw_distinct(rng, make: Callable, used: set, gold: list, is_gold: bool, what: str) -> str:
    """A fresh value from `make(rng)`: not already used (case-insensitive) and, against the gold
    strings, neither a substring nor a superstring (so a gold string occurs only where planted)."""
    for _ in range(10_000):
        v = make(rng)
        lv = v.lower()
        if lv in used or any(lv in g or g in lv for g in gold):
            continue
        used.add(lv)
        if is_gold:
            gold.append(lv)
        return v
    raise InputError(f"could not draw another distinct {what}")
