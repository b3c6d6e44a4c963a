"""RULER-lite: the RULER synthetic tasks that need no downloads (NVIDIA/RULER,
scripts/data/synthetic), with RULER's templates, singular/plural forms and scoring.

- `niah_single`: one "One of the special magic {type} for {key} is: {value}." needle; keys are
  adjective-noun words, values `numbers` (7 digits), `words` (adjective-noun) or `uuids`;
  haystack `noise` (RULER's repeated sentences), `prose` / `code` (a text you give: `text=`), or
  `needle` (only distractor needles).
- `niah_multikey` (4 keys, 1 asked; the others are distractors), `niah_multivalue` (4 values for
  the asked key, answer all), `niah_multiquery` (4 keys asked, answer all).
- `variable_tracking`: a chain "VAR ABCDE = 12345", then hops "VAR X = VAR Y"; answer every name
  bound to the value. Depth places the binding; the hops follow it at random boundaries.
- `common_words`: a numbered list, 10 words x30 and the rest x3; answer the 10.
  `frequent_words`: coded words with zeta(alpha) frequencies; answer ranks 2-4 (rank 1 is "...").

RULER's own variant names (niah_single_1, ..., vt, cwe, fwe) are in `RULER_VARIANTS`.
Differences from RULER, all deliberate: keys and values are drawn distinct from each other and
from the gold strings (no gold string inside another); the prose haystack is the text you pass
(RULER: Paul Graham essays), cut at sentence boundaries, and needles go between sentences of the
noise too (RULER: between whole noise paragraphs); the whitespace between the intro and the
context is that of the first context sentence; adjective-noun words are drawn as an adjective and
a noun (the same product set RULER samples); no few-shot example for variable tracking, whose
statements are one per line; its answer prefix reads "assigned" (RULER's file has "assgined");
common_words halves the x30 repeat until the list fits a short history (`meta["freq_cw"]`).
"""

from __future__ import annotations

import functools
import math
import random
import string
import uuid
from typing import Iterator

import numpy as np

from mc_jax.errors import InputError
from mc_jax.eval.tasks.assembly import (BLOCK_SIZE, Piece, cycle_from, draw_distinct, fixed_layout,
                                        layout, split_sentences)
from mc_jax.eval.tasks.case import register_task

# --- RULER's strings (scripts/data/synthetic/constants.py, niah.py; /work/shared/RETRIEVAL.md) --
NIAH_NEEDLE = "One of the special magic {type_needle_v} for {key} is: {value}."
NIAH_TEMPLATE = ("Some special magic {type_needle_v} are hidden within the following text. Make "
                 "sure to memorize it. I will quiz you about the {type_needle_v} afterwards.\n"
                 "{context}\nWhat are all the special magic {type_needle_v} for {query} mentioned "
                 "in the provided text?")
NIAH_ANSWER_PREFIX = (" The special magic {type_needle_v} for {query} mentioned in the provided "
                      "text are")
NOISE = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back "
         "again.")
VT_TEMPLATE = ("Memorize and track the chain(s) of variable assignment hidden in the following "
               "text.\n\n{context}\nQuestion: Find all variables that are assigned the value "
               "{query} in the text above.")
VT_ANSWER_PREFIX = (" Answer: According to the chain(s) of variable assignment in the text above, "
                    "{num_v} variables are assigned the value {query}, they are: ")
CWE_TEMPLATE = ("Below is a numbered list of words. In these words, some appear more often than "
                "others. Memorize the ones that appear most often.\n{context}\nQuestion: What are "
                "the 10 most common words in the above list?")
CWE_ANSWER_PREFIX = " Answer: The top 10 words that appear most often in the list are:"
FWE_TEMPLATE = ("Read the following coded text and track the frequency of each coded word. Find "
                "the three most frequently appeared coded words. {context}\nQuestion: Do not "
                "provide any explanation. Please ignore the dots '....'. What are the three most "
                "frequently appeared words in the above coded text?")
FWE_ANSWER_PREFIX = (" Answer: According to the coded text above, the three most frequently "
                     "appeared words are:")

# RULER's task names -> (task, options); the prose variants need `text=`.
RULER_VARIANTS = {
    "niah_single_1": ("niah_single", dict(haystack="noise", value_kind="numbers")),
    "niah_single_2": ("niah_single", dict(haystack="prose", value_kind="numbers")),
    "niah_single_3": ("niah_single", dict(haystack="prose", value_kind="uuids")),
    "niah_multikey_1": ("niah_multikey", dict(haystack="prose")),
    "niah_multikey_2": ("niah_multikey", dict(haystack="needle")),
    "niah_multikey_3": ("niah_multikey", dict(haystack="needle", key_kind="uuids",
                                              value_kind="uuids")),
    "vt": ("variable_tracking", {}),
    "cwe": ("common_words", {}),
    "fwe": ("frequent_words", {}),
}


# --------------------------------------------------------------------------- value kinds ----

def _asset_words(name: str) -> list[str]:
    try:
        from importlib.resources import files
        raw = files("wonderwords.assets").joinpath(name).read_text(encoding="utf-8")
        words = [w.strip() for w in raw.splitlines()]
    except (ImportError, FileNotFoundError, ModuleNotFoundError):
        from wonderwords import random_word  # RULER's way (a private helper)
        words = [w.strip() for w in random_word._get_words_from_text_file(name)]
    return sorted({w for w in words if w})


@functools.cache
def wordlists() -> dict[str, list[str]]:
    """wonderwords' nouns, adjectives and verbs (sorted, unique), RULER's word source."""
    return {k: _asset_words(f"{k}list.txt") for k in ("noun", "adjective", "verb")}


def random_value(rng: random.Random, kind: str) -> str:
    """RULER's needle keys / values: `numbers` (7 digits), `words` (adjective-noun), `uuids`
    (version-4 layout from the seeded rng, not os randomness)."""
    if kind == "numbers":
        return str(rng.randint(10 ** 6, 10 ** 7 - 1))
    if kind == "words":
        w = wordlists()
        return f"{rng.choice(w['adjective'])}-{rng.choice(w['noun'])}"
    if kind == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    raise InputError(f"unknown value kind {kind!r} (numbers | words | uuids)")


def text_haystack(enc, rl, haystack: str, text: str | None) -> tuple[Iterator, str]:
    """(segment iterator, needle lead) for a text haystack: `noise` (RULER's paragraph, repeated
    one per line, as RULER joins it), `prose` or `code` (`text`, cycled from a seeded sentence)."""
    if haystack == "noise":
        sents = split_sentences(NOISE)
        sents[0] = "\n" + sents[0].lstrip()
        return cycle_from(sents, 0), "\n"
    if haystack in ("prose", "code"):
        if not text:
            raise InputError(f"a {haystack} haystack needs its text (text=...; "
                             "mc_jax.eval.tasks.read_haystack reads a file)")
        sents = split_sentences(text, haystack)
        return cycle_from(sents, rl.randrange(len(sents))), (" " if haystack == "prose" else "\n")
    raise InputError(f"unknown haystack {haystack!r} (noise | prose | code | needle)")


def split_template(template: str, **fmt) -> tuple[str, str]:
    """A RULER template -> (intro, question): the parts before and after {context}; the intro's
    trailing whitespace is left to the first context segment (the segment rule)."""
    pre, post = template.split("{context}")
    return pre.format(**fmt).rstrip(), post.format(**fmt)


# ---------------------------------------------------------------------------------- tasks ----

def _niah(enc, rc, rl, n_tokens, depth, *, num_keys=1, num_values=1, num_queries=1,
          key_kind="words", value_kind="numbers", haystack="noise", text=None, straddle=False,
          block_size=BLOCK_SIZE):
    num_keys = max(num_keys, num_queries)
    type_v = value_kind
    used, gold = set(), []
    queried = rc.sample(range(num_keys), num_queries)
    order = queried + [i for i in range(num_keys) if i not in queried]
    keys, values = {}, {}
    for i in order:  # gold first, so no distractor contains a gold string
        g = i in queried
        keys[i] = draw_distinct(rc, lambda r: random_value(r, key_kind), used, gold, g, "key")
        values[i] = [draw_distinct(rc, lambda r: random_value(r, value_kind), used, gold, g,
                                   "value") for _ in range(num_values)]
    if haystack == "needle":
        lead = "\n"

        def hay():
            while True:
                k = draw_distinct(rl, lambda r: random_value(r, key_kind), used, gold, False, "key")
                v = draw_distinct(rl, lambda r: random_value(r, value_kind), used, gold, False,
                                  "value")
                yield Piece(NIAH_NEEDLE.format(type_needle_v=type_v, key=k, value=v), lead,
                            "distractor", k, (v,))
        source = hay()
    else:
        source, lead = text_haystack(enc, rl, haystack, text)

    def piece(i, v, role):
        return Piece(NIAH_NEEDLE.format(type_needle_v=type_v, key=keys[i], value=v), lead, role,
                     keys[i], (v,))
    anchor = piece(queried[0], values[queried[0]][0], "anchor")
    free = [[piece(i, v, "gold")] for i in queried for v in values[i]][1:]
    free += [[piece(i, v, "distractor")] for i in order[num_queries:] for v in values[i]]
    rl.shuffle(free)
    qs = [keys[i] for i in queried]
    query = ", ".join(qs[:-1]) + ", and " + qs[-1] if len(qs) > 1 else qs[0]
    template, prefix = NIAH_TEMPLATE, NIAH_ANSWER_PREFIX
    if num_queries * num_values == 1:  # RULER's singular forms
        template, prefix = (s.replace("Some", "A").replace("are all", "is").replace("are", "is")
                            .replace("answers", "answer") for s in (template, prefix))
        type_v = type_v[:-1]
    intro, question = split_template(template, type_needle_v=type_v, query=query)
    lay = layout(enc, intro=intro, hay=source, n_tokens=n_tokens, rng=rl, anchor=anchor,
                 free_groups=free, depth=depth, straddle=straddle, block_size=block_size)
    refs = [v for i in queried for v in values[i]]
    return dict(layout=lay, question=question,
                answer_prefix=prefix.format(type_needle_v=type_v, query=query), references=refs,
                unique=refs + qs, meta=dict(haystack=haystack, key_kind=key_kind,
                                            value_kind=value_kind, num_keys=num_keys,
                                            num_values=num_values, num_queries=num_queries,
                                            keys=qs, straddle=straddle))


def _niah_task(name: str, **defaults):
    def build(enc, rc, rl, n_tokens, depth, **kw):
        return _niah(enc, rc, rl, n_tokens, depth, **{**defaults, **kw})
    build.forwards_to = _niah
    register_task(name)(build)


_niah_task("niah_single")
_niah_task("niah_multikey", num_keys=4)
_niah_task("niah_multivalue", num_values=4)
_niah_task("niah_multiquery", num_keys=4, num_queries=4)


@register_task("variable_tracking")
def _variable_tracking(enc, rc, rl, n_tokens, depth, *, num_chains=1, num_hops=4,
                       haystack="noise", text=None, straddle=False, block_size=BLOCK_SIZE):
    used, gold = set(), []
    name = lambda r: "".join(r.choices(string.ascii_uppercase, k=5))  # noqa: E731
    chains = []
    for c in range(num_chains):
        g = c == 0
        value = draw_distinct(rc, lambda r: str(r.randint(10000, 99998)), used, gold, g, "value")
        names = [draw_distinct(rc, name, used, gold, g, "variable") for _ in range(num_hops + 1)]
        chains.append((value, names))
    source, lead = text_haystack(enc, rl, haystack, text)

    def statements(value, names, gold_chain):
        out = [Piece(f"VAR {names[0]} = {value}", lead, "anchor" if gold_chain else "distractor",
                     names[0], (value,))]
        out += [Piece(f"VAR {names[j + 1]} = VAR {names[j]}", lead,
                      "gold" if gold_chain else "distractor", names[j + 1], ())
                for j in range(num_hops)]
        return out
    gold_st = statements(*chains[0], True)
    free = [statements(v, n, False) for v, n in chains[1:]]
    value, names = chains[0]
    intro, question = split_template(VT_TEMPLATE, query=value)
    lay = layout(enc, intro=intro, hay=source, n_tokens=n_tokens, rng=rl, anchor=gold_st[0],
                 free_groups=free, after=gold_st[1:], depth=depth, straddle=straddle,
                 block_size=block_size)
    return dict(layout=lay, question=question,
                answer_prefix=VT_ANSWER_PREFIX.format(num_v=num_hops + 1, query=value),
                references=names, unique=[value] + names,
                meta=dict(haystack=haystack, value_kind="5-digit value, 5-letter names",
                          num_chains=num_chains, num_hops=num_hops, value=value,
                          straddle=straddle))


@register_task("common_words", uses_depth=False)
def _common_words(enc, rc, rl, n_tokens, depth, *, freq_cw=30, freq_ucw=3, num_cw=10,
                  block_size=BLOCK_SIZE):
    w = wordlists()
    words = sorted(set(w["noun"]) | set(w["adjective"]) | set(w["verb"]))
    rc.shuffle(words)
    intro, question = split_template(CWE_TEMPLATE.replace("10", str(num_cw)))
    prefix = CWE_ANSWER_PREFIX.replace("10", str(num_cw))
    I = len(enc(intro))
    num_tok = functools.cache(lambda i: len(enc(f"{chr(10) if i == 1 else ' '}{i}.")))
    word_tok = lambda x: len(enc(" " + x))  # noqa: E731
    while True:  # the common words alone must fit, with at least one uncommon word
        total = I + sum(num_tok(i) for i in range(1, num_cw * freq_cw + freq_ucw + 1)) + \
            freq_cw * sum(word_tok(x) for x in words[:num_cw]) + freq_ucw * word_tok(words[num_cw])
        if total <= n_tokens:
            break
        if freq_cw // 2 <= freq_ucw:
            raise InputError(f"common_words: {n_tokens} tokens cannot hold {num_cw} common words; "
                             "ask for a longer history or lower num_cw / freq_cw")
        freq_cw //= 2
    nw, N = num_cw + 1, num_cw * freq_cw + freq_ucw
    next_cost = None
    while nw < len(words):
        cost = freq_ucw * word_tok(words[nw]) + sum(num_tok(N + k) for k in range(1, freq_ucw + 1))
        if total + cost > n_tokens:
            next_cost = cost
            break
        total, nw, N = total + cost, nw + 1, N + freq_ucw
    common, uncommon = words[:num_cw], words[num_cw:nw]
    items = common * freq_cw + uncommon * freq_ucw
    rl.shuffle(items)
    texts = [t for i, x in enumerate(items, 1) for t in (f"{chr(10) if i == 1 else ' '}{i}.",
                                                          f" {x}")]
    lay = fixed_layout(enc, intro, texts)
    lay.next_segment_tokens = next_cost
    return dict(layout=lay, question=question, answer_prefix=prefix, references=common,
                meta=dict(freq_cw=freq_cw, freq_ucw=freq_ucw, num_cw=num_cw, num_words=nw))


def _zeta(a: float) -> float:
    if a == 2.0:
        return math.pi ** 2 / 6
    n = 100_000
    return float(np.sum(np.arange(1, n + 1, dtype=np.float64) ** -a) + n ** (1 - a) / (a - 1)
                 - 0.5 * n ** -a)


@register_task("frequent_words", uses_depth=False)
def _frequent_words(enc, rc, rl, n_tokens, depth, *, coded_wordlen=6, vocab_size=2000,
                    alpha=2.0, block_size=BLOCK_SIZE):
    vocab = set()
    while len(vocab) < vocab_size:
        vocab.add("".join(rc.choices(string.ascii_lowercase, k=coded_wordlen)))
    vocab = sorted(vocab)
    rc.shuffle(vocab)
    vocab[0] = "..."  # RULER: the top rank is noise
    intro, question = split_template(FWE_TEMPLATE)
    I = len(enc(intro))
    tok = np.array([len(enc(" " + x)) for x in vocab], np.int64)
    weights = np.arange(1, vocab_size + 1, dtype=np.float64) ** -alpha / _zeta(alpha)
    counts = lambda nw: (nw * weights).astype(np.int64)  # noqa: E731
    total = lambda nw: I + int(counts(nw) @ tok)  # noqa: E731
    lo, hi = 0, 1
    while total(hi) <= n_tokens:
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= n_tokens else (lo, mid)
    c = counts(lo)
    if lo == 0 or not c[1] > c[2] > c[3] > c[4]:
        raise InputError(f"frequent_words: {n_tokens} tokens are too few to rank the coded words")
    words = [x for x, k in zip(vocab, c) for _ in range(int(k))]
    rl.shuffle(words)
    lay = fixed_layout(enc, intro, [" " + x for x in words])
    lay.next_segment_tokens = total(lo + 1) - total(lo)
    return dict(layout=lay, question=question, answer_prefix=FWE_ANSWER_PREFIX,
                references=vocab[1:4], meta=dict(num_words=lo, alpha=alpha,
                                                 counts=[int(k) for k in c[:5]]))
