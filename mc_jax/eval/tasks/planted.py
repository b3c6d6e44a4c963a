"""Needles planted outside RULER: the Landmark Attention passkey (its strings, which the passkey
evaluator uses too) and named facts in prose or code, asked in natural language."""

from __future__ import annotations

from mc_jax.errors import InputError
from mc_jax.eval.tasks.assembly import (BLOCK_SIZE, Piece, cycle_from, draw_distinct, layout,
                                        split_sentences)
from mc_jax.eval.tasks.case import register_task
from mc_jax.eval.tasks.ruler import random_value, text_haystack

# The Landmark Attention passkey (Mohtashami & Jaggi 2023)
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n")
REPEAT_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                 "back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


@register_task("passkey")
def _passkey(enc, rc, rl, n_tokens, depth, *, haystack="noise", text=None, straddle=False,
             block_size=BLOCK_SIZE):
    key = str(rc.randint(10000, 99999))
    if haystack == "noise":  # the Landmark filler, space-joined as in passkey_case
        source = cycle_from(split_sentences(REPEAT_FILLER.strip()), 0)
        source = (" " + s.lstrip() for s in source)
    else:
        source, _ = text_haystack(enc, rl, haystack, text)
    needle = NEEDLE.format(key=key)
    anchor = Piece(needle.strip(), needle[:len(needle) - len(needle.lstrip())] or " ", "anchor",
                   None, (key,))
    cut = QUESTION.index("?") + 1
    lay = layout(enc, intro=INTRO, hay=source, n_tokens=n_tokens, rng=rl, anchor=anchor,
                 depth=depth, straddle=straddle, block_size=block_size)
    return dict(layout=lay, question=QUESTION[:cut], answer_prefix=QUESTION[cut:],
                references=[key], unique=[key],
                meta=dict(haystack=haystack, value_kind="5-digit key", straddle=straddle))


# planted facts: (sentence, question, answer prefix, value pool or generator)
_TITLES = ["Mrs.", "Mr.", "Dr.", "Professor", "Captain", "Aunt", "Uncle", "Miss"]
_SURNAMES = ["Alder", "Birchwood", "Calloway", "Drummond", "Ellery", "Fairweather", "Grimsby",
             "Hawthorne", "Ingram", "Jessup", "Kettering", "Lindqvist", "Montague", "Nettleship",
             "Oakes", "Pemberton", "Quincey", "Rutherford", "Sallow", "Thistlewood", "Underhill",
             "Vantreight", "Whitlock", "Yardley"]
FACTS = [
    ("The secret ingredient of {name}'s pie is {value}.",
     "What is the secret ingredient of {name}'s pie?",
     "The secret ingredient of {name}'s pie is",
     ["cardamom", "saffron", "tamarind", "juniper", "sumac", "fenugreek", "star anise",
      "lemongrass", "allspice", "galangal", "asafoetida", "black cumin"]),
    ("{name} hid the spare key to the lighthouse inside a {value}.",
     "Where did {name} hide the spare key to the lighthouse?",
     "{name} hid the spare key to the lighthouse inside a",
     ["hollow boot", "tin of biscuits", "cracked teapot", "wooden duck", "coil of rope",
      "brass lantern", "flour sack", "violin case", "hatbox", "clay jar"]),
    ("The name of {name}'s sailing boat is the {value}.",
     "What is the name of {name}'s sailing boat?",
     "The name of {name}'s sailing boat is the",
     ["Marigold Star", "Quiet Heron", "Saltwind", "Blue Tern", "Northern Lark", "Copper Gull",
      "Amber Wave", "Silver Otter", "Morning Wren", "Red Kestrel"]),
    ("{name} was born in the village of {value}.",
     "In which village was {name} born?",
     "{name} was born in the village of",
     ["Ashcombe Vale", "Brindlemoor", "Cotterwick", "Dunmarrow", "Elderholt", "Fennimere",
      "Glasswater", "Hollowmere", "Kestrelby", "Larkspur Hollow", "Wrenfold", "Oxley Marsh"]),
    ("The combination of {name}'s safe is {value}.",
     "What is the combination of {name}'s safe?",
     "The combination of {name}'s safe is",
     lambda r: "-".join(str(r.randint(10, 99)) for _ in range(3))),
    ("The password to {name}'s workshop is {value}.",
     "What is the password to {name}'s workshop?",
     "The password to {name}'s workshop is",
     lambda r: random_value(r, "words")),
    ("{name} keeps a pet {value} in the garden shed.",
     "What kind of pet does {name} keep in the garden shed?",
     "{name} keeps a pet",
     ["tortoise", "ferret", "hedgehog", "parrot", "iguana", "chinchilla", "salamander",
      "tree frog", "barn owl", "guinea pig"]),
]


@register_task("planted_fact", metric="string_match_part")
def _planted_fact(enc, rc, rl, n_tokens, depth, *, text=None, haystack="prose", fact=None,
                  distractors=0, comment="# ", straddle=False, block_size=BLOCK_SIZE):
    """A fact sentence planted in prose (`haystack="prose"`, the default) or code (`"code"`, as a
    comment line), asked in natural language; `distractors` more facts of the same template about
    other people, with other values."""
    fi = rc.randrange(len(FACTS)) if fact is None else int(fact)
    sentence, q, prefix, pool = FACTS[fi]
    make_value = pool if callable(pool) else (lambda r: r.choice(pool))
    if distractors >= min(len(_SURNAMES), len(pool) if not callable(pool) else len(_SURNAMES)):
        raise InputError(f"planted_fact {fi}: too many distractors ({distractors})")
    used, gold = set(), []
    people = []
    for d, surname in enumerate(rc.sample(_SURNAMES, distractors + 1)):  # one person a surname
        people.append((draw_distinct(rc, lambda r: f"{r.choice(_TITLES)} {surname}", used, gold,
                                     d == 0, "name"),
                       draw_distinct(rc, make_value, used, gold, d == 0, "value")))
    source, lead = text_haystack(enc, rl, haystack, text)
    pre = comment if haystack == "code" else ""

    def piece(name, value, role):
        return Piece(pre + sentence.format(name=name, value=value), lead, role, name, (value,))
    (name, value), others = people[0], people[1:]
    lay = layout(enc, intro="", hay=source, n_tokens=n_tokens, rng=rl,
                 anchor=piece(name, value, "anchor"),
                 free_groups=[[piece(n, v, "distractor")] for n, v in others], depth=depth,
                 straddle=straddle, block_size=block_size)
    return dict(layout=lay, question="\n" + q.format(name=name),
                answer_prefix=" " + prefix.format(name=name), references=[value],
                unique=[value, name], meta=dict(haystack=haystack, value_kind="fact", fact=fi,
                                                name=name, distractors=distractors,
                                                straddle=straddle))
