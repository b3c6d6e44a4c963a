"""`ruler`: RULER-lite retrieval (`mc_jax.eval.tasks`) for every policy at equal budget W:
accuracy with 95% intervals, block recall@k of the policies that rank blocks, whether the gold
blocks were raw in what the base read, depth x length heatmaps and the effective length.

Grid: cases x tasks x history lengths x budgets x policies. Case i of a cell has the seed
`tasks.case_seed(seed, i)` (its content is shared across lengths, budgets and policies: paired
cells), the depth `depths[i % len(depths)]` and, with `straddle: "alternate"`, a needle across a
block boundary when i is odd. Items run case by case (all cells of case 0, then case 1, ...), so a
sweep stopped early has about the same number of cases in every cell.

A task entry is a task or RULER variant name, or a dict `{"task": name, "label": row name, and the
task's options}`; a `text` option is a file path (relative to the config), read with
`tasks.read_haystack`. `chat` (default true; a bool, or a dict label -> bool): ask through the
base's chat template (question in the user turn, answer prefix opening the assistant's), else the
plain RULER prompt [history || question || answer prefix]. `full` does not depend on W: its answer
to a case is computed once per sweep run and recorded under every W.
"""

from __future__ import annotations

import functools
import math
import time

import numpy as np

from mc_jax.base.chat import chat_style
from mc_jax.errors import ConfigError
from mc_jax.eval.evaluators.registry import (Evaluator, fmt, grid_item, is_ok, md_table,
                                             policy_order, pyplot, register_evaluator)
from mc_jax.eval.tasks import api as tasks
from mc_jax.eval.tasks.assembly import read_haystack
from mc_jax.stats import wilson_interval

RECALL_KS = (1, 4, 8)
W_FREE = ("full",)  # policies whose answer does not depend on the budget


def task_entries(ecfg: dict) -> list[dict]:
    """The config's tasks as dicts {task, label, **options}; ConfigError for an unknown one."""
    out = []
    for t in ecfg.get("tasks", ()):
        e = {"task": t} if isinstance(t, str) else dict(t)
        if "task" not in e:
            raise ConfigError(f"ruler task entry {t!r} names no task (give {{'task': name, ...}})")
        try:
            tasks.resolve(e["task"])
        except Exception as err:
            raise ConfigError(f"ruler: {err}") from err
        e.setdefault("label", e["task"] if set(e) <= {"task"} else
                     e["task"] + "".join(f"/{e[k]}" for k in ("haystack", "value_kind") if k in e))
        out.append(e)
    labels = [e["label"] for e in out]
    if len(set(labels)) != len(labels):
        raise ConfigError(f"ruler: task labels must be distinct, got {labels}")
    if not out:
        raise ConfigError("ruler: the evaluator lists no tasks")
    return out


def chat_for(ecfg: dict, label: str) -> bool:
    c = ecfg.get("chat", True)
    return bool(c.get(label, True) if isinstance(c, dict) else c)


def case_layout(ecfg: dict, i: int) -> tuple[float, bool]:
    """(depth, straddle) of case i."""
    depths = list(ecfg.get("depths", [0.5]))
    s = ecfg.get("straddle", False)
    straddle = (i % 2 == 1) if s == "alternate" else bool(s)
    return float(depths[i % len(depths)]), straddle


@functools.lru_cache(maxsize=8)
def _text(path: str, max_chars, offset: int) -> str:
    return read_haystack(path, max_chars, offset)


def recall_at(scores, gold, k: int) -> float:
    """Fraction of the gold blocks among the k best-scored blocks; ties are broken against the
    gold blocks (a gold block tied with a non-gold one ranks below it), so a constant scorer gets
    no credit."""
    s = np.asarray(scores, np.float64)
    gold = sorted({int(g) for g in gold if 0 <= g < len(s)})
    if not gold:
        return float("nan")
    gmask = np.zeros(len(s), bool)
    gmask[gold] = True
    order = np.lexsort((gmask, -s))  # by score, best first; on ties non-gold first
    return float(np.sum(gmask[order[:k]]) / gmask.sum())


@register_evaluator("ruler")
class RulerEvaluator(Evaluator):
    """RULER-lite accuracy (RULER's scoring, x100 per case) per task x history x W x policy, with
    95% Wilson intervals; block recall@k (k in 1, 4, 8) of the policies that score blocks against
    the question (`last_focus["block_scores"]`: bm25, lens); `gold_raw`, the fraction of gold
    blocks the base read as raw tokens; depth x length heatmaps; effective length."""

    title = "RULER-lite retrieval (greedy answers, RULER's string-match scores)"

    def __init__(self):
        self._cases: dict = {}
        self._w_free: dict = {}

    def items(self, ecfg, ctx):
        ents = task_entries(ecfg)
        out = []
        for i in range(int(ecfg.get("cases", 1))):
            d, st = case_layout(ecfg, i)
            for e in ents:
                uses_depth = tasks.TASKS[tasks.resolve(e["task"])[0]].uses_depth
                for n in ecfg["lengths"]:
                    for W in ecfg["budgets"]:
                        for p in ecfg["policies"]:
                            out.append(grid_item(ecfg, ctx, dict(
                                policy=p, W=int(W), task=e["label"], length=int(n),
                                depth=d if uses_depth else None, straddle=st, case=i,
                                seed=int(ecfg.get("seed", 0)), chat=chat_for(ecfg, e["label"]))))
        return out

    def case(self, ecfg, ctx, item):
        key = (id(ctx), item["task"], item["length"], item["depth"], item["straddle"],
               item["case"], item["seed"])
        if key not in self._cases:
            e = next(t for t in task_entries(ecfg) if t["label"] == item["task"])
            opts = {k: v for k, v in e.items() if k not in ("task", "label", "text_chars",
                                                             "text_offset")}
            if "text" in opts:
                opts["text"] = _text(str(ctx.resolve(opts["text"])), e.get("text_chars"),
                                     int(e.get("text_offset", 0)))
            if item["straddle"]:
                opts["straddle"] = True
            if len(self._cases) > 64:
                self._cases.clear()
            self._cases[key] = tasks.generate(
                e["task"], ctx.model.tokenizer, item["length"], item["depth"],
                tasks.case_seed(item["seed"], item["case"]), check_text=False, **opts)
        return self._cases[key]

    def run(self, ecfg, ctx, item):
        case = self.case(ecfg, ctx, item)
        chat = bool(item["chat"]) and chat_style(ctx.model.tokenizer) is not None
        memo = (id(ctx), item["policy"], item["task"], item["length"], item["depth"],
                item["straddle"], item["case"], item["seed"], chat)
        if item["policy"] in W_FREE and memo in self._w_free:
            return dict(self._w_free[memo], reused=True)
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        q, pre = (case.question.strip(), case.answer_prefix.strip()) if chat else \
            (case.question, case.answer_prefix)
        t0 = time.perf_counter()
        ans = policy.answer(case.history_ids, q, int(ecfg.get("max_new_tokens", 16)), chat=chat,
                            answer_prefix=pre, gold_blocks=list(case.gold_blocks))
        secs = time.perf_counter() - t0
        score = float(case.score(ans))
        focus = getattr(policy, "last_focus", None) or {}
        row = dict(answer=ans, references=case.references, score=score, correct=score == 100.0,
                   chat=chat, history_tokens=int(case.n_tokens), needle_token=case.needle_token,
                   gold_blocks=list(case.gold_blocks),
                   distractor_blocks=list(case.distractor_blocks), seconds=secs)
        raw = focus.get("raw_blocks")
        if raw is not None:
            raw = set(int(b) for b in raw)
            row["gold_raw"] = (float(np.mean([b in raw for b in case.gold_blocks]))
                               if case.gold_blocks else None)
            row["distractor_raw"] = (float(np.mean([b in raw for b in case.distractor_blocks]))
                                     if case.distractor_blocks else None)
            row["raw_blocks"] = len(raw)
        sc = focus.get("block_scores")
        if sc is not None and len(case.gold_blocks):
            for k in RECALL_KS:
                row[f"recall@{k}"] = recall_at(sc, case.gold_blocks, k)
        if item["policy"] in W_FREE:
            self._w_free[memo] = row
        return row

    # ---------------------------------------------------------------------------- reports ----

    @staticmethod
    def cells(rows, by=("task", "W", "length", "policy")):
        out: dict = {}
        for r in rows:
            c = out.setdefault(tuple(r[k] for k in by), dict(scores=[], status=r["status"],
                                                             rows=[]))
            if is_ok(r):
                c["status"] = "ok"
                c["scores"].append(r["score"] / 100.0)
                c["rows"].append(r)
        return out

    @staticmethod
    def accuracy(c) -> tuple[float, float, float, int]:
        n = len(c["scores"])
        if not n:
            return float("nan"), float("nan"), float("nan"), 0
        acc = float(np.mean(c["scores"]))
        lo, hi = wilson_interval(acc * n, n)
        return acc, lo, hi, n

    def table(self, rows):
        cells = self.cells(rows)
        order = lambda kv: (kv[0][0], kv[0][1], kv[0][2], policy_order(kv[0][3]))  # noqa: E731
        body = []
        for (t, W, n, p), c in sorted(cells.items(), key=order):
            if c["status"] != "ok":
                body.append([t, W, n, p, c["status"][:60], None, None, None, None, None])
                continue
            acc, lo, hi, k = self.accuracy(c)
            mean = lambda f: _mean([r.get(f) for r in c["rows"]])  # noqa: E731
            body.append([t, W, n, p, k, f"{100 * acc:.0f}", f"[{100 * lo:.0f}, {100 * hi:.0f}]",
                         fmt(mean("gold_raw"), 2), fmt(mean("recall@1"), 2),
                         fmt(mean("recall@4"), 2)])
        lines = [md_table(["task", "W", "history", "policy", "n", "accuracy %", "95% CI",
                           "gold raw", "recall@1", "recall@4"], body), ""]
        lines += ["Accuracy: RULER's score per case (string_match_all / _part, 0-100) averaged; "
                  "95% Wilson interval over the cases (exact for 0/1 scores, approximate for "
                  "partial credit). gold raw: fraction of the gold blocks the base read as raw "
                  "tokens. recall@k: fraction of the gold blocks among the k best-scored blocks "
                  "(ties broken against gold), for the policies that score blocks.", ""]
        lines += ["### Effective length", "", self.effective_table(rows)]
        return "\n".join(lines)

    def effective_table(self, rows, ref_length: int = 4096):
        """The longest history at which a policy stays at or above full context's accuracy at
        `ref_length` (or the longest history full context answers, if shorter), at every
        shorter history too."""
        cells = {k: c for k, c in self.cells(rows).items() if c["status"] == "ok"}
        body = []
        for t in sorted({k[0] for k in cells}):
            full = {n: self.accuracy(c)[0] for (tt, _, n, p), c in cells.items()
                    if tt == t and p == "full"}
            ref_n = max([n for n in full if n <= ref_length], default=None)
            for W in sorted({k[1] for k in cells if k[0] == t}):
                for p in sorted({k[3] for k in cells if k[:2] == (t, W)}, key=policy_order):
                    ns = sorted(n for (tt, w, n, pp) in cells if (tt, w, pp) == (t, W, p))
                    if ref_n is None:
                        body.append([t, W, p, "—", "—"])
                        continue
                    thr = full[ref_n]
                    eff = None
                    for n in ns:
                        if self.accuracy(cells[(t, W, n, p)])[0] + 1e-9 < thr:
                            break
                        eff = n
                    body.append([t, W, p, f"{100 * thr:.0f}% (full at {ref_n})",
                                 "< " + str(ns[0]) if eff is None else
                                 (f">= {eff}" if eff == ns[-1] else str(eff))])
        return md_table(["task", "W", "policy", "threshold", "effective length"], body)

    def plot(self, rows, out_dir):
        cells = {k: c for k, c in self.cells(rows, ("task", "W", "policy", "depth", "length"))
                 .items() if c["status"] == "ok" and k[3] is not None}
        if not cells:
            return []
        plt = pyplot()
        paths = []
        for t, W in sorted({k[:2] for k in cells}):
            pols = sorted({k[2] for k in cells if k[:2] == (t, W)}, key=policy_order)
            depths = sorted({k[3] for k in cells if k[:2] == (t, W)})
            lengths = sorted({k[4] for k in cells if k[:2] == (t, W)})
            fig, axes = plt.subplots(1, len(pols), figsize=(2.2 * len(pols) + 1, 3.2),
                                     squeeze=False, constrained_layout=True)
            for ax, p in zip(axes[0], pols):
                grid = np.full((len(depths), len(lengths)), np.nan)
                for i, d in enumerate(depths):
                    for j, n in enumerate(lengths):
                        c = cells.get((t, W, p, d, n))
                        if c:
                            grid[i, j] = self.accuracy(c)[0]
                im = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto",
                               origin="upper")
                ax.set_xticks(range(len(lengths)), [f"{n // 1024}k" for n in lengths],
                              fontsize=7)
                ax.set_yticks(range(len(depths)), [f"{d:.1f}" for d in depths], fontsize=7)
                ax.set_title(p, fontsize=9)
                ax.set_xlabel("history", fontsize=8)
            axes[0][0].set_ylabel("needle depth", fontsize=8)
            fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8)
            fig.suptitle(f"{t}, W={W}: accuracy by depth x history", fontsize=9)
            safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in str(t))
            path = out_dir / f"ruler_{safe}_W{W}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            paths.append(path)
        return paths


def _mean(xs):
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return float(np.mean(xs)) if xs else None
