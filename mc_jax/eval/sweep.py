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

from mc_jax.errors import ConfigError, CorruptFileError, InputError
from mc_jax.eval.context import Context
from mc_jax.eval.evaluators import EVALUATORS
from mc_jax.eval.policies import registry as pol

RESULTS = "results.jsonl"
TABLE = "results.md"


# config keys whose value is a list (a string there would be iterated character by character)
LIST_KEYS = ("evaluators", "policies", "budgets", "docs", "history_mults", "fillers", "depths",
             "placements", "seeds", "levels", "tasks", "lengths")


def load_config(spec: str) -> tuple[dict, str, str | None]:
    """`path/to/config.py[:variant]` -> (config dict, config name, variant), checked whole before
    anything runs: the evaluators and policies it names exist, the lists are lists, the name is
    one safe folder name. Any failure of the file itself is a ConfigError naming it."""
    path, _, variant = str(spec).partition(":")
    variant = variant or None
    p = Path(path)
    if not p.is_file():
        raise InputError(f"sweep config {path}: no such file (give experiments/configs/NAME.py)")
    try:
        module_spec = importlib.util.spec_from_file_location(f"mc_jax_sweep_{p.stem}", p)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    except Exception as e:  # a syntax error, a failing import: the user's file, not ours
        raise ConfigError(f"sweep config {path} cannot be loaded: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} defines no get_config(variant)")
    try:
        cfg = module.get_config(variant)
    except Exception as e:  # e.g. an unknown variant
        raise ConfigError(f"{path}: get_config({variant!r}) failed: {type(e).__name__}: {e}"
                          ) from e
    if dataclasses.is_dataclass(cfg):
        cfg = dataclasses.asdict(cfg)
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: get_config({variant!r}) returned a {type(cfg).__name__}; "
                          "it must return a dict")
    cfg = dict(cfg)
    check_config(cfg, spec)
    name = cfg.get("name", p.stem)
    for what, v in (("name", name), ("variant", variant)):
        if v is not None and not is_safe_name(v):
            raise ConfigError(f"{spec}: the sweep {what} {v!r} is not one plain folder name (no "
                              "'/', '\\', '..' or absolute path): it names the output folder")
    return cfg, name, variant


def check_config(cfg: dict, spec: str) -> None:
    """Evaluators and policies known, list fields lists: a ConfigError before the first row."""
    if not cfg.get("evaluators"):
        raise ConfigError(f"{spec}: the config lists no evaluators")
    _check_shape("config", cfg, spec)
    if not isinstance(cfg["evaluators"], (list, tuple)):
        cfg["evaluators"] = list(cfg["evaluators"])  # iterated more than once
    for i, e in enumerate(cfg["evaluators"]):
        _check_shape(f"evaluator {i}", e, spec)
    known = pol.policy_names()
    for e in cfg["evaluators"]:
        if e.get("name") not in EVALUATORS:
            raise ConfigError(f"{spec}: unknown evaluator {e.get('name')!r}; known: "
                              f"{', '.join(sorted(EVALUATORS))}")
        where = f"{spec}: evaluator {e['name']!r}"
        bad = [q for q in e.get("policies", ()) if q not in known]
        if bad:
            raise ConfigError(f"{where}: unknown policy {bad[0]!r}; known: {', '.join(known)}")
        bad = [w for w in e.get("budgets", ())
               if isinstance(w, bool) or not isinstance(w, (int, np.integer)) or w < 1]
        if bad:
            raise ConfigError(f"{where}: budget {bad[0]!r} is not a positive integer")
        for doc in list(e.get("docs", ())) + ([e["doc"]] if "doc" in e else []):
            if not (isinstance(doc, dict) and {"name", "path", "tokens"} <= set(doc)):
                raise ConfigError(f"{where}: document {doc!r} needs name, path and tokens "
                                  "(dict(name=..., path=..., tokens=N[, offset=M]))")


def _check_shape(where: str, e, spec: str) -> None:
    """A dict whose list fields (LIST_KEYS) are lists."""
    if not isinstance(e, dict):
        raise ConfigError(f"{spec}: {where} is a {type(e).__name__}; give a dict "
                          "{'name': ..., its grid}")
    for k in LIST_KEYS:
        if k in e and (isinstance(e[k], (str, bytes, dict)) or not hasattr(e[k], "__iter__")):
            raise ConfigError(f"{spec}: {where}: {k!r} is a {type(e[k]).__name__}; give a list "
                              f"(e.g. {k}=[{e[k]!r}])")


def is_safe_name(name) -> bool:
    """One plain path component: joined to a folder, it cannot leave it."""
    return (isinstance(name, str) and name not in ("", ".", "..")
            and not any(c in name for c in "/\\\0") and Path(name).name == name)


# ------------------------------------------------------------------------------------------------
# rows and the driver


def row_key(item: dict) -> str:
    return json.dumps(item, sort_keys=True)


def read_rows(path: Path) -> dict[str, dict]:
    """results.jsonl -> {key: last row with that key}. A torn last line (a killed run) is skipped
    with a warning (`repair_rows` cuts it off before rows are appended); any other line that is
    not a row is a CorruptFileError naming it. Blank lines are skipped."""
    if not path.exists():
        return {}
    rows, torn = _parse(path)
    if torn is not None:
        print(f"[mc-jax] warning: {path}: the last line is incomplete (a killed run?); skipped, "
              "its item is computed again", file=sys.stderr)
    return {row_key(r["key"]): r for r in rows}


def _parse(path: Path) -> tuple[list[dict], int | None]:
    """(the rows in file order, byte offset of a torn last line or None)."""
    lines = path.read_bytes().split(b"\n")  # the last piece is b"" after a final newline
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    rows, pos = [], 0
    for i, line in enumerate(lines):
        start, pos = pos, pos + len(line) + 1
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:  # JSONDecodeError, UnicodeDecodeError
            if i == last:  # torn by a kill while it was written
                return rows, start
            row = None
        if not (isinstance(row, dict) and isinstance(row.get("key"), dict) and "status" in row):
            raise CorruptFileError(
                f"{path}, line {i + 1}: not a result row ({line[:60]!r}); fix or delete that "
                "line (rows are JSON objects with 'key' and 'status'), or give another --out")
        rows.append(row)
    return rows, None


def repair_rows(path: Path) -> None:
    """Before appending: end the file just after its last complete row. A torn last line is cut
    off (read_rows skipped it); a complete last row without its newline gets one."""
    if not path.exists():
        return
    _, torn = _parse(path)
    with open(path, "r+b") as f:
        if torn is not None:
            f.truncate(torn)
        elif f.seek(0, 2) > 0:
            f.seek(-1, 2)
            if f.read(1) != b"\n":
                f.write(b"\n")


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
    only = check_only(only, cfg, spec)
    out = Path(out_dir) if out_dir is not None else default_out_dir(name, variant)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out}: is a file, not a folder; give a folder (a new one, or an "
                         "earlier sweep's to resume it)")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a parent that is a file
        raise InputError(f"--out {out}: cannot create the folder ({e.strerror or e})") from e
    (out / "config.json").write_text(json.dumps(
        {"sweep": str(spec), "config": cfg}, indent=1, default=str))
    ctx = Context(cfg, Path(str(spec).partition(":")[0]).resolve().parent)
    done = read_rows(out / RESULTS)
    computed = skipped = 0
    grid = {ecfg_i: EVALUATORS[ecfg["name"]].items(ecfg, ctx)
            for ecfg_i, ecfg in enumerate(cfg["evaluators"])}
    repair_rows(out / RESULTS)  # a torn last line must not swallow the first new row
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


def check_only(only: Iterable[str] | None, cfg: dict, spec: str) -> set[str] | None:
    """`--only` names: each a registered evaluator that the config lists (else no row could
    come of it), or a ConfigError listing the ones there are."""
    if not only:
        return None
    only = {str(n).strip() for n in only if str(n).strip()}
    listed = [e["name"] for e in cfg["evaluators"]]
    for n in sorted(only):
        if n not in EVALUATORS:
            raise ConfigError(f"--only {n}: unknown evaluator; known: "
                              f"{', '.join(sorted(EVALUATORS))}")
        if n not in listed:
            raise ConfigError(f"--only {n}: {spec} does not list it; it lists: "
                              f"{', '.join(dict.fromkeys(listed))}")
    return only or None


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
