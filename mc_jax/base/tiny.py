"""The tiny random base of smoke sweeps and tests (byte tokenizer, random `LlamaConfig.tiny`),
and `build_base`, which gives it for "tiny" and loads a real base otherwise."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax

from mc_jax.base import base_model as bm
from mc_jax.base import loading


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (for the tiny random base of smoke sweeps)."""

    name = "bytes"
    bos_id = None
    eos_id = None
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) % 256 for i in ids).decode("utf-8", errors="replace")

    def token_to_id(self, token: str):
        b = token.encode("utf-8")
        return b[0] if len(b) == 1 else None



@dataclasses.dataclass(frozen=True, eq=False)
class TinyBase:
    cfg: Any
    params: Any
    tokenizer: Any
    path: str = "tiny"



def build_base(base, dtype: str | None = None, base_kw: dict | None = None):
    """`"tiny"`: random `LlamaConfig.tiny` with a byte tokenizer; otherwise `loading.load_base`."""
    if base == "tiny":
        kw = dict(vocab_size=256)
        kw.update(base_kw or {})
        seed = kw.pop("seed", 0)
        cfg = bm.LlamaConfig.tiny(**kw)
        return TinyBase(cfg, bm.init_params(cfg, jax.random.PRNGKey(seed)), ByteTokenizer())
    return loading.load_base(base, dtype=dtype)
