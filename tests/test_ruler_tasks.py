"""RULER-lite task generator (mc_jax.eval.tasks): placement by token index, straddling, seeds, the
answer once, distinct distractors, length tolerance, scorers, gold blocks. Every rule is checked
against a brute-force recomputation from the case's own segments and ids."""
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mc_jax.base.tiny import ByteTokenizer
from mc_jax.errors import InputError
from mc_jax.eval.tasks import (BLOCK_SIZE, TASKS, Case, case_seed, generate, grid, read_haystack,
                               split_sentences, string_match_all, string_match_part, task_names)
from mc_jax.eval.tasks.assembly import occurrences

PROSE = (Path(__file__).parent / "data" / "prose.txt").read_text()
CODE = (Path(__file__).resolve().parents[1] / "mc_jax/eval/tasks/assembly.py").read_text()
BYTES = ByteTokenizer()
NEEDLE_TASKS = [
    ("niah_single", {}), ("niah_single", dict(value_kind="uuids", haystack="prose", text=PROSE)),
    ("niah_single", dict(value_kind="words")), ("niah_multikey", {}),
    ("niah_multikey", dict(haystack="needle")), ("niah_multikey_3", {}),
    ("niah_multivalue", {}), ("niah_multiquery", dict(haystack="prose", text=PROSE)),
    ("variable_tracking", {}), ("variable_tracking", dict(num_chains=3)), ("passkey", {}),
    ("passkey", dict(haystack="prose", text=PROSE)), ("planted_fact", dict(text=PROSE)),
    ("planted_fact", dict(text=CODE, haystack="code", distractors=3)),
]
FAST = settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def seg_bounds(case: Case):
    """(start, end) token range of every segment."""
    s = list(case.segment_starts) + [case.n_tokens]
    return list(zip(s[:-1], s[1:]))


def seg_of(case: Case, span):
    return next(i for i, (a, b) in enumerate(seg_bounds(case)) if a <= span[0] and span[1] <= b)


def check_placement(case: Case):
    """The placement rule, recomputed: body = segments minus the intro, the anchor and the needles
    after it; the anchor sits at the body boundary nearest depth * (B + A) (ties: earlier), or with
    straddle at the nearest one whose placement puts a block boundary inside the value."""
    bounds = seg_bounds(case)
    anchor = case.anchor
    a_seg = seg_of(case, anchor.token_span)
    after = {seg_of(case, case.needles[i].token_span) for i in case.meta["after"]}
    assert all(s > a_seg for s in after)
    body = [i for i in range(1, len(bounds)) if i != a_seg and i not in after]
    lens = [bounds[i][1] - bounds[i][0] for i in body]
    offs = np.concatenate([[0], np.cumsum(lens)])
    A = sum(bounds[i][1] - bounds[i][0] for i in after)
    goal = case.depth * (offs[-1] + A)
    j = sum(1 for i in body if i < a_seg)
    I = case.meta["intro_tokens"]
    lead = anchor.token_span[0] - bounds[a_seg][0]
    assert lead in (0, 1) and bounds[a_seg][0] == I + offs[j]
    assert case.needle_token == I + offs[j] + lead
    assert case.target_token == pytest.approx(I + lead + goal)
    v = anchor.value_token_spans[0]
    span = (v[0] - bounds[a_seg][0], v[1] - bounds[a_seg][0]) if v[1] - v[0] >= 2 else \
        (anchor.token_span[0] - bounds[a_seg][0], anchor.token_span[1] - bounds[a_seg][0])

    def ok(k):
        if not case.meta["straddle"]:
            return True
        s0, s1 = I + offs[k] + span[0], I + offs[k] + span[1] - 1
        return s0 // case.block_size != s1 // case.block_size

    assert ok(j)
    better = [k for k in range(len(offs)) if (abs(offs[k] - goal), k) < (abs(offs[j] - goal), j)]
    assert not any(ok(k) for k in better)
    if not case.meta["straddle"] and goal <= offs[-1]:  # within half a sentence of the target
        gaps = [offs[k + 1] - offs[k] for k in (j - 1, j) if 0 <= k < len(offs) - 1]
        assert abs(case.needle_token - case.target_token) <= max(gaps + [0]) / 2 + 1e-9


def check_spans(case: Case, tok):
    ids = case.history_ids
    for n in case.needles:
        a, b = n.char_span
        assert case.history[a:b] == n.text
        t0, t1 = n.token_span
        assert tok.decode(ids[t0:t1]).strip() == n.text
        assert tok.decode(ids[t0 + 1:t1]).strip() != n.text  # the span is tight
        for (v0, v1) in n.value_token_spans:
            assert tok.decode(ids[v0:v1]).strip() in n.values


def brute_gold_blocks(case: Case, gold=True):
    spans = [n.token_span for n in case.needles if n.gold == gold]
    nb = -(-case.n_tokens // case.block_size)
    return [b for b in range(nb) if any(s <= t < e for s, e in spans
                                        for t in range(b * case.block_size,
                                                       (b + 1) * case.block_size))]


def check_unique(case: Case):
    """The answers (and gold keys) occur only inside gold needles: once for niah and facts."""
    gold = [n.char_span for n in case.needles if n.gold]
    for r in case.references:
        occ = occurrences(case.history, r)
        assert occ and all(any(a <= o and o + len(r) <= b for a, b in gold) for o in occ)
        if case.task.startswith("niah") or case.task == "planted_fact":
            assert len(occ) == 1, (r, len(occ))
    if case.task == "passkey":
        assert len(occurrences(case.history, case.references[0])) == 2  # the needle says it twice
    if case.task == "variable_tracking":
        assert len(occurrences(case.history, case.meta["value"])) == 1


def check_distinct(case: Case):
    g = [n for n in case.needles if n.gold]
    d = [n for n in case.needles if not n.gold]
    gold_strings = {s.lower() for n in g for s in (n.key, *n.values) if s}
    dis_keys = [n.key.lower() for n in d if n.key]
    dis_values = [v.lower() for n in d for v in n.values]
    for s in dis_keys + dis_values:
        assert not any(s in x or x in s for x in gold_strings), s
    assert len(set(dis_values)) == len(dis_values)
    if case.task != "niah_multivalue":  # there a distractor key has 4 needles
        assert len(set(dis_keys)) == len(dis_keys)


@FAST
@given(t=st.sampled_from(NEEDLE_TASKS), n=st.integers(1024, 6000), depth=st.floats(0, 1),
       seed=st.integers(0, 10 ** 6), straddle=st.booleans())
def test_needle_tasks_hold_every_rule(t, n, depth, seed, straddle):
    name, opts = t
    case = generate(name, BYTES, n, depth, seed, straddle=straddle, **opts)
    assert case.ids_match_text and case.history_ids.tolist() == list(case.history.encode())
    check_placement(case)
    check_spans(case, BYTES)
    assert case.gold_blocks == brute_gold_blocks(case)
    assert case.distractor_blocks == brute_gold_blocks(case, gold=False)
    check_unique(case)
    check_distinct(case)
    # length: whole sentences while they fit, so short by less than the one that did not
    assert 0 <= case.target_tokens - case.n_tokens < case.meta["next_segment_tokens"]
    if straddle:
        v0, v1 = case.anchor.value_token_spans[0]
        nb = (v1 - 1) // BLOCK_SIZE - v0 // BLOCK_SIZE + 1
        assert nb >= 2 and (nb == 2 or v1 - v0 > BLOCK_SIZE)  # two consecutive blocks
        blocks = sorted({t // BLOCK_SIZE for t in range(*case.anchor.token_span)})
        assert len(blocks) >= 2 and blocks == list(range(blocks[0], blocks[-1] + 1))


@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_depth_extremes_and_exact_token_index(depth):
    case = generate("niah_single", BYTES, 4096, depth, seed=7)
    check_placement(case)
    # noise sentences are at most 23 bytes: the needle is within half a sentence of the target
    assert abs(case.needle_token - case.target_token) <= 12
    if depth == 0.0:
        assert case.needle_token == case.meta["intro_tokens"] + 1  # right after the intro, "\n"
    vt = generate("variable_tracking", BYTES, 2048, depth, seed=7)
    check_placement(vt)
    starts = [n.token_span[0] for n in vt.gold_needles]
    assert starts == sorted(starts) and vt.gold_needles[0].role == "anchor"


def test_same_seed_same_case_different_seed_different_case():
    for name, opts in NEEDLE_TASKS + [("common_words", {}), ("frequent_words", {})]:
        a = generate(name, BYTES, 2048, 0.4, 11, **opts)
        b = generate(name, BYTES, 2048, 0.4, 11, **opts)
        c = generate(name, BYTES, 2048, 0.4, 12, **opts)
        assert a.history == b.history and np.array_equal(a.history_ids, b.history_ids)
        assert a.references == b.references and a.needles == b.needles
        assert a.question == b.question and a.gold_blocks == b.gold_blocks
        assert a.history != c.history and a.references != c.references, name
    # the content depends on the seed only: the same needle at another depth and length
    x = generate("niah_multikey", BYTES, 2048, 0.1, 5)
    y = generate("niah_multikey", BYTES, 4096, 0.9, 5)
    assert x.references == y.references and x.meta["keys"] == y.meta["keys"]
    assert x.needle_token < y.needle_token


def test_grid_is_deterministic_and_complete():
    tasks = ["niah_single", ("niah_multikey", dict(haystack="needle")), "common_words"]
    g1 = list(grid(tasks, [1024, 2048], [0.0, 0.5, 1.0], 2, seed=3, tokenizer=BYTES))
    g2 = list(grid(tasks, [1024, 2048], [0.0, 0.5, 1.0], 2, seed=3, tokenizer=BYTES))
    assert len(g1) == 2 * 2 * 3 * 2 + 2 * 2  # common_words: no depth axis
    assert [c.history for c in g1] == [c.history for c in g2]
    assert [c.depth for c in g1 if c.task == "common_words"] == [None] * 4
    assert g1[0].meta["seed"] == case_seed(3, 0) and g1[1].meta["seed"] == case_seed(3, 1)
    assert g1[0].references == g1[2].references  # case 0 of every cell shares its needle
    g3 = list(grid(["niah_single"], [1024], [0.5], 2, seed=4, tokenizer=BYTES))
    assert g3[0].history != g1[0].history


def test_scorers_on_hand_made_examples():
    assert string_match_all("The numbers are 1234567 and 7654321.", ["1234567", "7654321"]) == 100
    assert string_match_all("It is 1234567.", ["1234567", "7654321"]) == 50
    assert string_match_all("nothing", ["a-b", "c-d", "e-f", "g-h"]) == 0
    assert string_match_all("FEARLESS-TRUST", ["fearless-trust"]) == 100  # case-insensitive
    assert string_match_all("ABCDE FGHIJ", ["abcde", "fghij", "klmno"]) == pytest.approx(200 / 3)
    assert string_match_part("It is 7654321.", ["1234567", "7654321"]) == 100
    assert string_match_part("Cardamom, of course", ["cardamom"]) == 100
    assert string_match_part("", ["x"]) == 0
    with pytest.raises(ValueError):
        string_match_all("x", [])
    case = generate("niah_multivalue", BYTES, 2048, 0.5, 0)
    assert case.metric == "string_match_all" and len(case.references) == 4
    assert case.score(" ".join(case.references[:3])) == 75
    fact = generate("planted_fact", BYTES, 2048, 0.5, 0, text=PROSE)
    assert fact.metric == "string_match_part" and fact.score(fact.references[0].upper()) == 100
    assert {TASKS[t].metric for t in TASKS if t != "planted_fact"} == {"string_match_all"}


def test_ruler_templates_and_singular_forms():
    one = generate("niah_single", BYTES, 1024, 0.5, 1)
    key = one.meta["keys"][0]
    assert one.history.startswith(
        "A special magic number is hidden within the following text. Make sure to memorize it. I "
        "will quiz you about the number afterwards.\nThe grass is green. The sky is blue. The sun "
        "is yellow. Here we go. There and back again.\nThe grass")
    assert one.question == (f"\nWhat is the special magic number for {key} mentioned in the "
                            "provided text?")
    assert one.answer_prefix == (f" The special magic number for {key} mentioned in the provided "
                                 "text is")
    assert one.anchor.text == f"One of the special magic numbers for {key} is: {one.references[0]}."
    many = generate("niah_multiquery", BYTES, 2048, 0.5, 1, value_kind="uuids")
    k = many.meta["keys"]
    q = f"{k[0]}, {k[1]}, {k[2]}, and {k[3]}"
    assert many.history.startswith("Some special magic uuids are hidden within the following text."
                                   " Make sure to memorize it. I will quiz you about the uuids "
                                   "afterwards.\n")
    assert many.question == (f"\nWhat are all the special magic uuids for {q} mentioned in the "
                             "provided text?")
    assert many.answer_prefix == (f" The special magic uuids for {q} mentioned in the provided "
                                  "text are")
    assert all(len(r) == 36 and r[14] == "4" for r in many.references)  # uuid version 4
    vt = generate("variable_tracking", BYTES, 1024, 0.5, 1)
    val = vt.meta["value"]
    assert vt.history.startswith("Memorize and track the chain(s) of variable assignment hidden in "
                                 "the following text.")
    assert vt.question == (f"\nQuestion: Find all variables that are assigned the value {val} in "
                           "the text above.")
    assert vt.answer_prefix == (" Answer: According to the chain(s) of variable assignment in the "
                                f"text above, 5 variables are assigned the value {val}, they are: ")
    names = vt.references
    assert [n.text for n in vt.gold_needles] == [f"VAR {names[0]} = {val}"] + [
        f"VAR {names[i + 1]} = VAR {names[i]}" for i in range(4)]


def test_common_and_frequent_words_answers():
    cwe = generate("common_words", BYTES, 8192, None, 2)
    items = [w for i, w in enumerate(cwe.history.split("\n", 1)[1].split(" ")) if i % 2 == 1]
    counts = {w: items.count(w) for w in set(items)}
    assert sorted(counts[w] for w in cwe.references) == [30] * 10
    assert set(counts.values()) == {30, 3} and cwe.needles == [] and cwe.gold_blocks == []
    assert cwe.question == "\nQuestion: What are the 10 most common words in the above list?"
    assert cwe.answer_prefix == " Answer: The top 10 words that appear most often in the list are:"
    assert 0 <= cwe.target_tokens - cwe.n_tokens < cwe.meta["next_segment_tokens"]
    fwe = generate("frequent_words", BYTES, 8192, None, 2)
    words = fwe.history.split("coded words. ", 1)[1].split(" ")
    ranked = sorted(set(words), key=lambda w: -words.count(w))
    assert ranked[0] == "..." and ranked[1:4] == fwe.references
    assert words.count(ranked[3]) > words.count(ranked[4])
    assert 0 <= fwe.target_tokens - fwe.n_tokens < fwe.meta["next_segment_tokens"]


def test_passkey_reuses_the_evaluator_strings():
    from mc_jax.eval.tasks.planted import INTRO, NEEDLE, QUESTION
    case = generate("passkey", BYTES, 2048, 0.5, 3)
    key = case.references[0]
    assert case.history.startswith(INTRO + " The grass is green.")
    assert case.anchor.text == NEEDLE.format(key=key).strip()
    assert case.question + case.answer_prefix == QUESTION
    assert len(case.anchor.value_token_spans) == 2


def test_block_size_is_the_runtime_k():
    from mc_jax.eval.policies.protocol import K
    assert BLOCK_SIZE == K


def test_split_sentences_obeys_the_segment_rule():
    for kind, text in (("prose", PROSE), ("code", CODE)):
        segs = split_sentences(text, kind, max_chars=120)
        assert "".join(segs)[2:] == text.strip().replace("\r\n", "\n")
        assert all(s[0].isspace() and not s[-1].isspace() for s in segs)
        assert all(len(s) <= 130 for s in segs if " " in s.strip())
    assert split_sentences("One. Two! Three? Four")[1:] == [" Two!", " Three?", " Four"]


def test_errors_and_haystack_file(tmp_path):
    with pytest.raises(InputError):
        generate("niah_multiquery", BYTES, 200, 0.5, 0)  # the needles alone do not fit
    with pytest.raises(InputError):
        generate("niah_single_2", BYTES, 2048, 0.5, 0)  # a prose haystack needs its text
    with pytest.raises(InputError):
        generate("no_such_task", BYTES, 2048, 0.5, 0)
    with pytest.raises(InputError):
        generate("niah_single", BYTES, 2048, 1.5, 0)
    p = tmp_path / "hay.txt"
    p.write_text(PROSE)
    assert read_haystack(p, max_chars=100) == PROSE[:100]
    with pytest.raises(InputError):
        read_haystack(tmp_path / "missing.txt")
    assert {"niah_single_1", "niah_multikey_2", "vt", "cwe", "fwe"} <= set(task_names())


# ------------------------------------------------------------------------------ SmolLM2 ----

@pytest.fixture(scope="module")
def smol():
    from mc_jax.base.loading import load_tokenizer
    return load_tokenizer()


@pytest.mark.smollm2
@pytest.mark.parametrize("name,opts", [("niah_single", {}),
                                       ("niah_multikey", dict(haystack="prose", text=PROSE)),
                                       ("variable_tracking", {}), ("passkey", {}),
                                       ("planted_fact", dict(text=CODE, haystack="code"))])
def test_smollm2_placement_and_straddle(smol, name, opts):
    for depth, straddle in ((0.0, False), (0.37, False), (0.61, True), (1.0, True)):
        case = generate(name, smol, 8192, depth, 21, straddle=straddle, **opts)
        assert case.ids_match_text  # encode(history) is the concatenation of the segments
        check_placement(case)
        check_spans(case, smol)
        check_unique(case)
        check_distinct(case)
        assert case.gold_blocks == brute_gold_blocks(case)
        assert 0 <= case.target_tokens - case.n_tokens < case.meta["next_segment_tokens"]
        if straddle:  # a short needle: exactly two consecutive blocks
            blocks = sorted({t // BLOCK_SIZE for t in range(*case.anchor.token_span)})
            assert blocks == [blocks[0], blocks[0] + 1]


@pytest.mark.smollm2
def test_smollm2_long_history_and_word_tasks(smol):
    case = generate("niah_multikey_2", smol, 32768, 0.5, 1)
    assert case.ids_match_text and case.target_tokens - case.n_tokens < 30
    assert len(case.distractor_needles) > 1000
    check_distinct(case)
    check_unique(case)
    for name in ("common_words", "frequent_words"):
        c = generate(name, smol, 4096, None, 1)
        assert c.ids_match_text and 0 <= 4096 - c.n_tokens < c.meta["next_segment_tokens"]


def test_unknown_options_are_refused():
    from mc_jax.eval.tasks.api import task_options
    assert {"haystack", "text", "straddle", "value_kind", "num_keys"} <= set(
        task_options("niah_multikey"))
    assert "distractors" in task_options("planted_fact")
    with pytest.raises(InputError, match="no option"):
        generate("niah_single", BYTES, 2048, 0.5, 0, value_kinds="uuids")
    with pytest.raises(InputError, match="no option"):
        generate("common_words", BYTES, 2048, None, 0, straddle=True)


_DIGEST = """
import hashlib, os
from mc_jax.base.tiny import ByteTokenizer
from mc_jax.eval.tasks import grid
h = hashlib.sha256()
for c in grid(["niah_multikey_2", "variable_tracking", "common_words", "frequent_words",
               ("planted_fact", dict(text=open(os.environ["RULER_PROSE"]).read()))], [1024],
              [0.3], 2, seed=9, tokenizer=ByteTokenizer()):
    h.update(c.history.encode() + repr(c.references).encode())
digest = h.hexdigest()
print(digest)
"""


def test_cases_do_not_depend_on_the_process(monkeypatch):
    """Same seed, another interpreter with another string-hash seed: the same cases."""
    import os
    import subprocess
    import sys
    monkeypatch.setenv("RULER_PROSE", str(Path(__file__).parent / "data" / "prose.txt"))
    ns = {}
    exec(_DIGEST, ns)
    root = str(Path(__file__).resolve().parents[1])
    hash_seed = "1" if os.environ.get("PYTHONHASHSEED") != "1" else "2"
    out = subprocess.run([sys.executable, "-c", _DIGEST], capture_output=True, text=True,
                         timeout=120, env=dict(os.environ, PYTHONHASHSEED=hash_seed,
                                               PYTHONPATH=root, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ns["digest"]
