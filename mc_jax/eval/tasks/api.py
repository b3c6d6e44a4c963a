"""`generate` one case of a task, or a `grid` of them; deterministic by seed.

Seeds: the content (keys, values, names, words) comes from (task, seed, options) alone, so one
seed gives the same needle at every length and depth (paired cells); the layout also depends on
the length and depth. A case is redrawn (the attempt is in `meta`; a redraw changes the content
too) until each gold string occurs only inside gold needles and, with `straddle`, until some
sentence boundary lets the needle straddle.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import random
from typing import Iterator

from mc_jax.errors import InputError
from mc_jax.eval.tasks import planted, ruler  # noqa: F401  (they register their tasks)
from mc_jax.eval.tasks.assembly import (BLOCK_SIZE, Encoder, Layout, NoStraddle, blocks_of,
                                        only_in_gold)
from mc_jax.eval.tasks.case import TASKS, Case
from mc_jax.eval.tasks.ruler import RULER_VARIANTS


def task_names() -> list[str]:
    return sorted(TASKS) + sorted(RULER_VARIANTS)


def resolve(task: str) -> tuple[str, dict]:
    """A task or RULER variant name -> (task, its options)."""
    if task in TASKS:
        return task, {}
    if task in RULER_VARIANTS:
        name, opts = RULER_VARIANTS[task]
        return name, dict(opts)
    raise InputError(f"unknown task {task!r}; known: {', '.join(task_names())}")


def generate(task: str, tokenizer, n_tokens: int, depth: float | None = 0.5, seed: int = 0,
             *, block_size: int = BLOCK_SIZE, check_text: bool = True, max_attempts: int = 20,
             **opts) -> Case:
    """One case of `task` (a name of `TASKS` or of `RULER_VARIANTS`) with a history of at most
    `n_tokens` tokens (the length rule in `assembly`) and, for the needle tasks, the anchor needle's
    first token at `depth`, a fraction of the history outside the intro and the anchor (the
    placement rule in `assembly`; `Case.needle_token` is the exact index). Options: `haystack`
    (noise | prose | code | needle), `text` (the prose / code), `straddle` (the anchor across a
    block boundary) and the keyword arguments of the task's builder (`ruler`, `planted`).
    Deterministic in (task, tokenizer, n_tokens, depth, seed, options)."""
    name, base = resolve(task)
    opts = {**base, **opts}
    spec = TASKS[name]
    allowed = task_options(name)
    if set(opts) - set(allowed):
        raise InputError(f"task {task!r} takes no option {sorted(set(opts) - set(allowed))}; "
                         f"its options: {', '.join(allowed)}")
    if int(n_tokens) <= 0:
        raise InputError(f"n_tokens must be positive, got {n_tokens!r}")
    if spec.uses_depth and (depth is None or not 0.0 <= float(depth) <= 1.0):
        raise InputError(f"depth must be in [0, 1], got {depth!r}")
    depth = float(depth) if spec.uses_depth else None
    key_opts = {k: (hashlib.sha256(v.encode()).hexdigest() if k == "text" else v)
                for k, v in sorted(opts.items())}
    layout_only = {"straddle"}
    content_key = {k: v for k, v in key_opts.items() if k not in layout_only}
    enc = Encoder(tokenizer)
    for attempt in range(max_attempts):
        rc = random.Random(_digest("content", name, seed, attempt, content_key))
        rl = random.Random(_digest("layout", name, seed, attempt, key_opts, int(n_tokens), depth,
                                   block_size))
        try:
            out = spec.build(enc, rc, rl, int(n_tokens), depth, block_size=block_size, **opts)
        except NoStraddle:
            if attempt == max_attempts - 1:
                raise
            continue
        lay: Layout = out["layout"]
        if only_in_gold(lay.history, lay.needles, out.get("unique", ())):
            break
    else:
        raise InputError(f"{task}: in {max_attempts} draws a gold string also occurred outside "
                         "the needles (the haystack text contains it); try another seed or text")
    gold = sorted({b for n in lay.needles if n.gold for b in blocks_of(n.token_span, block_size)})
    dis = sorted({b for n in lay.needles if not n.gold
                  for b in blocks_of(n.token_span, block_size)})
    anchor = lay.needles[lay.anchor_index] if lay.anchor_index is not None else None
    ids_ok = ([int(i) for i in tokenizer.encode(lay.history)] == lay.ids.tolist()
              if check_text else None)
    meta = dict(seed=seed, attempt=attempt, task=task, opts={k: v for k, v in opts.items()
                                                             if k != "text"},
                intro_tokens=lay.intro_tokens, next_segment_tokens=lay.next_segment_tokens,
                after=list(lay.after_indices),
                **out.get("meta", {}))
    return Case(task=name, history=lay.history, history_ids=lay.ids, question=out["question"],
                answer_prefix=out["answer_prefix"], references=list(out["references"]),
                metric=spec.metric, needles=lay.needles, gold_blocks=gold, distractor_blocks=dis,
                n_tokens=len(lay.ids), target_tokens=int(n_tokens), depth=depth,
                needle_token=anchor.token_span[0] if anchor else None,
                target_token=lay.target_token, segment_starts=lay.segment_starts,
                ids_match_text=ids_ok, block_size=block_size,
                meta=meta)


def task_options(task: str) -> list[str]:
    """The options (keyword arguments of its builder) a task takes."""
    fn = TASKS[resolve(task)[0]].build
    fn = getattr(fn, "forwards_to", fn)  # the niah tasks are _niah with other defaults
    return sorted(p for p, v in inspect.signature(fn).parameters.items()
                  if v.kind in (v.KEYWORD_ONLY, v.POSITIONAL_OR_KEYWORD)
                  and p not in ("enc", "rc", "rl", "n_tokens", "depth", "block_size"))


def grid(tasks, lengths, depths, n_per_cell: int, seed: int = 0, *, tokenizer,
         **opts) -> Iterator[Case]:
    """Cases for every task x length x depth x index, in that order. `tasks`: names or
    (name, options) pairs. Case i of a cell has seed `case_seed(seed, i)`, the same in every cell,
    so its content is shared across lengths and depths; the tasks without a needle (common_words,
    frequent_words) take one depth, None."""
    for t in tasks:
        name, topts = (t, {}) if isinstance(t, str) else (t[0], dict(t[1]))
        spec = TASKS[resolve(name)[0]]
        for n in lengths:
            for d in (depths if spec.uses_depth else [None]):
                for i in range(n_per_cell):
                    yield generate(name, tokenizer, n, d, case_seed(seed, i), **{**opts, **topts})


def case_seed(seed: int, i: int) -> int:
    return int.from_bytes(hashlib.sha256(f"ruler-lite:{seed}:{i}".encode()).digest()[:4], "little")


def _digest(*parts) -> int:
    s = json.dumps(parts, sort_keys=True, default=str)
    return int.from_bytes(hashlib.sha256(s.encode()).digest()[:8], "little")
