"""Teacher-forced perplexity of a text file under the plain base model (one forward).

BOS handling: SmolLM2's GGUF says add_bos_token=False, so nothing is prepended. The first token is
context only; the N-1 next-token predictions for tokens 2..N are scored. The input is padded to a
power-of-two length (padding masked out and not scored) so different files share compiles.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.errors import InputError
from mc_jax.base.sampling import bucket


def read_text(path: str | Path) -> str:
    """Read a UTF-8 text file; a missing, empty or binary file is a clear error."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    raw = path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise InputError(f"{path} looks like a binary file (NUL bytes); give a text file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e})") from e
    if not text.strip():
        raise InputError(f"{path} is empty")
    return text


def ids_perplexity(model, ids: np.ndarray) -> dict:
    ids = bm.check_token_ids(ids, model.cfg)
    n = len(ids)
    if n < 2:
        raise InputError("need at least 2 tokens to measure perplexity")
    if n > model.cfg.max_seq_len:
        raise InputError(f"{n} tokens exceed the model's context of {model.cfg.max_seq_len}; "
                         "lower --max-tokens")
    T = min(bucket(n), model.cfg.max_seq_len)
    padded = np.zeros((1, T), np.int32)
    padded[0, :n] = ids
    valid = np.arange(T)[None] < n
    logits = bm.logits_fn(model.params, model.cfg, jnp.asarray(padded), jnp.asarray(valid))
    nll = np.asarray(bm.token_nll(logits[:, :n - 1], jnp.asarray(padded[:, 1:n])))[0]
    mean = float(nll.mean())
    return {"tokens": int(n), "scored": int(n - 1), "nll": mean,
            "perplexity": float(np.exp(mean))}


def prefix_ids(tokenizer, text: str, n: int) -> list[int]:
    """The first `n` token ids of `text`, tokenising only a prefix of it (a 20 MB file costs what
    its first few kB do). The character prefix doubles until it gives more than `n` tokens and a
    prefix twice as long agrees on the first `n` (a cut can only change the tokens of the last
    word or two before it); the whole text is tokenised when it is shorter than that."""
    chars = max(4096, 8 * (n + 1))
    prev = None
    while chars < len(text):
        ids = tokenizer.encode(text[:chars])
        if prev is not None and len(prev) > n and prev[:n] == ids[:n]:
            return ids[:n]
        prev = ids if len(ids) > n else None
        chars *= 2
    return tokenizer.encode(text)[:n]


def file_perplexity(model, path, max_tokens: int = 1024) -> dict:
    """Perplexity of the first `max_tokens` (>= 2) tokens of a text file."""
    if int(max_tokens) < 2:
        raise InputError(f"max tokens {max_tokens}: perplexity needs at least 2 tokens (the first "
                         "is context only); give --max-tokens 2 or more")
    ids = np.asarray(prefix_ids(model.tokenizer, read_text(path), int(max_tokens)), np.int32)
    res = ids_perplexity(model, ids)
    res["file"] = str(path)
    return res
