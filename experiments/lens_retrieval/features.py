"""Per-block retrieval features for fitting the question-aware LensNet (issue 19, items 2 and 4).

For every case: the attention statistics of the `retrieve` heads from the question onto each
complete history block (`RetrievePolicy.block_stats`: softmax mass and logit excess per head),
BM25 scores of the blocks against the question (`bm25_scores`), each block's LOD1 gist (the
shipped GistNet over the block's token embeddings), the question's token embeddings, and the
labels: the gold blocks (the answer's needle, free for a generated task) and the distractors'.

Splits (decided before any fit; nothing of `eval` is ever used for fitting or for choices):
- `train`: niah_single (1 key) and niah_multikey (4 keys) with UUID keys and UUID values (the
  evaluation uses adjective-noun keys and 7-digit values) in a prose haystack of training-split
  Python reST documentation (the evaluation uses RULER's noise and Genesis); 1,024-3,072 tokens;
  seeds 1000+.
- `eval`: exactly the cpu_ruler:quick cases (experiments/configs/cpu_ruler.py, seed 0, cases
  0-3) at 2,048 and 8,192 tokens: niah_single (noise), niah_multikey (Genesis) and passkey, a task
  family training never sees.
- `train2` (the second fit, see README.md): as `train`, with needles as short as the
  evaluation's: keys two words of the training text that are not in wonderwords' lists, values
  8-digit numbers; seeds 2000+.
- `eval2`: cpu_ruler's cases 4-11 (seed 0) at 2,048 and 8,192 tokens, never looked at before
  the second fit was fixed: the judgement of the second fit.

    python experiments/lens_retrieval/features.py train 96
    python experiments/lens_retrieval/features.py eval
    python experiments/lens_retrieval/features.py train2 96
    python experiments/lens_retrieval/features.py eval2

One .npz per case under experiments/lens_retrieval/cache/<split>/ (resumable: existing files are
kept). Not committed (rebuilt by these commands).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
TRAIN_LENGTHS = (1024, 2048, 3072)


def training_text(max_chars: int = 400_000) -> str:
    """Training-split Python reST documents (`mc_jax.data.corpus`'s split), concatenated."""
    from mc_jax.data import corpus

    docs = [(n, r) for n, r in corpus.pydoc_documents()
            if not corpus.is_validation("pydoc", n, corpus.DEFAULT_VALIDATION_PERCENT)]
    out, n = [], 0
    for name, read in docs:
        t = read()
        if "tutorial" in name or "library" in name:
            out.append(t)
            n += len(t)
        if n > max_chars:
            break
    return "\n\n".join(out)


def train_cases(tok, n: int):
    from mc_jax.eval import tasks

    text = training_text()
    rng = np.random.default_rng(0)
    for i in range(n):
        task = "niah_single" if i % 2 == 0 else "niah_multikey"
        L = TRAIN_LENGTHS[i % len(TRAIN_LENGTHS)]
        depth = float(rng.uniform(0.05, 0.95))
        case = tasks.generate(task, tok, L, depth, 1000 + i, check_text=False, haystack="prose",
                              text=text, key_kind="uuids", value_kind="uuids",
                              straddle=bool(i % 4 >= 2))
        yield f"{i:04d}_{task}_{L}", case, True


TRAIN_WORD_COUNT = 2000


def training_words(text: str) -> list[str]:
    """Lower-case words of the training text (4-10 letters, >= 5 occurrences) that are not in
    wonderwords' lists (the evaluation's key vocabulary): the `train2` keys' vocabulary."""
    import collections
    import re

    from mc_jax.eval.tasks.ruler import wordlists

    banned = set().union(*map(set, wordlists().values()))
    c = collections.Counter(re.findall(r"\b[a-z]{4,10}\b", text))
    return sorted(w for w, k in c.most_common() if k >= 5 and w not in banned)[:TRAIN_WORD_COUNT]


def train2_cases(tok, n: int):
    """Like `train_cases`, with needles as short as the evaluation's: keys two training words
    ("socket-buffer"), values 8-digit numbers (the evaluation: adjective-noun keys, 7 digits)."""
    from mc_jax.eval import tasks
    from mc_jax.eval.tasks import ruler

    text = training_text()
    words = training_words(text)

    def value(rng, kind):
        if kind == "numbers":
            return str(rng.randint(10 ** 7, 10 ** 8 - 1))
        return f"{rng.choice(words)}-{rng.choice(words)}"

    rng = np.random.default_rng(1)
    real = ruler.random_value
    ruler.random_value = value
    try:
        for i in range(n):
            task = "niah_single" if i % 2 == 0 else "niah_multikey"
            L = TRAIN_LENGTHS[i % len(TRAIN_LENGTHS)]
            depth = float(rng.uniform(0.05, 0.95))
            case = tasks.generate(task, tok, L, depth, 2000 + i, check_text=False,
                                  haystack="prose", text=text, key_kind="words",
                                  value_kind="numbers", straddle=bool(i % 4 >= 2))
            yield f"{i:04d}_{task}_{L}", case, True
    finally:
        ruler.random_value = real


def eval_cases(tok, cases=range(4)):
    sys.path.insert(0, str(HERE.parents[1]))
    from experiments.configs.cpu_ruler import CHAT, get_config
    from mc_jax.eval import tasks
    from mc_jax.eval.evaluators.ruler import _text, case_layout

    ecfg = get_config("quick")["evaluators"][0]
    for i in cases:
        d, st = case_layout(ecfg, i)
        for e in ecfg["tasks"]:
            opts = {k: v for k, v in e.items() if k not in ("task", "label")}
            if "text" in opts:
                opts["text"] = _text(opts["text"], None, 0)
            if st:
                opts["straddle"] = True
            uses_depth = tasks.TASKS[tasks.resolve(e["task"])[0]].uses_depth
            for L in (2048, 8192):
                case = tasks.generate(e["task"], tok, L, d if uses_depth else None,
                                      tasks.case_seed(0, i), check_text=False, **opts)
                yield f"{e['label']}_{L}_{i}", case, CHAT[e["label"]]


def main(split: str, n: int = 96) -> None:
    from mc_jax.base import loading
    from mc_jax.base.chat import build_prompt
    from mc_jax.eval.policies.lensq import case_features
    from mc_jax.eval.policies.retrieve import make_retrieve_policy

    model = loading.load_base(None)
    pol = make_retrieve_policy(model, 512)
    K = pol.K
    out_dir = CACHE / split
    out_dir.mkdir(parents=True, exist_ok=True)
    cases = {"train": lambda: train_cases(model.tokenizer, n),
             "train2": lambda: train2_cases(model.tokenizer, n),
             "eval": lambda: eval_cases(model.tokenizer),
             "eval2": lambda: eval_cases(model.tokenizer, range(4, 12))}[split]()
    for name, case, chat in cases:
        path = out_dir / f"{name}.npz"
        if path.exists():
            continue
        t0 = time.perf_counter()
        ids = np.asarray(case.history_ids, np.int32)
        nb = len(ids) // K
        q = (case.question.strip(), case.answer_prefix.strip()) if chat else \
            (case.question, case.answer_prefix)
        pr = build_prompt(model.tokenizer, q[0], chat=chat, answer_prefix=q[1])
        q_ids = np.asarray(pr.tail[pr.q_start:pr.q_end], np.int32)
        feat = case_features(pol, ids, q_ids)  # what the lensq policy reads
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **feat, gold=np.asarray(case.gold_blocks, np.int32),
                 distractor=np.asarray(case.distractor_blocks, np.int32), task=case.task,
                 n_tokens=len(ids))
        tmp.rename(path)
        print(f"{split} {name}: {nb} blocks, gold {list(case.gold_blocks)}, "
              f"{time.perf_counter() - t0:.1f}s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1], *(int(a) for a in sys.argv[2:]))
