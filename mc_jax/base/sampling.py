"""Token sampling (greedy, temperature, top-p) and base-model generation with a KV cache.

The package's one token-by-token generation loop (`generate_from_cache`) and its one set of stop
ids (`stop_ids`): plain generation (`generate`), the window policies' greedy answers
(`mc_jax.eval.policies.window`) and the runtime's answer after a working context
(`mc_jax.runtime.answer`) each prefill a cache their own way and continue through it.

Prompts are padded to a few fixed lengths (powers of two from 64) so a new prompt length does not
cost a new compile; the decode step is one jitted function whose cache is donated.
"""

from __future__ import annotations

import functools
import math
import time
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.errors import CapacityError, ConfigError, InputError


def check_sampling(temperature: float, top_p: float, *, names=("temperature", "top_p")) -> None:
    """Host side: temperature finite and >= 0 (0 is greedy), top_p in (0, 1]; else ConfigError
    naming `names` (the CLI passes its flags)."""
    t, p = float(temperature), float(top_p)
    if not (math.isfinite(t) and t >= 0):
        raise ConfigError(f"{names[0]} {temperature!r}: must be a finite number >= 0 "
                          "(0 is greedy; 0.7 to 1 is usual for sampling)")
    if not 0 < p <= 1:
        raise ConfigError(f"{names[1]} {top_p!r}: must be in (0, 1] (the probability mass "
                          "kept; 1 keeps every token)")


def sample_token(logits_BxV, key, temperature, top_p):
    """Greedy when temperature <= 0, else temperature + nucleus (top-p) sampling. ids [B]."""
    logits = logits_BxV.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1)
    t = jnp.maximum(temperature, 1e-6)
    scaled = logits / t
    sorted_desc = jnp.sort(scaled, axis=-1)[..., ::-1]
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    cum = jnp.cumsum(probs, axis=-1)
    # keep the smallest prefix whose mass reaches top_p, and always the best token (so a top_p
    # at or near 0 is top-1 sampling, not an empty nucleus)
    keep = ((cum - probs) < top_p) | (jnp.arange(probs.shape[-1]) == 0)
    cutoff = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled >= cutoff, scaled, -jnp.inf)
    sampled = jax.random.categorical(key, scaled, axis=-1)
    return jnp.where(temperature <= 0, greedy, sampled).astype(jnp.int32)


def bucket(n: int, minimum: int = 64) -> int:
    """Round up to a power of two (>= minimum): the fixed lengths we compile for."""
    b = minimum
    while b < n:
        b *= 2
    return b


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def prefill(params, cfg, cache, ids_BxT, valid_BxT):
    B, T = ids_BxT.shape
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    logits, cache = bm.forward(params, cfg, ids_BxT, pos, valid_BxT=valid_BxT, cache=cache,
                               cache_index=0)
    return logits, cache


def stop_ids(model) -> frozenset[int]:
    """The ids that end an answer: the base's and the tokenizer's end-of-sequence ids and
    `<|endoftext|>` where the tokenizer has it (byte tokenizers have none)."""
    stops = {model.cfg.eos_id, getattr(model.tokenizer, "eos_id", None)}
    tok = getattr(model.tokenizer, "token_to_id", None)
    if tok is not None:
        try:
            stops.add(tok("<|endoftext|>"))
        except Exception:  # byte tokenizers have no special tokens
            pass
    return frozenset(int(i) for i in stops if i is not None)


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def decode_step(params, cfg, cache, tok_B, index, key, temperature, top_p, pos=None):
    """Feed one token at cache slot `index` (at position `pos`, default the slot); sample the
    next one."""
    B = tok_B.shape[0]
    pos = jnp.full((B, 1), index if pos is None else pos, jnp.int32)
    logits, cache = bm.forward(params, cfg, tok_B[:, None], pos, cache=cache, cache_index=index)
    nxt = sample_token(logits[:, -1], key, temperature, top_p)
    return nxt, cache


def generate_from_cache(params, cfg: bm.LlamaConfig, cache, tok_B, index: int, *,
                        max_new_tokens: int, key, temperature: float = 0.0, top_p: float = 1.0,
                        stop_ids=(), pos: int | None = None) -> Iterator[int]:
    """Stream new token ids (batch 1) from a prefilled cache.

    tok_B: the first new token (chosen from the prompt's last logit); it is yielded, then fed at
    cache slot `index` (position `pos`, default the slot), and so on one slot further per token.
    Ends after yielding a stop id or `max_new_tokens` ids. `key` is split once per new token.
    """
    for i in range(max_new_tokens):
        t = int(tok_B[0])
        yield t
        if t in stop_ids or i == max_new_tokens - 1:
            return
        key, sub = jax.random.split(key)
        tok_B, cache = decode_step(params, cfg, cache, tok_B, jnp.int32(index + i), sub,
                                   jnp.float32(temperature), jnp.float32(top_p),
                                   pos=None if pos is None else jnp.int32(pos + i))


def generate(params, cfg: bm.LlamaConfig, prompt_ids: list[int], *, max_new_tokens: int,
             temperature: float = 0.0, top_p: float = 1.0, seed: int = 0,
             stop_ids: tuple[int, ...] = ()) -> Iterator[int]:
    """Stream new token ids for one prompt (batch 1)."""
    if len(prompt_ids) == 0:  # before the dtype check: an empty list has dtype float64
        raise InputError("the prompt is empty: give at least one token")
    if int(max_new_tokens) < 0:
        raise ConfigError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_p)
    prompt = bm.check_token_ids(prompt_ids, cfg)
    T = bucket(len(prompt))
    size = bucket(len(prompt) + max_new_tokens)
    if size > cfg.max_seq_len:
        if len(prompt) + max_new_tokens > cfg.max_seq_len:
            raise CapacityError(
                f"prompt ({len(prompt)} tokens) + {max_new_tokens} new tokens exceeds the "
                f"model's context of {cfg.max_seq_len}; shorten the prompt or use "
                "MegaContext (mc-jax generate --input) for long histories")
        size = cfg.max_seq_len
    dtype = params["embed"].dtype
    cache = bm.init_cache(cfg, 1, size, dtype)
    ids = np.zeros((1, T), np.int32)
    ids[0, :len(prompt)] = prompt
    valid = np.arange(T)[None] < len(prompt)
    logits, cache = prefill(params, cfg, cache, jnp.asarray(ids), jnp.asarray(valid))
    key = jax.random.PRNGKey(seed)
    key, sub = jax.random.split(key)
    tok = sample_token(logits[:, len(prompt) - 1], sub, temperature, top_p)
    yield from generate_from_cache(params, cfg, cache, tok, len(prompt),
                                   max_new_tokens=max_new_tokens, key=key,
                                   temperature=temperature, top_p=top_p, stop_ids=stop_ids)


def stream_text(tokenizer, token_iter: Iterator[int], write: Callable[[str], None]) -> list[int]:
    """Decode incrementally (byte-level BPE may split a character across tokens)."""
    ids: list[int] = []
    shown = ""
    for t in token_iter:
        ids.append(t)
        text = tokenizer.decode(ids)
        if text.endswith("\ufffd"):
            continue  # wait for the rest of a multi-byte character
        write(text[len(shown):])
        shown = text
    text = tokenizer.decode(ids)
    if len(text) > len(shown):
        write(text[len(shown):])
    return ids


class Timer:
    def __enter__(self):
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *a):
        self.seconds = time.perf_counter() - self.t0
