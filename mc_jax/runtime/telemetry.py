"""Host-side telemetry of a Session: `--show-focus` lines (which spans the refocus expanded or
collapsed), per-block telemetry rows (JSONL), and the time per call of GistNet and LensNet."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mc_jax.errors import InputError
from mc_jax.runtime.session import Session
from mc_jax.runtime.step import lens_scores


def focus_changes(old, new, K: int):
    """Spans whose level changed between two WCs: [(kind, first token, end, old lvl, new lvl)].

    old/new: [(level, node)] entry lists; K: block size. Entries beyond the old cursor (the new
    block) are ignored. Adjacent new entries of one level that replaced the same kind of span
    merge.
    """
    def spans(entries):
        out = {}
        for lvl, node in entries:
            u = K ** max(lvl, 1)
            out[(lvl, node)] = (node * u, (node + 1) * u)
        return out

    so, sn = spans(old), spans(new)
    end_old = max((e for _, e in so.values()), default=0)
    gone = {k: v for k, v in so.items() if k not in sn}
    came = sorted((v, k) for k, v in sn.items() if k not in so and v[1] <= end_old)
    changes = []
    for (a, b), (lvl, _) in came:
        olds = [ol for (ol, _), (oa, ob) in gone.items() if oa < b and ob > a]
        if not olds:
            continue
        ol = olds[0]
        kind = "expand" if lvl < ol else "collapse"
        if changes and changes[-1][0] == kind and changes[-1][2] == a and \
                changes[-1][3] == ol and changes[-1][4] == lvl and (kind == "expand" or lvl == 0):
            changes[-1] = (kind, changes[-1][1], b, ol, lvl)
        else:
            changes.append((kind, a, b, ol, lvl))
    return changes


def check_telemetry_path(path) -> Path:
    """A path the telemetry JSONL can be written to (checked without touching it): a folder or a
    missing parent folder is an InputError naming it."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"--telemetry {p}: is a folder; give a file path in it "
                         f"(e.g. {p / 'telemetry.jsonl'})")
    if not p.parent.is_dir():
        raise InputError(f"--telemetry {p}: the folder {p.parent} does not exist; create it or "
                         "give a path in an existing folder")
    return p


def open_telemetry(path):
    """Open the telemetry JSONL for writing (checked first; an unwritable path is an
    InputError)."""
    p = check_telemetry_path(path)
    try:
        return open(p, "w")
    except OSError as e:
        raise InputError(f"--telemetry {p}: cannot write it ({e.strerror or e})") from e


def _entries(info) -> list[tuple[int, int]]:
    n = int(info.num_entries)
    return list(zip(np.asarray(info.level_E)[:n].tolist(), np.asarray(info.node_E)[:n].tolist()))


def _excerpt(tokenizer, ids, a, b, n=8) -> str:
    t = tokenizer.decode([int(i) for i in ids[a:min(b, a + n)]])
    return " ".join(t.split())[:40]


class FocusPrinter:
    """Turns successive StepInfos into --show-focus lines and telemetry rows."""

    def __init__(self, session: Session, show: bool, telemetry=None, out=None):
        self.s, self.show, self._out = session, show, out
        self.prev = None
        self.tele = open_telemetry(telemetry) if telemetry else None
        self.t_last = time.perf_counter()
        self.rows = []

    def __call__(self, info, phase: str = "ingest"):
        now = time.perf_counter()
        K = self.s.cfg.block_size
        entries = _entries(info)
        changes = focus_changes(self.prev, entries, K) if self.prev is not None else []
        self.prev = entries
        acts = int(info.num_actions)
        if acts < 0:
            acts = len(changes)
        row = dict(block=int(info.num_tokens) // K - 1, phase=phase,
                   history=int(info.num_tokens), actions=acts, budget_used=int(info.cost),
                   budget=self.s.cfg.budget, cooldown_hits=int(info.cooldown_hits),
                   budget_blocked=int(info.budget_blocked),
                   kv_recompute=int(info.recompute), nll=float(np.mean(info.nll_K))
                   if phase == "score" else None, seconds=now - self.t_last)
        self.t_last = now
        self.rows.append(row)
        if self.tele:
            self.tele.write(json.dumps(row) + "\n")
        if self.show and changes:
            tok = self.s.model.tokenizer
            parts = [f"{k} [{a},{b}) L{o}->L{n} \"{_excerpt(tok, self.s.ids, a, b)}\""
                     for k, a, b, o, n in changes[:4]]
            more = f" (+{len(changes) - 4} more)" if len(changes) > 4 else ""
            print(f"[focus] block {row['block']} @ {row['history']} tok, WC {row['budget_used']}"
                  f"/{row['budget']}: " + "; ".join(parts) + more, file=self._out or sys.stderr)

    def header(self, **kw):
        if self.tele:
            self.tele.write(json.dumps(dict(kind="header", **kw)) + "\n")

    def close(self):
        if self.tele:
            self.tele.close()

    def summary(self) -> dict:
        r = self.rows
        n = max(len(r), 1)
        return dict(blocks=len(r),
                    actions_per_block=sum(x["actions"] for x in r) / n,
                    budget_used_mean=sum(x["budget_used"] for x in r) / n,
                    seconds_per_block=sum(x["seconds"] for x in r) / n)


def time_networks(session: Session, reps: int = 5) -> dict:
    """GistNet (one block) and LensNet (the current WC) time per call, as separate jitted calls
    (inside the step they are fused)."""
    rt, nets = session.rt, session.nets
    gist = jax.jit(lambda n, x: nnx.merge(rt.gist_graph, n["gist"])(1, x))
    x = jnp.zeros((1, rt.cfg.block_size, rt.base_cfg.d_model), jnp.float32)
    out = {}

    def clock(f, *a):
        jax.block_until_ready(f(*a))
        t0 = time.perf_counter()
        for _ in range(reps):
            jax.block_until_ready(f(*a))
        return (time.perf_counter() - t0) / reps

    out["gistnet_s_per_call"] = clock(gist, nets, x)
    if rt.lens_graph is not None:
        lens = jax.jit(lambda n, st: lens_scores(rt, n, st)[0])
        out["lensnet_s_per_call"] = clock(lens, nets, session.state)
    else:
        out["lensnet_s_per_call"] = None
    return out
