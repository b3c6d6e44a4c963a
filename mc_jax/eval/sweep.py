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
or "unavailable: <why>" (the MegaContext runtime or trained networks do not exist yet); unavailable
items are retried on every run and replaced once they compute. At the end the folder gets
`results.md` (markdown tables) and PNG plots.

Evaluators: `ppl` (long-document perplexity by teacher-forced streaming and the fraction of the
truncate -> full gap each policy closes), `passkey` (retrieval of a 5-digit key hidden in long
filler), `gist_dnll` and `lens_rank` (need the trained networks, via the runtime), `cost` (time per
scored block, ratio to truncate measured in the same item). Policies: `mc_jax.eval.policies.registry`.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.util
import json
import math
import re
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np

from mc_jax.eval.policies import registry as pol
from mc_jax.errors import ConfigError, InputError, MissingResourceError
from mc_jax.base.perplexity import read_text
from mc_jax.base.tiny import build_base
from mc_jax.nets.io import default_checkpoint

K = pol.K
RESULTS = "results.jsonl"
TABLE = "results.md"


# ------------------------------------------------------------------------------------------------
# configs


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
        if e.get("name") not in _EVALUATORS:
            raise ConfigError(f"{spec}: unknown evaluator {e.get('name')!r}; known: "
                              f"{', '.join(sorted(_EVALUATORS))}")
    return cfg, cfg.get("name", p.stem), variant


# ------------------------------------------------------------------------------------------------
# the base model of a sweep


class Context:
    """What evaluators share in one sweep: the base model (loaded on first use), policies, docs."""

    def __init__(self, cfg: dict, config_dir: Path):
        self.cfg = cfg
        self.config_dir = config_dir
        self.checkpoint = cfg.get("checkpoint")
        self.seed = int(cfg.get("seed", 0))
        self._model = None
        self._policies: dict = {}
        self._texts: dict = {}

    @property
    def base_name(self) -> str:
        return str(self.cfg.get("base") or "smollm2-135m")

    @property
    def model(self):
        if self._model is None:
            self._model = build_base(self.cfg.get("base"), self.cfg.get("dtype"),
                                     self.cfg.get("base_kw"))
        return self._model

    def policy(self, name: str, budget: int, policy_kw: dict | None = None):
        """Cached policy instance (`full` ignores the budget and is shared across budgets);
        raises `pol.Unavailable` (cached too) for a MegaContext policy that cannot exist yet."""
        key = (name, None if name == "full" else int(budget))
        if key not in self._policies:
            try:
                if name in pol.MC_POLICIES:
                    pol.runtime_function("make_policy")  # before touching the model
                self._policies[key] = pol.make_policy(name, self.model, int(budget),
                                                      checkpoint=self.checkpoint,
                                                      **(policy_kw or {}).get(name, {}))
            except pol.Unavailable as e:
                self._policies[key] = e
        p = self._policies[key]
        if isinstance(p, Exception):
            raise p
        return p

    def resolve(self, path) -> Path:
        p = Path(path)
        return p if p.is_absolute() else (self.config_dir / p).resolve()

    def text_ids(self, path) -> np.ndarray:
        p = self.resolve(path)
        if p not in self._texts:
            self._texts[p] = np.asarray(self.model.tokenizer.encode(read_text(p)), np.int32)
        return self._texts[p]

    def doc_ids(self, doc: dict) -> np.ndarray:
        """Tokens [offset, offset + tokens) of a document file; too short a file is an error."""
        ids = self.text_ids(doc["path"])
        lo, n = int(doc.get("offset", 0)), int(doc["tokens"])
        if lo + n > len(ids):
            raise InputError(f"document {doc['name']!r}: {doc['path']} has {len(ids)} tokens, the "
                             f"config asks for [{lo}, {lo + n}); lower offset/tokens")
        return ids[lo:lo + n]


# ------------------------------------------------------------------------------------------------
# evaluator registry


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
        return _generic_table(rows)

    def plot(self, rows: list[dict], out_dir: Path) -> list[Path]:
        return []


_EVALUATORS: dict[str, Evaluator] = {}


def register_evaluator(name: str):
    def deco(cls):
        inst = cls()
        inst.name = name
        _EVALUATORS[name] = inst
        return cls
    return deco


def evaluator_names() -> list[str]:
    return sorted(_EVALUATORS)


def _ok(row) -> bool:
    return row.get("status") == "ok"


def _fmt(x, nd=3):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "—"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def _md(header: list[str], body: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in body]
    return "\n".join(lines)


def _generic_table(rows):
    if not rows:
        return "(no rows)"
    skip = {"evaluator", "time", "base"}
    cols = [c for c in rows[0] if c not in skip]
    return _md(cols, [[r.get(c) for c in cols] for r in rows])


def _short_status(s: str) -> str:
    return s if len(s) < 90 else s[:87] + "..."


def _grid(ecfg: dict, ctx: Context, extra: dict) -> dict:
    return {"evaluator": ecfg["name"], "base": ctx.base_name, **extra}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ------------------------------------------------------------------------------------------------
# ppl


def scored_blocks(n_tokens: int, score_from: int, n: int | None) -> list[int]:
    """`n` blocks spread evenly over the blocks that start at or after token `score_from`
    (all of them when n is None)."""
    first, last = max(1, -(-score_from // K)), n_tokens // K - 1
    if last < first:
        raise InputError(f"a document of {n_tokens} tokens has no complete block after token "
                         f"{score_from}; use longer documents or a smaller score_from")
    allb = list(range(first, last + 1))
    if n is None or n >= len(allb):
        return allb
    return sorted({allb[int(round(i))] for i in np.linspace(0, len(allb) - 1, n)})


@register_evaluator("ppl")
class PerplexityEvaluator(Evaluator):
    """Long-document perplexity by teacher-forced streaming in 32-token blocks.

    Grid: policies x budgets x docs. Scored blocks: `blocks_per_doc` blocks spread evenly over the
    blocks whose history is at least `score_from` tokens (default W: before that every policy sees
    the whole history), the same blocks for every policy. Gap closed is computed on log-perplexity
    (mean NLL): (nll_truncate - nll_policy) / (nll_truncate - nll_full), over the docs where full
    context applies.
    """

    title = "Long-document perplexity (teacher-forced streaming, 32-token blocks)"

    def items(self, ecfg, ctx):
        out = []
        for W in ecfg["budgets"]:
            for doc in ecfg["docs"]:
                for p in ecfg["policies"]:
                    out.append(_grid(ecfg, ctx, dict(
                        policy=p, W=int(W), doc=doc["name"], tokens=int(doc["tokens"]),
                        score_from=int(ecfg.get("score_from") or W),
                        blocks_per_doc=ecfg.get("blocks_per_doc"))))
        return out

    def run(self, ecfg, ctx, item):
        doc = next(d for d in ecfg["docs"] if d["name"] == item["doc"])
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        ids = ctx.doc_ids(doc)
        blocks = scored_blocks(len(ids), item["score_from"], item["blocks_per_doc"])
        stats = getattr(policy, "stats", None)  # MegaContext policies count what they did
        before = stats() if stats else {}
        t0 = time.perf_counter()
        nll_BxK = np.asarray(policy.nll_stream(ids, blocks), np.float64)
        dt = time.perf_counter() - t0
        if nll_BxK.shape != (len(blocks), K):
            raise ConfigError(f"policy {item['policy']} returned NLL of shape {nll_BxK.shape}, "
                              f"expected {(len(blocks), K)}")
        nll = float(nll_BxK.mean())
        out = dict(nll=nll, ppl=math.exp(nll), scored_tokens=int(nll_BxK.size),
                   scored_blocks=len(blocks), sec_per_block=dt / len(blocks))
        if stats:  # this document's share of the policy's counters
            out["policy_stats"] = {k: v - before.get(k, 0) for k, v in stats().items()}
        return out

    @staticmethod
    def aggregate(rows):
        """Per (W, policy): token-weighted NLL over the docs where truncate, full and the policy
        are all ok, ppl, and gap closed. Also each policy's NLL over all its ok docs."""
        by = {}
        for r in rows:
            by.setdefault((r["W"], r["doc"]), {})[r["policy"]] = r
        out = {}
        for (W, doc), d in by.items():
            base_ok = _ok(d.get("truncate", {})) and _ok(d.get("full", {}))
            for p, r in d.items():
                a = out.setdefault((W, p), dict(docs=0, tok=0, nll_sum=0.0, gdocs=0, gtok=0,
                                                g_p=0.0, g_t=0.0, g_f=0.0, status=r["status"],
                                                sec=[]))
                if not _ok(r):
                    continue
                a["status"] = "ok"
                a["docs"] += 1
                a["tok"] += r["scored_tokens"]
                a["nll_sum"] += r["nll"] * r["scored_tokens"]
                a["sec"].append(r["sec_per_block"])
                if base_ok:
                    n = r["scored_tokens"]
                    a["gdocs"] += 1
                    a["gtok"] += n
                    a["g_p"] += r["nll"] * n
                    a["g_t"] += d["truncate"]["nll"] * n
                    a["g_f"] += d["full"]["nll"] * n
        for a in out.values():
            a["nll"] = a["nll_sum"] / a["tok"] if a["tok"] else None
            a["ppl"] = math.exp(a["nll"]) if a["nll"] is not None else None
            a["ppl_common"] = math.exp(a["g_p"] / a["gtok"]) if a["gtok"] else None
            if a["gtok"] and abs(a["g_t"] - a["g_f"]) > 1e-12:
                a["gap_closed"] = (a["g_t"] - a["g_p"]) / (a["g_t"] - a["g_f"])
            else:
                a["gap_closed"] = None
            a["sec_per_block"] = float(np.median(a["sec"])) if a["sec"] else None
        return out

    def table(self, rows):
        agg = self.aggregate(rows)
        body = []
        for (W, p), a in sorted(agg.items(), key=lambda kv: (kv[0][0], _porder(kv[0][1]))):
            if a["status"] != "ok":
                body.append([W, p, _short_status(a["status"]), None, None, None, None, None])
            else:
                body.append([W, p, "ok", a["gdocs"], a["ppl_common"], a["gap_closed"], a["docs"],
                             a["ppl"]])
        s = ("Per budget W. Perplexity = exp(token-weighted mean NLL). `full fits`: the documents "
             "where truncate and full context both ran, the same tokens for every policy; "
             "`gap closed` = (nll_truncate - nll_policy) / (nll_truncate - nll_full), i.e. on "
             "log-perplexity, over those documents. `all docs`: every document the policy ran "
             "on.\n\n")
        s += _md(["W", "policy", "status", "docs (full fits)", "ppl (full fits)", "gap closed",
                  "docs (all)", "ppl (all docs)"], body)
        per = [[r["W"], r["doc"], r["policy"],
                r["ppl"] if _ok(r) else _short_status(r["status"]),
                r.get("sec_per_block")] for r in sorted(
                    rows, key=lambda r: (r["W"], r["doc"], _porder(r["policy"])))]
        s += ("\n\nPer document (s/block: wall time of the row / scored blocks; the first row of "
              "a shape includes its compile):\n\n"
              + _md(["W", "doc", "policy", "ppl", "s/block"], per))
        return s

    def plot(self, rows, out_dir):
        agg = {k: a for k, a in self.aggregate(rows).items() if a["status"] == "ok"}
        if not agg:
            return []
        plt = _plt()
        Ws = sorted({W for W, _ in agg})
        ps = sorted({p for _, p in agg}, key=_porder)
        fig, ax = plt.subplots(figsize=(1.5 + 1.2 * len(Ws) * len(ps) / 2, 3.5))
        width = 0.8 / len(ps)
        common = any(a["ppl_common"] for a in agg.values())
        field = "ppl_common" if common else "ppl"
        allys = []
        for j, p in enumerate(ps):
            ys = [agg.get((W, p), {}).get(field) or np.nan for W in Ws]
            allys += ys
            bars = ax.bar(np.arange(len(Ws)) + j * width, ys, width, label=p)
            ax.bar_label(bars, fmt="%.2f", fontsize=7)
        lo, hi = np.nanmin(allys), np.nanmax(allys)
        ax.set_ylim(lo - 0.5 * (hi - lo + 1e-3), hi + 0.3 * (hi - lo + 1e-3))
        ax.set_xticks(np.arange(len(Ws)) + 0.4 - width / 2, [f"W={W}" for W in Ws])
        ax.set_ylabel("perplexity" + (" (docs where full fits)" if common else ""))
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "ppl.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]


_ORDER = ["full", "truncate", "sinks", "recency", "meanpool", "lens", "oracle"]


def _porder(p):
    return (_ORDER.index(p), p) if p in _ORDER else (len(_ORDER), p)


# ------------------------------------------------------------------------------------------------
# passkey

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize "
         "it. I will quiz you about the important information there.\n")
REPEAT_FILLER = (" The grass is green. The sky is blue. The sun is yellow. Here we go. There and "
                 "back again.")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "\nWhat is the pass key? The pass key is"


def passkey_case(tokenizer, W: int, mult: int, filler: str, depth: float, placement: str,
                 seed: int, prose_ids: np.ndarray | None = None) -> dict:
    """One passkey history of exactly mult*W tokens, built by token index.

    Filler: `repeat` (the Landmark Attention sentences, repeated) or `prose` (the given text from a
    seeded offset, repeated cyclically when the history is longer than the text).

    The needle starts at token `intro + depth * (room)`; `aligned` moves it to the nearest block
    start, `straddle` moves it so its first two key digits end one block and the rest begin the
    next. Deterministic in (seed, W, mult, filler, depth, placement).
    """
    digest = hashlib.sha256(repr((seed, W, mult, filler, depth, placement)).encode()).digest()
    rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
    key = int(rng.integers(10000, 100000))
    L = mult * W
    intro = tokenizer.encode(INTRO)
    needle = tokenizer.encode(NEEDLE.format(key=key))
    question = tokenizer.encode(QUESTION)
    n_fill = L - len(intro) - len(needle)
    if n_fill < K:
        raise InputError(f"passkey history of {L} tokens is too short for the needle")
    if filler == "repeat":
        unit = tokenizer.encode(REPEAT_FILLER)
        fill = np.resize(np.asarray(unit, np.int32), n_fill)
    elif filler == "prose":
        if prose_ids is None or len(prose_ids) < 4 * K:
            raise InputError("prose filler needs a text of at least 128 tokens (config: prose=)")
        lo = int(rng.integers(0, len(prose_ids)))
        fill = np.resize(np.roll(prose_ids, -lo), n_fill)  # cyclic when the text is shorter
    else:
        raise InputError(f"unknown passkey filler {filler!r} (repeat | prose)")
    p = len(intro) + int(round(depth * n_fill))
    k_off = next(i for i, t in enumerate(needle) if any(c.isdigit() for c in tokenizer.decode([t])))
    if placement == "aligned":
        p = round(p / K) * K
    elif placement == "straddle":
        p = round((p + k_off) / K) * K - k_off - 2
    else:
        raise InputError(f"unknown passkey placement {placement!r} (aligned | straddle)")
    p = int(min(max(p, len(intro)), L - len(needle)))
    body = np.concatenate([np.asarray(intro, np.int32), fill])
    hist = np.concatenate([body[:p], np.asarray(needle, np.int32), body[p:]])
    assert len(hist) == L
    return dict(history=hist, question=question, key=key, needle_start=p,
                key_start=p + k_off)


@register_evaluator("passkey")
class PasskeyEvaluator(Evaluator):
    """Passkey retrieval: a 5-digit key in mult*W tokens of filler, asked for at the end; exact
    match of the first number in the greedy answer. Grid: policies x budgets x history multiples x
    filler kinds (`repeat`: Landmark Attention sentences; `prose`: a shipped text) x depths x
    placements (`aligned` to a block start, `straddle` across a block boundary) x seeds."""

    title = "Passkey retrieval (exact match of the greedy answer)"

    def items(self, ecfg, ctx):
        out = []
        for W in ecfg["budgets"]:
            for m in ecfg["history_mults"]:
                for f in ecfg.get("fillers", ["repeat"]):
                    for d in ecfg["depths"]:
                        for pl in ecfg.get("placements", ["aligned", "straddle"]):
                            for s in ecfg.get("seeds", [0]):
                                for p in ecfg["policies"]:
                                    out.append(_grid(ecfg, ctx, dict(
                                        policy=p, W=int(W), mult=int(m), filler=f,
                                        depth=float(d), placement=pl, seed=int(s))))
        return out

    def run(self, ecfg, ctx, item):
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        prose = ctx.text_ids(ecfg["prose"]) if item["filler"] == "prose" else None
        case = passkey_case(ctx.model.tokenizer, item["W"], item["mult"], item["filler"],
                            item["depth"], item["placement"], item["seed"], prose)
        t0 = time.perf_counter()
        ans = policy.answer(case["history"], case["question"],
                            int(ecfg.get("max_new_tokens", 8)))
        m = re.search(r"\d+", ans)
        correct = bool(m and m.group() == str(case["key"]))
        return dict(passkey=case["key"], answer=ans, correct=correct,
                    history_tokens=len(case["history"]), needle_start=case["needle_start"],
                    key_start=case["key_start"], seconds=time.perf_counter() - t0)

    @staticmethod
    def _cells(rows):
        cells = {}
        for r in rows:
            c = cells.setdefault((r["W"], r["mult"], r["filler"], r["policy"]),
                                 dict(n=0, ok=0, al=[0, 0], st=[0, 0], status=r["status"]))
            if not _ok(r):
                continue
            c["status"] = "ok"
            c["n"] += 1
            c["ok"] += r["correct"]
            t = c["al"] if r["placement"] == "aligned" else c["st"]
            t[0] += r["correct"]
            t[1] += 1
        return cells

    def table(self, rows):
        body = []
        cells = self._cells(rows)
        for (W, m, f, p), c in sorted(cells.items(),
                                      key=lambda kv: (kv[0][0], kv[0][1], kv[0][2],
                                                      _porder(kv[0][3]))):
            if c["status"] != "ok":
                body.append([W, f"{m}x ({m * W})", f, p, _short_status(c["status"]), None, None,
                             None])
                continue
            acc = lambda t: f"{t[0]}/{t[1]}" if t[1] else "—"  # noqa: E731
            body.append([W, f"{m}x ({m * W})", f, p, "ok", c["ok"] / c["n"], acc(c["al"]),
                         acc(c["st"])])
        return _md(["W", "history", "filler", "policy", "status", "accuracy", "aligned",
                    "straddle"], body)

    def plot(self, rows, out_dir):
        cells = {k: c for k, c in self._cells(rows).items() if c["status"] == "ok"}
        if not cells:
            return []
        plt = _plt()
        keys = sorted({(W, f) for W, _, f, _ in cells})
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
        for ax, (W, f) in zip(axes[0], keys):
            for p in sorted({p for (w, _, ff, p) in cells if (w, ff) == (W, f)}, key=_porder):
                ms = sorted(m for (w, m, ff, pp) in cells if (w, ff, pp) == (W, f, p))
                ys = [cells[(W, m, f, p)]["ok"] / cells[(W, m, f, p)]["n"] for m in ms]
                ax.plot(ms, ys, marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_ylim(-0.05, 1.05)
            ax.set_xlabel("history / W")
            ax.set_title(f"W={W}, {f} filler", fontsize=9)
        axes[0][0].set_ylabel("passkey accuracy")
        axes[0][0].legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "passkey.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]


# ------------------------------------------------------------------------------------------------
# evaluators that need the trained networks (runtime adapters)


def _runtime_call(fn_name: str, **kw) -> dict:
    fn = pol.runtime_function(fn_name, ("mc_jax.runtime.decode", "mc_jax.training.train"))
    try:
        out = fn(**kw)
    except (NotImplementedError, MissingResourceError) as e:
        raise pol.Unavailable(f"{fn_name}(): {e}") from e
    return dict(out)


def _eval_networks(ctx: Context, fn_name: str, **kw) -> dict:
    """`mc_jax.eval.networks.eval_gists / eval_lens` (held-out validation windows of the prepared
    corpus, trained networks from `checkpoint`), memoised per call: one call serves every row."""
    if ctx.cfg.get("base") == "tiny":
        raise pol.Unavailable("eval_networks needs the real base model, not the tiny random one")
    try:
        import mc_jax.eval.networks as en
    except ImportError as e:
        raise pol.Unavailable(f"mc_jax.eval.networks not importable ({e})") from e
    ckpt = ctx.checkpoint or default_checkpoint()
    if not (Path(ckpt) / "networks.json").exists():
        raise pol.Unavailable(f"no trained networks at {ckpt} (give --checkpoint DIR, an "
                              "export_networks directory)")
    memo = ctx.__dict__.setdefault("_en_memo", {})
    key = (fn_name, str(ckpt), tuple(sorted(kw.items())))
    if key not in memo:
        memo[key] = getattr(en, fn_name)(str(ckpt), base=ctx.cfg.get("base"), progress=False,
                                         **kw)
    return memo[key]


@register_evaluator("gist_dnll")
class GistDeltaNLLEvaluator(Evaluator):
    """Delta-NLL@H of substituting one block (one node at `level`) by its gist, GistNet vs
    mean-pool. With `source="eval_networks"`: `mc_jax.eval.networks.eval_gists` on held-out
    validation windows (`n_samples` windows; needs the prepared corpus and a checkpoint).
    Otherwise the runtime contract: `gist_dnll(model=, checkpoint=, ids=, level=, horizon=, gist=
    "gistnet"|"meanpool", n_samples=, seed=) -> {"dnll": float, ...}` in mc_jax.runtime.decode or
    mc_jax.training.train."""

    title = "Delta-NLL@H of one-node gist substitution"

    def items(self, ecfg, ctx):
        if ecfg.get("source") == "eval_networks":  # held-out windows, all levels in one call
            return [_grid(ecfg, ctx, dict(gist=g, level=int(lv), doc="validation",
                                          horizon=int(ecfg.get("horizon", 64)),
                                          n_samples=int(ecfg.get("n_samples", 6)), seed=int(s)))
                    for g in ecfg.get("gists", ["gistnet", "meanpool"])
                    for lv in ecfg.get("levels", [1, 2]) for s in ecfg.get("seeds", [0])]
        return [_grid(ecfg, ctx, dict(gist=g, level=int(lv), doc=d["name"],
                                      horizon=int(ecfg.get("horizon", 64)),
                                      n_samples=int(ecfg.get("n_samples", 16)), seed=int(s)))
                for g in ecfg.get("gists", ["gistnet", "meanpool"])
                for lv in ecfg.get("levels", [1, 2]) for d in ecfg["docs"]
                for s in ecfg.get("seeds", [0])]

    def run(self, ecfg, ctx, item):
        if ecfg.get("source") == "eval_networks":
            res = _eval_networks(ctx, "eval_gists", n_docs=item["n_samples"],
                                 horizon=item["horizon"], seed=item["seed"])
            name = f"lod{item['level']}_{item['gist']}"
            if name not in res:
                raise pol.NotApplicable(f"eval_gists reports no {name}")
            return dict(dnll=res[name], dnll_sem=res.get(f"{name}_sem"),
                        dnll_drop=res.get(f"lod{item['level']}_drop"),
                        trained_steps=res.get("trained_steps"))
        pol.runtime_function("gist_dnll", ("mc_jax.runtime.decode", "mc_jax.training.train"))
        doc = next(d for d in ecfg["docs"] if d["name"] == item["doc"])
        return _runtime_call("gist_dnll", model=ctx.model, checkpoint=ctx.checkpoint,
                             ids=ctx.doc_ids(doc), level=item["level"], horizon=item["horizon"],
                             gist=item["gist"], n_samples=item["n_samples"], seed=item["seed"])

    def table(self, rows):
        return _md(["gist", "level", "doc", "status", "delta-NLL@H (nats/token)",
                    "drop the node instead"],
                   [[r["gist"], r["level"], r["doc"], _short_status(r["status"]), r.get("dnll"),
                     r.get("dnll_drop")] for r in rows])


@register_evaluator("lens_rank")
class LensRankEvaluator(Evaluator):
    """How well LensNet scores rank measured single-edit delta-NLL (Spearman). With
    `source="eval_networks"`: `mc_jax.eval.networks.eval_lens` (mixture WCs sampled as in
    training, on `n_samples` held-out windows). Otherwise the runtime contract:
    `lens_rank(model=, checkpoint=, ids=, budget=, horizon=, n_samples=, seed=) ->
    {"spearman": float, ...}` in mc_jax.runtime.decode or mc_jax.training.train."""

    title = "LensNet ranking of measured edit utilities"

    def items(self, ecfg, ctx):
        if ecfg.get("source") == "eval_networks":  # WCs sampled as in training
            return [_grid(ecfg, ctx, dict(W=None, doc="validation",
                                          n_samples=int(ecfg.get("n_samples", 6)), seed=int(s)))
                    for s in ecfg.get("seeds", [0])]
        return [_grid(ecfg, ctx, dict(W=int(W), doc=d["name"],
                                      horizon=int(ecfg.get("horizon", 64)),
                                      n_samples=int(ecfg.get("n_samples", 16)), seed=int(s)))
                for W in ecfg["budgets"] for d in ecfg["docs"] for s in ecfg.get("seeds", [0])]

    def run(self, ecfg, ctx, item):
        if ecfg.get("source") == "eval_networks":
            res = _eval_networks(ctx, "eval_lens", n_docs=item["n_samples"], seed=item["seed"])
            return {k: v for k, v in res.items() if k != "checkpoint"}
        pol.runtime_function("lens_rank", ("mc_jax.runtime.decode", "mc_jax.training.train"))
        doc = next(d for d in ecfg["docs"] if d["name"] == item["doc"])
        return _runtime_call("lens_rank", model=ctx.model, checkpoint=ctx.checkpoint,
                             ids=ctx.doc_ids(doc), budget=item["W"], horizon=item["horizon"],
                             n_samples=item["n_samples"], seed=item["seed"])

    def table(self, rows):
        return _md(["W", "doc", "status", "Spearman"],
                   [[r["W"], r["doc"], _short_status(r["status"]), r.get("spearman")]
                    for r in rows])


# ------------------------------------------------------------------------------------------------
# cost


@register_evaluator("cost")
class CostEvaluator(Evaluator):
    """Seconds per scored block of `nll_stream` after warm-up (a warm-up call on a different
    document of the same length, so no compile and no memo is timed), and the ratio to truncate at
    the same W timed in the same item. The document's last `blocks` blocks are scored."""

    title = "Cost: seconds per scored 32-token block (after warm-up) and ratio to truncate"

    def items(self, ecfg, ctx):
        return [_grid(ecfg, ctx, dict(policy=p, W=int(W), doc=ecfg["doc"]["name"],
                                      tokens=int(ecfg["doc"]["tokens"]),
                                      blocks=int(ecfg.get("blocks", 4))))
                for W in ecfg["budgets"] for p in ecfg["policies"]]

    @staticmethod
    def _time(policy, ids, blocks) -> float:
        policy.nll_stream(np.roll(ids, 1), blocks)  # warm-up: compile (and any memo) elsewhere
        t0 = time.perf_counter()
        policy.nll_stream(ids, blocks)
        return (time.perf_counter() - t0) / len(blocks)

    def run(self, ecfg, ctx, item):
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        ids = ctx.doc_ids(ecfg["doc"])
        nb = len(ids) // K
        blocks = list(range(max(1, nb - item["blocks"]), nb))
        sec = self._time(policy, ids, blocks)
        base = sec if item["policy"] == "truncate" else self._time(
            ctx.policy("truncate", item["W"]), ids, blocks)
        return dict(sec_per_block=sec, truncate_sec_per_block=base, ratio=sec / base,
                    stream_blocks=nb)

    def table(self, rows):
        body = [[r["W"], r["policy"], _short_status(r["status"]), r.get("sec_per_block"),
                 r.get("truncate_sec_per_block"), r.get("ratio")]
                for r in sorted(rows, key=lambda r: (r["W"], _porder(r["policy"])))]
        return _md(["W", "policy", "status", "s/block", "truncate s/block", "ratio"], body)

    def plot(self, rows, out_dir):
        ok = [r for r in rows if _ok(r)]
        if not ok:
            return []
        plt = _plt()
        ok.sort(key=lambda r: (r["W"], _porder(r["policy"])))
        fig, ax = plt.subplots(figsize=(1.5 + 0.6 * len(ok), 3.2))
        ax.bar(range(len(ok)), [r["ratio"] for r in ok])
        ax.set_xticks(range(len(ok)), [f"{r['policy']}\nW={r['W']}" for r in ok], fontsize=7)
        ax.axhline(1.0, color="k", lw=0.5)
        ax.set_ylabel("time per block / truncate")
        fig.tight_layout()
        path = out_dir / "cost.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return [path]


# ------------------------------------------------------------------------------------------------
# driver


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
    grid = {ecfg_i: _EVALUATORS[ecfg["name"]].items(ecfg, ctx)
            for ecfg_i, ecfg in enumerate(cfg["evaluators"])}
    with open(out / RESULTS, "a") as f:
        for ecfg_i, ecfg in enumerate(cfg["evaluators"]):
            ev = _EVALUATORS[ecfg["name"]]
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
    names = dict.fromkeys([e["name"] for e in cfg["evaluators"]] + sorted(_EVALUATORS))
    for ev_name in names:  # the config's order first, then rows of evaluators it no longer lists
        ev = _EVALUATORS[ev_name]
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


# ------------------------------------------------------------------------------------------------
# CLI


def add_eval_args(p) -> None:
    p.add_argument("--sweep", required=True,
                   help="a sweep config: experiments/configs/NAME.py[:VARIANT]")
    p.add_argument("--out", default=None,
                   help="output folder (results.jsonl, results.md, plots; default "
                        "runs/eval/NAME[_VARIANT]); an existing one is resumed")
    p.add_argument("--checkpoint", default=None,
                   help="GistNet/LensNet checkpoint for the MegaContext policies (overrides the "
                        "config)")
    p.add_argument("--base", default=None,
                   help="base model: .gguf file or Hugging Face directory (overrides the config)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                   help="compute dtype of the base model (overrides the config)")
    p.add_argument("--only", default=None,
                   help=f"comma-separated evaluators to run ({', '.join(evaluator_names())})")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def eval_cli(args) -> int:
    res = run_sweep(args.sweep, args.out, checkpoint=args.checkpoint, base=args.base,
                    dtype=args.dtype, only=args.only.split(",") if args.only else None,
                    plots=not args.no_plots, progress=not args.quiet)
    print(f"{res['computed']} rows computed, {res['skipped']} already done; "
          f"table: {res['table']}" + "".join(f"\nplot: {p}" for p in res["plots"]))
    return 0

