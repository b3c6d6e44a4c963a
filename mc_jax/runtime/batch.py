"""B independent streams in one jit-compiled step (issue 17, item 6).

`BatchedSession` keeps B `DecodeState`s stacked on a leading axis and runs the runtime's own
block step and ingest (`mc_jax.runtime.step.block_step` / `ingest_blocks`) under `jax.vmap`: one
compile per (Runtime, capacity, B), one dispatch per block for all B streams, and each stream
computes exactly what a `Session` of its own computes (tests/test_batch.py). Streams may hold
histories of different lengths: `ingest` takes one array of whole blocks per stream and masks the
shorter ones' missing blocks (the same masking a partial `Session.ingest` call uses).

Under vmap a `lax.cond` runs both branches for every stream (GistNet, the KV recompute), so a
batched step costs more than B-fold a step that skips work; `benchmarks/batched_decode.py`
measures tokens/s at B = 1, 4, 16 against B = 1 in the same process.

Letters: B streams, N blocks per ingest call, K block size.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.base import base_model as bm
from mc_jax.errors import CapacityError, InputError
from mc_jax.runtime.session import INGEST_BLOCKS, Session
from mc_jax.runtime.state import StepInfo, check_state, init_state
from mc_jax.runtime.step import block_step, ingest_blocks


@functools.partial(jax.jit, static_argnames=("rt", "teacher"), donate_argnames=("states",))
def jit_step_batched(rt, params, nets, states, ids_BxK, n_given_B, temperature, top_p, teacher):
    def one(state, ids_K, n_given):
        return block_step(rt, params, nets, state, ids_K, n_given, temperature, top_p,
                          teacher=teacher)

    return jax.vmap(one)(states, ids_BxK, n_given_B)


@functools.partial(jax.jit, static_argnames=("rt",), donate_argnames=("states",))
def jit_ingest_batched(rt, params, nets, states, ids_BxNxK, valid_BxN):
    return jax.vmap(lambda s, i, v: ingest_blocks(rt, params, nets, s, i, v))(
        states, ids_BxNxK, valid_BxN)


class BatchedSession:
    """B streams over one base model, networks and budget, stepped together.

    The arguments are `Session`'s (the runtime is built the same way) plus `batch`, and `seeds`
    (one per stream, default seed + b: stream b samples as a `Session(seed=seeds[b])` does)."""

    def __init__(self, base_model, budget: int, gist_model, lens_model=None, *, batch: int,
                 seeds=None, **session_kw):
        if int(batch) < 1:
            raise InputError(f"batch={batch}: need at least one stream")
        if session_kw.get("retrieval_heads"):
            raise InputError("BatchedSession keeps no retrieval keys (use a Session per stream)")
        one = Session(base_model, budget, gist_model, lens_model, **session_kw)
        self.model, self.rt, self.nets, self.params = one.model, one.rt, one.nets, one.params
        self.B = int(batch)
        seed = int(session_kw.get("seed", 0))
        self.seeds = [seed + b for b in range(self.B)] if seeds is None else [int(s) for s in seeds]
        if len(self.seeds) != self.B:
            raise InputError(f"{len(self.seeds)} seeds for {self.B} streams")
        self.reset()

    @property
    def cfg(self):
        return self.rt.cfg

    def reset(self) -> None:
        states = [init_state(self.rt, s) for s in self.seeds]
        self.state = jax.tree.map(lambda *a: jnp.stack(a), *states)
        self.ids: list[list[int]] = [[] for _ in range(self.B)]

    def _check(self, n_more) -> None:
        cap = self.cfg.capacity_tokens
        for b, (have, more) in enumerate(zip(self.ids, n_more)):
            if len(have) + more > cap:
                raise CapacityError(f"stream {b}: {len(have) + more} tokens exceed the tree's "
                                    f"capacity of {cap} tokens; create the session with a larger "
                                    "capacity_tokens")

    def ingest(self, ids_per_stream) -> None:
        """Ingest whole blocks without the base model: one array per stream (lengths may
        differ; each a multiple of K, each stream at a block boundary)."""
        K, N = self.cfg.block_size, INGEST_BLOCKS
        if len(ids_per_stream) != self.B:
            raise InputError(f"ingest got {len(ids_per_stream)} streams, the session has {self.B}")
        arrs = [bm.check_token_ids(x, self.model.cfg).reshape(-1) for x in ids_per_stream]
        for b, a in enumerate(arrs):
            if len(a) % K or len(self.ids[b]) % K:
                raise InputError(f"stream {b}: ingest takes whole blocks at a block boundary "
                                 f"({len(a)} tokens after {len(self.ids[b])})")
        self._check([len(a) for a in arrs])
        blocks = [a.reshape(-1, K) for a in arrs]
        longest = max(len(x) for x in blocks)
        for i in range(0, longest, N):
            pad = np.zeros((self.B, N, K), np.int32)
            valid = np.zeros((self.B, N), bool)
            for b, x in enumerate(blocks):
                part = x[i:i + N]
                pad[b, :len(part)], valid[b, :len(part)] = part, True
                self.ids[b].extend(part.reshape(-1).tolist())
            self.state, _ = jit_ingest_batched(self.rt, self.params, self.nets, self.state,
                                               jnp.asarray(pad), jnp.asarray(valid))
        self._check_states()

    def step(self, ids_BxK=None, n_given=None, *, teacher: bool = True,
             temperature: float = 0.0, top_p: float = 1.0) -> StepInfo:
        """One block for every stream: teacher-forced ids [B, K], or sampled with the first
        n_given (an int, or one per stream; default all K) tokens forced. -> StepInfo with a
        leading B axis (host arrays)."""
        K = self.cfg.block_size
        self._check([K] * self.B)
        ids = np.zeros((self.B, K), np.int32)
        if ids_BxK is not None:
            given = np.asarray(ids_BxK)
            if given.ndim != 2 or given.shape[0] != self.B or given.shape[1] > K:
                raise InputError(f"step takes ids of shape [{self.B}, <= {K}], got "
                                 f"{list(given.shape)}")
            ids[:, :given.shape[1]] = bm.check_token_ids(given, self.model.cfg)
        ng = np.broadcast_to(np.asarray(K if n_given is None else n_given, np.int32), (self.B,))
        self.state, info = jit_step_batched(self.rt, self.params, self.nets, self.state,
                                            jnp.asarray(ids), jnp.asarray(ng),
                                            jnp.float32(temperature), jnp.float32(top_p),
                                            teacher=teacher)
        info = jax.device_get(info)
        for b in range(self.B):
            self.ids[b].extend(np.asarray(info.tokens_K[b]).tolist())
        self._check_states()
        return info

    def _check_states(self) -> None:
        for b in range(self.B):
            check_state(self.stream_state(b), self.rt)

    def stream_state(self, b: int):
        """Stream b's DecodeState (a view for inspection; a Session's state has this form)."""
        return jax.tree.map(lambda a: a[b], self.state)
