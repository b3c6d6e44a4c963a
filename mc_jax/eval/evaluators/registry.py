"""The evaluator registry of the sweeps, and the markdown/plot helpers the evaluators share.

An evaluator turns its config entry (its grid) into work items (plain dicts: the row keys) and
computes one row of metrics per item; `mc_jax.eval.sweep` drives them and writes the report.
Evaluators register themselves with `@register_evaluator(name)`; `mc_jax.eval.evaluators`
imports every evaluator module, so importing that package registers them all.
"""

from __future__ import annotations

import math
from pathlib import Path

from mc_jax.eval.context import Context


class Evaluator:
    """items(ecfg, ctx) -> work items (dicts, the row keys); run(ecfg, ctx, item) -> metrics dict;
    table(rows) -> markdown; plot(rows, out_dir) -> list of PNG paths."""

    name = ""
    title = ""

    def items(self, ecfg: dict, ctx: Context) -> list[dict]:
        raise NotImplementedError

    def run(self, ecfg: dict, ctx: Context, item: dict) -> dict:
        raise NotImplementedError

    def table(self, rows: list[dict]) -> str:
        return generic_table(rows)

    def plot(self, rows: list[dict], out_dir: Path) -> list[Path]:
        return []


EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str):
    def deco(cls):
        inst = cls()
        inst.name = name
        EVALUATORS[name] = inst
        return cls
    return deco


def evaluator_names() -> list[str]:
    return sorted(EVALUATORS)


# ------------------------------------------------------------------------------------------------
# rows, tables and plots


def grid_item(ecfg: dict, ctx: Context, extra: dict) -> dict:
    """A work item: the evaluator and base model, then the grid point."""
    return {"evaluator": ecfg["name"], "base": ctx.base_name, **extra}


def is_ok(row) -> bool:
    return row.get("status") == "ok"


def fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def md_table(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def generic_table(rows):
    if not rows:
        return "(no rows)"
    skip = {"evaluator", "time", "base"}
    cols = [c for c in rows[0] if c not in skip]
    return md_table(cols, [[r.get(c) for c in cols] for r in rows])


def short_status(s: str) -> str:
    return s if len(s) < 90 else s[:87] + "..."


POLICY_ORDER = ["full", "truncate", "sinks", "recency", "meanpool", "bm25", "retrieve", "lens",
                "needle_oracle", "oracle"]


def policy_order(p):
    """Sort key: the policies in POLICY_ORDER first (in that order), then the others by name."""
    return (POLICY_ORDER.index(p), p) if p in POLICY_ORDER else (len(POLICY_ORDER), p)


def pyplot():
    """matplotlib.pyplot on the Agg backend (imported on first plot: matplotlib is optional)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
