"""`passkey`: retrieval of a 5-digit key hidden in long filler (the histories are built by token
index, so the needle's place relative to block boundaries is exact), scored by exact match of the
greedy answer."""

from __future__ import annotations

import hashlib
import re
import time

import numpy as np

from mc_jax.base.chat import chat_style
from mc_jax.errors import InputError
from mc_jax.eval.evaluators.registry import (Evaluator, grid_item, is_ok, md_table, policy_order,
                                             pyplot, register_evaluator, short_status)
from mc_jax.eval.policies.registry import K
from mc_jax.eval.tasks.planted import INTRO, NEEDLE, QUESTION, REPEAT_FILLER



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
    placements (`aligned` to a block start, `straddle` across a block boundary) x seeds.

    Config `chat` (default false): the plain prompt [history || "\nWhat is the pass key? The
    pass key is"], token for token as in the earlier results. `chat: true` asks through the
    base's chat template when it has one (the question in the user turn after the history, "The
    pass key is" opening the assistant turn). Measured on SmolLM2 (cpu_small:quick,
    experiments/results/cpu_small_quick_s8): with chat the base explains what a pass key is
    ("a magical item that can be used to ...") instead of reading it: 1 of 66 answers correct,
    against 11 of 66 with the plain prompt (experiments/results/cpu_small_quick, an earlier
    LensNet for `lens`). So the plain prompt stays the default for this task; RULER's tasks,
    whose question names "the provided text", are where chat belongs."""

    title = "Passkey retrieval (exact match of the greedy answer)"

    def items(self, ecfg, ctx):
        # the prompt style is part of a row's key (plain rows have no "chat" key, as before), so
        # a chat row is never reused as a plain one or the other way round
        style = {"chat": True} if bool(ecfg.get("chat", False)) else {}
        out = []
        for W in ecfg["budgets"]:
            for m in ecfg["history_mults"]:
                for f in ecfg.get("fillers", ["repeat"]):
                    for d in ecfg["depths"]:
                        for pl in ecfg.get("placements", ["aligned", "straddle"]):
                            for s in ecfg.get("seeds", [0]):
                                for p in ecfg["policies"]:
                                    out.append(grid_item(ecfg, ctx, dict(
                                        policy=p, W=int(W), mult=int(m), filler=f,
                                        depth=float(d), placement=pl, seed=int(s),
                                        **style)))
        return out

    def run(self, ecfg, ctx, item):
        policy = ctx.policy(item["policy"], item["W"], ecfg.get("policy_kw"))
        prose = ctx.text_ids(ecfg["prose"]) if item["filler"] == "prose" else None
        case = passkey_case(ctx.model.tokenizer, item["W"], item["mult"], item["filler"],
                            item["depth"], item["placement"], item["seed"], prose)
        t0 = time.perf_counter()
        chat = bool(item.get("chat", False))
        if chat and chat_style(ctx.model.tokenizer) is not None:
            # RULER-style: the question in the user turn, the answer prefix in the assistant's
            cut = QUESTION.index("?") + 1
            ans = policy.answer(case["history"], QUESTION[:cut].strip(),
                                int(ecfg.get("max_new_tokens", 8)), chat=True,
                                answer_prefix=QUESTION[cut:].strip())
        else:  # the plain prompt of the earlier results: [history || "\nWhat is ... key is"]
            chat = False
            ans = policy.answer(case["history"], case["question"],
                                int(ecfg.get("max_new_tokens", 8)), chat=False)
        m = re.search(r"\d+", ans)
        correct = bool(m and m.group() == str(case["key"]))
        return dict(passkey=case["key"], answer=ans, correct=correct, chat=chat,
                    history_tokens=len(case["history"]), needle_start=case["needle_start"],
                    key_start=case["key_start"], seconds=time.perf_counter() - t0)

    @staticmethod
    def _cells(rows):
        cells = {}
        for r in rows:
            c = cells.setdefault((r["W"], r["mult"], r["filler"], r["policy"]),
                                 dict(n=0, ok=0, al=[0, 0], st=[0, 0], status=r["status"]))
            if not is_ok(r):
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
                                                      policy_order(kv[0][3]))):
            if c["status"] != "ok":
                body.append([W, f"{m}x ({m * W})", f, p, short_status(c["status"]), None, None,
                             None])
                continue
            acc = lambda t: f"{t[0]}/{t[1]}" if t[1] else "—"  # noqa: E731
            body.append([W, f"{m}x ({m * W})", f, p, "ok", c["ok"] / c["n"], acc(c["al"]),
                         acc(c["st"])])
        return md_table(["W", "history", "filler", "policy", "status", "accuracy", "aligned",
                    "straddle"], body)

    def plot(self, rows, out_dir):
        cells = {k: c for k, c in self._cells(rows).items() if c["status"] == "ok"}
        if not cells:
            return []
        plt = pyplot()
        keys = sorted({(W, f) for W, _, f, _ in cells})
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
        for ax, (W, f) in zip(axes[0], keys):
            for p in sorted({p for (w, _, ff, p) in cells if (w, ff) == (W, f)}, key=policy_order):
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
