"""Evaluation sweeps: a config file names evaluators and their grids; every grid point is one row.

    mc-jax eval --sweep experiments/configs/cpu_small.py:quick [--out DIR]

A config is a Python file defining `get_config(variant: str | None) -> dict` (big_vision style: the
variant is picked on the command line after a colon). The dict holds the base model, the
checkpoint of the trained networks (if any) and a list of evaluators, each
`{"name": <registered evaluator>, ...its grid...}`.

Every evaluator turns its grid into work items (plain dicts: the row key) and computes one row per
item. Rows are appended to `results.jsonl` in the output folder as soon as they exist, so a killed
sweep resumes where it stopped: an item whose key already has a row is not recomputed. A row's
`status` is "ok", "not applicable: <why>" (e.g. full context longer than the base model's context)
or "unavailable: <why>" (e.g. no trained networks for this base model); unavailable items are
retried on every run and replaced once they compute. At the end the folder gets `results.md`
(markdown tables) and PNG plots.

Evaluators: `mc_jax.eval.evaluators` (one file each). Policies: `mc_jax.eval.policies.registry`.
The command line: `mc_jax.cli.eval`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np

from mc_jax.errors import ConfigError, InputError
from mc_jax.eval.context import Context
from mc_jax.eval.evaluators import EVALUATORS
from mc_jax.eval.policies import registry as pol

RESULTS = "results.jsonl"
TABLE = "results.md"


def load_config(spec: str) -> tuple[dict, str, str | None]:
    """`path/to/config.py[:variant]` -> (config dict, config name, variant)."""
    path, _, variant = str(spec).partition(":")
    variant = variant or None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sweep config {path}: no such file (give experiments/configs/NAME.py)")
    module_spec = importlib.util.spec_from_file_location(f"mc_jax_sweep_{p.stem}", p)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant)")
    try:
        cfg = module.get_config(variant)
    except (ValueError, KeyError) as e:  # e.g. an unknown variant
        raise ConfigError(f"{path}: get_config({variant!r}) failed: {e}") from e
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    cfg = dict(cfg)
    if not cfg.get("evaluators"):
        raise ConfigError(f"{spec}: the config lists no evaluators")
    for e in cfg["evaluators"]:
        if e.get("name") not in EVALUATORS:
            raise ConfigError(f"{spec}: unknown evaluator {e.get('name')!r}; known: "
                              f"{', '.join(sorted(EVALUATORS))}")
    return cfg, cfg.get("name", p.stem), variant


# ------------------------------------------------------------------------------------------------
# rows and the driver


def row_key(item: dict) -> str:
    return json.dumps(item, sort_keys=True)


def read_rows(path: Path) -> dict[str, dict]:
    """results.jsonl -> {key: last row with that key}. A torn last line (killed run) is ignored."""
    rows: dict[str, dict] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        rows[row_key(row["key"])] = row
    return rows


def _flat(row: dict) -> dict:
    return {**row["key"], **{k: v for k, v in row.items() if k != "key"}}


def default_out_dir(name: str, variant: str | None) -> Path:
    return Path("runs") / "eval" / (name + (f"_{variant}" if variant else ""))


def run_sweep(spec: str, out_dir: str | Path | None = None, *, checkpoint: str | None = None,
              base: str | None = None, dtype: str | None = None, only: Iterable[str] | None = None,
              plots: bool = True, progress: bool = True) -> dict:
    """Run (or resume) the sweep `path/config.py[:variant]` into `out_dir`.

    Returns {"out_dir", "computed", "skipped", "rows", "table", "plots"}: `computed` counts rows
    appended by this call, `skipped` the items that already had a row.
    """
    from tqdm import tqdm

    cfg, name, variant = load_config(spec)
    if checkpoint is not None:
        cfg["checkpoint"] = checkpoint
    if base is not None:
        cfg["base"] = base
    if dtype is not None:
        cfg["dtype"] = dtype
    out = Path(out_dir) if out_dir is not None else default_out_dir(name, variant)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(
        {"sweep": str(spec), "config": cfg}, indent=1, default=str))
    ctx = Context(cfg, Path(str(spec).partition(":")[0]).resolve().parent)
    done = read_rows(out / RESULTS)
    only = set(only) if only else None
    computed = skipped = 0
    grid = {ecfg_i: EVALUATORS[ecfg["name"]].items(ecfg, ctx)
            for ecfg_i, ecfg in enumerate(cfg["evaluators"])}
    with open(out / RESULTS, "a") as f:
        for ecfg_i, ecfg in enumerate(cfg["evaluators"]):
            ev = EVALUATORS[ecfg["name"]]
            if only and ev.name not in only:
                continue
            items = grid[ecfg_i]
            bar = tqdm(items, desc=f"{name}:{ev.name}", disable=not progress, file=sys.stderr,
                       dynamic_ncols=True)
            for item in bar:
                key = row_key(item)
                prev = done.get(key)
                if prev is not None and not prev["status"].startswith("unavailable"):
                    skipped += 1
                    continue
                t0 = time.perf_counter()
                try:
                    metrics = dict(status="ok", **ev.run(ecfg, ctx, item))
                except pol.Unavailable as e:
                    metrics = dict(status=f"unavailable: {e}")
                except pol.NotApplicable as e:
                    metrics = dict(status=f"not applicable: {e}")
                if prev is not None and prev["status"] == metrics["status"]:
                    skipped += 1  # still unavailable for the same reason: nothing new
                    continue
                row = dict(key=item, **metrics, wall_s=round(time.perf_counter() - t0, 3),
                           time=datetime.datetime.now().isoformat(timespec="seconds"))
                f.write(json.dumps(row, default=_json_default) + "\n")
                f.flush()
                done[key] = json.loads(json.dumps(row, default=_json_default))
                computed += 1
    keys = {row_key(it) for items in grid.values() for it in items}
    table, pngs = write_report(out, cfg, name, variant, spec, plots=plots, keys=keys)
    return dict(out_dir=out, computed=computed, skipped=skipped, rows=len(done), table=table,
                plots=pngs)


def _json_default(x):
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.floating,)):
        return float(x)
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def write_report(out: Path, cfg: dict, name: str, variant: str | None, spec: str, *,
                 plots: bool = True, keys: set[str] | None = None) -> tuple[Path, list[Path]]:
    """results.md (one section per evaluator) and the PNG plots, from the rows of results.jsonl
    whose keys are in `keys` (the config's grid; rows of an older grid stay in the jsonl)."""
    rows = [_flat(r) for k, r in read_rows(out / RESULTS).items() if keys is None or k in keys]
    lines = [f"# Sweep {name}" + (f":{variant}" if variant else ""), "",
             f"`mc-jax eval --sweep {spec} --out {out}`; base: {cfg.get('base') or 'smollm2-135m'}"
             f"; checkpoint: {cfg.get('checkpoint')}; rows: {len(rows)}", ""]
    pngs: list[Path] = []
    names = dict.fromkeys([e["name"] for e in cfg["evaluators"]] + sorted(EVALUATORS))
    for ev_name in names:  # the config's order first, then rows of evaluators it no longer lists
        ev = EVALUATORS[ev_name]
        ev_rows = [r for r in rows if r["evaluator"] == ev_name]
        if not ev_rows:
            continue
        lines += [f"## {ev_name}: {ev.title}", "", ev.table(ev_rows), ""]
        if plots:
            for p in ev.plot(ev_rows, out):
                pngs.append(p)
                lines += [f"![{ev_name}]({p.name})", ""]
    table = out / TABLE
    table.write_text("\n".join(lines))
    return table, pngs
