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


def file_perplexity(model, path, max_tokens: int = 1024) -> dict:
    ids = np.asarray(model.tokenizer.encode(read_text(path))[:max_tokens], np.int32)
    res = ids_perplexity(model, ids)
    res["file"] = str(path)
    return res
