"""`Session`: the host driver of the runtime for one base model, networks and budget.

It keeps one `DecodeState` and calls the jitted steps of `mc_jax.runtime.step`: `ingest` takes
whole blocks without the base model, `step` scores (teacher forcing) or samples one block, `sync`
brings the KV cache up to date. The tree's capacity is rounded up to a power of two of blocks, so
sessions for similar history lengths share one compile.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.base.sampling import bucket
from mc_jax.core import focus as fm
from mc_jax.errors import CapacityError, ConfigError
from mc_jax.runtime.state import (DecodeConfig, StepInfo, check_state, init_state, make_runtime,
                                  with_reader)
from mc_jax.runtime.retrieval_keys import WINDOW, KeyStore
from mc_jax.runtime.step import jit_ingest, jit_step, jit_sync

INGEST_BLOCKS = 16  # blocks per ingest call (one compile; a partial call masks the rest)


class Session:
    """A host driver over the jitted step for one base model, networks and budget.

    Keeps one DecodeState; `ingest` streams whole blocks of token ids without the base model,
    `step` teacher-forces or samples one block. Compiles once per (budget, capacity, policy).
    """

    def __init__(self, base_model, budget: int, gist_model, lens_model=None, *,
                 policy: str = "lens", capacity_tokens: int = 1 << 16, depth=None,
                 position_mode="compact", rope_damping=False, chunk: int = 64,
                 focus: fm.FocusConfig | None = None, seed: int = 0, kv_mode: str = "exact",
                 retrieval_heads=None, retrieval_window: int = WINDOW, retrieval_prefix=()):
        self.model = base_model
        depth = depth or gist_model.config.depth
        K = gist_model.config.block_size
        need = -(-int(capacity_tokens) // K)
        cap = bucket(need)
        kw = dict(budget=int(budget), depth=depth, block_size=K, policy=policy,
                  position_mode=position_mode, rope_damping=rope_damping, chunk=chunk,
                  focus=focus or fm.FocusConfig(), kv_mode=kv_mode)
        try:
            cfg = DecodeConfig(capacity_blocks=cap, **kw)
        except ConfigError:
            cfg = DecodeConfig(capacity_blocks=need, **kw)  # exact capacity, or the real error
        self.rt, self.nets = make_runtime(cfg, base_model.cfg, gist_model, lens_model,
                                          cache_dtype=base_model.params["embed"].dtype)
        self.params = with_reader(base_model.params, gist_model)
        self.seed = seed
        # retrieval keys (mc_jax.runtime.retrieval_keys): the base's first layers run over each
        # window of the history as it arrives; kept in host memory beside the tree
        self.keys = (KeyStore(base_model, retrieval_heads, window=retrieval_window,
                              prefix=retrieval_prefix, block_size=K)
                     if retrieval_heads else None)
        self.reset()

    @property
    def cfg(self) -> DecodeConfig:
        return self.rt.cfg

    def reset(self):
        self.state = init_state(self.rt, self.seed)
        self.ids: list[int] = []
        if self.keys is not None:
            self.keys.reset()

    def _check_room(self, n_more: int):
        cap = self.cfg.capacity_tokens
        if len(self.ids) + n_more > cap:
            raise CapacityError(
                f"{len(self.ids) + n_more} tokens exceed the tree's capacity of {cap} tokens "
                f"(budget {self.cfg.budget}, depth {self.cfg.depth}); shorten the input or "
                "create the session with a larger capacity_tokens")

    def _ids(self, ids) -> np.ndarray:
        arr = bm.check_token_ids(ids, self.model.cfg).reshape(-1)
        return arr

    def ingest(self, ids, on_block=None, progress=None) -> None:
        """Ingest whole blocks without the base model (len(ids) % K == 0, aligned cursor)."""
        K, N = self.cfg.block_size, INGEST_BLOCKS
        ids = self._ids(ids)
        if len(ids) % K or len(self.ids) % K:
            raise ValueError("ingest takes whole blocks at a block boundary")
        self._check_room(len(ids))
        blocks = ids.reshape(-1, K)
        for i in range(0, len(blocks), N):
            part = blocks[i:i + N]
            n = len(part)
            pad = np.zeros((N, K), np.int32)
            pad[:n] = part
            self.state, info = jit_ingest(self.rt, self.params, self.nets, self.state,
                                          jnp.asarray(pad), jnp.asarray(np.arange(N) < n))
            self.ids.extend(part.reshape(-1).tolist())
            if on_block is not None:
                info = jax.device_get(info)
                for j in range(n):
                    on_block(jax.tree.map(lambda a: a[j], info))
            if self.keys is not None:
                self.keys.update(self.ids)
            if progress is not None:
                progress(n * K)
        check_state(self.state, self.rt)

    def step(self, ids_K=None, n_given: int | None = None, *, teacher: bool = True,
             temperature: float = 0.0, top_p: float = 1.0) -> StepInfo:
        """One block: teacher-forced ids_K, or sampled with its first n_given tokens (default
        all K) forced to ids_K."""
        K = self.cfg.block_size
        n_given = K if n_given is None else n_given
        self._check_room(K)
        ids = np.zeros((K,), np.int32)
        if ids_K is not None:
            given = self._ids(ids_K)
            ids[:len(given)] = given
        self.state, info = jit_step(self.rt, self.params, self.nets, self.state,
                                    jnp.asarray(ids), jnp.int32(n_given),
                                    jnp.float32(temperature), jnp.float32(top_p),
                                    teacher=teacher)
        info = jax.device_get(info)
        self.ids.extend(np.asarray(info.tokens_K).tolist())
        if self.keys is not None:
            self.keys.update(self.ids)
        check_state(self.state, self.rt)
        return info

    def retrieval_keys(self, n_blocks: int | None = None) -> np.ndarray:
        """Pre-RoPE keys [layers, n, K, G, F] of the first n_blocks complete blocks (default
        all), for the session's `retrieval_heads` (`KeyStore.keys`)."""
        if self.keys is None:
            raise ConfigError("this Session keeps no retrieval keys: create it with "
                              "retrieval_heads=((layer, head), ...)")
        return self.keys.keys(self.ids, n_blocks)

    def sync(self) -> int:
        self.state, rec, _ = jit_sync(self.rt, self.params, self.state)
        return int(rec)
