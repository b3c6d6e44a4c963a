"""Tokenizers: byte-level BPE built from GGUF metadata, or a Hugging Face tokenizer.json.

Both become a `tokenizers.Tokenizer` wrapped in `Tokenizer`, which encodes plain text without
adding special tokens (SmolLM2's GGUF says add_bos_token=False) and decodes without dropping any.
"""

from __future__ import annotations

import dataclasses
import hashlib
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from mc_jax.errors import CorruptFileError

# llama.cpp's pre-tokenizer names -> the split rules of the matching Hugging Face tokenizer.
_PRE_TOKENIZERS = {
    # SmolLM/SmolLM2: every digit alone, then the GPT-2 byte-level regex.
    "smollm": lambda: pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
}
_CONTROL_TOKEN_TYPES = (3, 4)  # gguf TokenType.CONTROL, USER_DEFINED


@dataclasses.dataclass(frozen=True, eq=False)
class Tokenizer:
    """Text <-> token ids, plus the special ids mc_jax needs."""

    hf: tokenizers.Tokenizer
    name: str
    bos_id: int | None = None
    eos_id: int | None = None
    # the base's chat template (Jinja source, as in GGUF `tokenizer.chat_template` or HF
    # tokenizer_config.json `chat_template`); None when the base has none. Rendered by
    # `mc_jax.base.chat`. Not part of the fingerprint (it does not change token ids).
    chat_template: str | None = None

    @property
    def vocab_size(self) -> int:
        return self.hf.get_vocab_size(with_added_tokens=True)

    @property
    def fingerprint(self) -> str:
        """Stable hash of the whole tokenizer definition (datasets record it)."""
        return hashlib.sha256(self.hf.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self.hf.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.hf.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=False)

    def token_to_id(self, token: str) -> int | None:
        return self.hf.token_to_id(token)

    def save(self, path: Path) -> None:
        self.hf.save(str(path))


def tokenizer_from_gguf_fields(fields: dict) -> tokenizers.Tokenizer:
    """Build the byte-level BPE tokenizer stored in GGUF metadata (`tokenizer.ggml.*`)."""
    model = fields.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise CorruptFileError(
            f"GGUF tokenizer model '{model}' is not supported (only byte-level BPE, 'gpt2')")
    try:
        tokens = [str(t) for t in fields["tokenizer.ggml.tokens"]]
        merges = [tuple(str(m).split(" ", 1)) for m in fields.get("tokenizer.ggml.merges", [])]
        types = list(fields.get("tokenizer.ggml.token_type", [1] * len(tokens)))
    except (KeyError, TypeError) as e:
        raise CorruptFileError(f"GGUF tokenizer metadata is missing or malformed ({e!r}); "
                               "the file is damaged or was exported without a tokenizer") from e
    if any(len(m) != 2 for m in merges):
        raise CorruptFileError("GGUF tokenizer metadata: a merge is not two tokens")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    pre = fields.get("tokenizer.ggml.pre", "default")
    tok.pre_tokenizer = _PRE_TOKENIZERS.get(pre, _PRE_TOKENIZERS["default"])()
    tok.decoder = decoders.ByteLevel()
    special = [tokenizers.AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty in _CONTROL_TOKEN_TYPES]
    tok.add_special_tokens(special)
    return tok


def load_tokenizer_file(path: str | Path, name: str | None = None, bos_id=None,
                        eos_id=None, chat_template: str | None = None) -> Tokenizer:
    path = Path(path)
    try:
        hf = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise CorruptFileError(f"cannot read tokenizer file {path}: {e}") from e
    return Tokenizer(hf=hf, name=name or path.parent.name, bos_id=bos_id, eos_id=eos_id,
                     chat_template=chat_template)


