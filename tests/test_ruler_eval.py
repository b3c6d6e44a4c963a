"""The `ruler` evaluator (issue 16, items 3-5): its smoke sweep on the tiny base, recall@k,
Wilson intervals, the effective length, and the case grid."""
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import binomtest

from mc_jax.eval import sweep
from mc_jax.eval.evaluators import EVALUATORS
from mc_jax.eval.evaluators.ruler import case_layout, recall_at
from mc_jax.stats import wilson_interval

SMOKE = "experiments/configs/cpu_ruler.py:smoke"


@given(st.integers(0, 60), st.integers(1, 60))
@settings(max_examples=60, deadline=None)
def test_wilson_matches_scipy(k, n):
    k = min(k, n)
    ci = binomtest(k, n).proportion_ci(0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_recall_breaks_ties_against_gold():
    s = np.array([0.0, 3.0, 1.0, 1.0, 0.0])
    assert recall_at(s, [1], 1) == 1.0
    assert recall_at(s, [2], 2) == 0.0  # tied with block 3, which ranks above it
    assert recall_at(s, [2], 3) == 1.0
    assert recall_at(s, [2, 3], 3) == 1.0  # both gold: the tie is among gold blocks
    assert recall_at(np.zeros(10), [4], 9) == 0.0  # a constant scorer gets no credit
    assert recall_at(np.zeros(10), [4], 10) == 1.0
    assert recall_at(s, [1, 2], 2) == 0.5


@given(st.lists(st.floats(-5, 5), min_size=1, max_size=40), st.data())
@settings(max_examples=80, deadline=None)
def test_recall_against_a_reference(scores, data):
    s = np.asarray(scores)
    gold = sorted(data.draw(st.sets(st.integers(0, len(s) - 1), min_size=1)))
    k = data.draw(st.integers(1, len(s)))
    # reference: sort by score, non-gold before gold on ties; count gold among the first k
    order = sorted(range(len(s)), key=lambda b: (-s[b], b in gold))
    assert recall_at(s, gold, k) == pytest.approx(sum(b in gold for b in order[:k]) / len(gold))


def test_case_layout_covers_every_depth_and_placement():
    ecfg = dict(depths=[0.1, 0.3, 0.5, 0.7, 0.9], straddle="alternate")
    pairs = [case_layout(ecfg, i) for i in range(20)]
    assert sorted(set(pairs)) == sorted({(d, s) for d in ecfg["depths"] for s in (False, True)})
    assert all(pairs.count(p) == 2 for p in set(pairs))


def _rows(task, W, length, policy, scores):
    return [dict(evaluator="ruler", task=task, W=W, length=length, policy=policy, status="ok",
                 score=100.0 * s, depth=0.5) for s in scores]


def test_effective_length():
    ev = EVALUATORS["ruler"]
    rows = (_rows("t", 512, 2048, "full", [1, 1, 1, 0]) + _rows("t", 512, 4096, "full", [1, 0])
            + _rows("t", 512, 2048, "a", [1, 1]) + _rows("t", 512, 4096, "a", [1, 0])
            + _rows("t", 512, 8192, "a", [0, 0]) + _rows("t", 512, 2048, "b", [0, 0])
            + _rows("t", 512, 4096, "b", [1, 1]) + _rows("t", 512, 2048, "c", [1])
            + _rows("t", 512, 4096, "c", [1]) + _rows("t", 512, 8192, "c", [1]))
    table = ev.effective_table(rows)
    lines = {ln.split("|")[3].strip(): ln.split("|")[5].strip() for ln in table.splitlines()[2:]}
    assert lines["a"] == "4096"  # 100%, 50% >= full's 50% at 4k, then 0%
    assert lines["b"] == "< 2048"  # below the threshold at the shortest history already
    assert lines["c"] == ">= 8192"
    assert "50% (full at 4096)" in table


def test_smoke_sweep_on_the_tiny_base(tmp_path):
    out = tmp_path / "ruler"
    res = sweep.run_sweep(SMOKE, out, progress=False)
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    by = {}
    for r in rows:
        by.setdefault(r["key"]["policy"], []).append(r)
    cfg, _, _ = sweep.load_config(SMOKE)
    ecfg = cfg["evaluators"][0]
    n_cells = len(ecfg["tasks"]) * len(ecfg["lengths"]) * ecfg["cases"]
    assert set(by) == set(ecfg["policies"])
    assert all(len(v) == n_cells for v in by.values())
    assert all(r["status"].startswith("unavailable") for r in by["recency"])  # no tiny networks
    for p in ("full", "truncate", "sinks", "bm25", "needle_oracle"):
        assert all(r["status"] == "ok" for r in by[p]), [r["status"] for r in by[p]]
        for r in by[p]:
            assert 0.0 <= r["score"] <= 100.0 and isinstance(r["answer"], str)
            assert r["gold_blocks"] and r["history_tokens"] <= r["key"]["length"]
    # the needle oracle reads every gold block raw; full context reads everything
    assert all(r["gold_raw"] == 1.0 for r in by["needle_oracle"] + by["full"])
    assert all("recall@4" in r for r in by["bm25"])
    assert not any("recall@4" in r for r in by["truncate"] + by["needle_oracle"])
    # truncation sees the last W tokens only: a gold block far back is not raw
    assert any(r["gold_raw"] < 1.0 for r in by["truncate"])
    md = (out / "results.md").read_text()
    assert "## ruler" in md and "Effective length" in md and "needle_oracle" in md
    assert len(res["plots"]) == len(ecfg["tasks"]) and all(p.exists() for p in res["plots"])
    again = sweep.run_sweep(SMOKE, out, progress=False, plots=False)
    assert again["computed"] == 0  # resumed: every ok row is kept (unavailable ones retried)
