"""Evaluation sweeps: policies on a tiny random base, passkey construction, the resumable driver."""

import json

import jax
import numpy as np
import pytest

from mc_jax.base import base_model as bm
from mc_jax.base import tiny
from mc_jax.errors import ConfigError
from mc_jax.eval import sweep as ev
from mc_jax.eval.evaluators.passkey import NEEDLE, passkey_case
from mc_jax.eval.evaluators.ppl import scored_blocks
from mc_jax.eval.policies import registry as pol
from mc_jax.base import sampling

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=1024)


@pytest.fixture(scope="module")
def model():
    return tiny.TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), tiny.ByteTokenizer())


def _ids(n, seed=0):
    return np.random.RandomState(seed).randint(0, 256, n).astype(np.int32)


def test_window_policies_score_exactly_their_context(model):
    ids = _ids(320)
    full = pol.make_policy("full", model, 512).nll_stream(ids)
    assert full.shape == (320 // 32 - 1, 32)
    # a budget that holds the whole history: truncate and sinks == full context
    np.testing.assert_allclose(pol.make_policy("truncate", model, 512).nll_stream(ids), full,
                               atol=1e-4)
    np.testing.assert_allclose(pol.make_policy("sinks", model, 512).nll_stream(ids), full,
                               atol=1e-4)
    # W=64 at block 5: truncate == plain forward on tokens [96, 192); sinks == [0:4] + [132:192]
    tr = pol.make_policy("truncate", model, 64).nll_stream(ids, [5])[0]
    sk = pol.make_policy("sinks", model, 64).nll_stream(ids, [5])[0]
    for ctx, got in ((ids[96:160], tr), (np.concatenate([ids[:4], ids[100:160]]), sk)):
        seq = np.concatenate([ctx, ids[160:192]])[None]
        ref = bm.token_nll(bm.logits_fn(model.params, CFG, seq)[:, 63:95], seq[:, 64:96])
        np.testing.assert_allclose(got, np.asarray(ref)[0], atol=1e-4)
    with pytest.raises(ValueError, match="cannot be scored"):
        pol.make_policy("truncate", model, 64).nll_stream(ids, [0])


def test_full_policy_is_not_applicable_beyond_the_context(model):
    with pytest.raises(pol.NotApplicable, match="exceeds"):
        pol.make_policy("full", model, 64).nll_stream(_ids(1088))
    with pytest.raises(pol.NotApplicable):
        pol.make_policy("full", model, 64, max_len=256).answer(_ids(256), [1, 2], 4)


def test_full_answer_matches_plain_greedy_generation(model):
    hist, q = _ids(200, 1), [10, 20, 30]
    got = pol.make_policy("full", model, 64).answer(hist, q, 6)
    ref = list(sampling.generate(model.params, CFG, list(hist) + q, max_new_tokens=6))
    assert got == model.tokenizer.decode(ref)


def test_megacontext_policies_are_unavailable_without_trained_networks(model, tmp_path):
    for name in ("lens", "recency", "oracle"):
        with pytest.raises(pol.Unavailable, match="not found"):
            pol.make_policy(name, model, 256, checkpoint=str(tmp_path / "missing"))
    assert pol.make_policy("meanpool", model, 256).name == "meanpool"  # needs no training


@pytest.mark.parametrize("placement", ["aligned", "straddle"])
def test_passkey_needle_is_placed_by_token_index(placement):
    tok = tiny.ByteTokenizer()
    prose = np.asarray(tok.encode("In the beginning God created the heaven. " * 200), np.int32)
    for filler in ("repeat", "prose"):
        c = passkey_case(tok, 64, 16, filler, 0.5, placement, 0, prose)
        assert len(c["history"]) == 16 * 64
        needle = tok.encode(NEEDLE.format(key=c["key"]))
        s = c["needle_start"]
        assert list(c["history"][s:s + len(needle)]) == needle
        assert tok.decode(c["history"][c["key_start"]:c["key_start"] + 5]) == str(c["key"])
        if placement == "aligned":
            assert s % 32 == 0
        else:  # two key digits end one block, three begin the next
            assert c["key_start"] % 32 == 30
        again = passkey_case(tok, 64, 16, filler, 0.5, placement, 0, prose)
        assert again["key"] == c["key"] and np.array_equal(again["history"], c["history"])


def test_scored_blocks_spread_over_the_history_beyond_W():
    assert scored_blocks(512, 64, None) == list(range(2, 16))
    b = scored_blocks(8192, 512, 8)
    assert len(b) == 8 and b[0] == 16 and b[-1] == 255


def test_smoke_sweep_writes_rows_table_plots_and_resumes(tmp_path):
    spec = "experiments/configs/cpu_smoke.py"
    cfg, _, _ = ev.load_config(spec)
    first = ev.run_sweep(spec, tmp_path, progress=False)
    rows = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert first["computed"] == len(rows) == first["rows"] > 0
    by_ev = {}
    for r in rows:
        by_ev.setdefault(r["key"]["evaluator"], []).append(r)
    assert set(by_ev) == {e["name"] for e in cfg["evaluators"]}
    ppl = {(r["key"]["doc"], r["key"]["policy"]): r for r in by_ev["ppl"]}
    assert ppl[("genesis", "truncate")]["status"] == "ok"
    assert np.isfinite(ppl[("genesis", "truncate")]["ppl"])
    assert ppl[("python", "full")]["status"].startswith("not applicable")
    for r in rows:
        assert r["status"] == "ok" or r["status"].startswith(("not applicable", "unavailable"))
        if r["key"].get("policy") in pol.MC_POLICIES or r["key"]["evaluator"] in (
                "gist_dnll", "lens_rank"):
            assert r["status"] == "ok" or r["status"].startswith("unavailable")
    assert all(isinstance(r["correct"], bool) for r in by_ev["passkey"] if r["status"] == "ok")
    table = (tmp_path / "results.md").read_text()
    assert "## ppl:" in table and "## passkey:" in table and "gap closed" in table
    assert (tmp_path / "ppl.png").stat().st_size > 0 and first["plots"]

    second = ev.run_sweep(spec, tmp_path, progress=False, plots=False)
    assert second["computed"] == 0 and second["skipped"] == len(rows)
    assert len((tmp_path / "results.jsonl").read_text().splitlines()) == len(rows)


def test_unavailable_rows_are_retried_once_the_runtime_exists(tmp_path, monkeypatch):
    conf = tmp_path / "mini.py"
    conf.write_text(
        "def get_config(variant=None):\n"
        "    doc = dict(name='g', path='%s', tokens=256)\n"
        "    return dict(name='mini', base='tiny', base_kw=dict(max_seq_len=512), evaluators=[\n"
        "        dict(name='ppl', policies=['truncate', 'recency'], budgets=[64], docs=[doc],\n"
        "             blocks_per_doc=2)])\n" % (ev.Path("experiments/data/kjv_genesis.txt")
                                              .resolve()))
    out = tmp_path / "out"
    real_make_policy = pol.make_policy

    def no_runtime(name, base_model, budget, checkpoint=None, **kw):  # MC policies cannot run
        if name in pol.MC_POLICIES:
            raise pol.Unavailable(f"no runtime for {name}")
        return real_make_policy(name, base_model, budget, checkpoint=checkpoint, **kw)

    monkeypatch.setattr(pol, "make_policy", no_runtime)
    r1 = ev.run_sweep(str(conf), out, progress=False, plots=False)
    assert r1["computed"] == 2
    assert ev.run_sweep(str(conf), out, progress=False, plots=False)["computed"] == 0

    calls = []

    class Counting:  # a runtime policy with counters, as the MegaContext policies have
        def __init__(self, inner):
            self.inner, self.n = inner, {"blocks": 5, "actions": 1}  # counts from earlier docs

        def nll_stream(self, ids, blocks=None):
            self.n["blocks"] += len(blocks)
            return self.inner.nll_stream(ids, blocks)

        def stats(self):
            return dict(self.n)

    def make_policy(name, base_model, budget, checkpoint=None, **kw):  # the runtime is back
        if name not in pol.MC_POLICIES:
            return real_make_policy(name, base_model, budget, checkpoint=checkpoint, **kw)
        calls.append((name, budget, checkpoint))
        return Counting(real_make_policy("truncate", base_model, budget))

    monkeypatch.setattr(pol, "make_policy", make_policy)
    r3 = ev.run_sweep(str(conf), out, progress=False, plots=False)
    assert r3["computed"] == 1 and calls == [("recency", 64, None)]
    rows = ev.read_rows(out / "results.jsonl")
    got = {r["key"]["policy"]: r for r in rows.values()}
    assert got["recency"]["status"] == "ok"
    assert got["recency"]["nll"] == pytest.approx(got["truncate"]["nll"], abs=1e-5)
    assert got["recency"]["policy_stats"] == {"blocks": 2, "actions": 0}  # this document's share


def test_network_evaluators_need_the_real_base_and_know_one_source(tmp_path):
    conf = tmp_path / "nets.py"
    conf.write_text(
        "def get_config(variant=None):\n"
        "    return dict(name='nets', base='tiny', evaluators=[\n"
        "        dict(name='gist_dnll', levels=[1]), dict(name='lens_rank')])\n")
    res = ev.run_sweep(str(conf), tmp_path / "out", progress=False, plots=False)
    rows = list(ev.read_rows(tmp_path / "out" / "results.jsonl").values())
    assert res["computed"] == len(rows) == 3  # gistnet, meanpool at level 1; one lens_rank row
    assert all(r["status"].startswith("unavailable: eval_networks needs the real base")
               for r in rows)
    table = (tmp_path / "out" / "results.md").read_text()
    assert "## gist_dnll:" in table and "## lens_rank:" in table
    conf.write_text(conf.read_text().replace("levels=[1]", "levels=[1], source='runtime'"))
    with pytest.raises(ConfigError, match="source 'runtime' does not exist"):
        ev.run_sweep(str(conf), tmp_path / "out2", progress=False, plots=False)
