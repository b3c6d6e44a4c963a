"""The training-free retrieval references `bm25` and `needle_oracle` and the hooks they use:
`focus.keep_blocks_raw` against a plain-Python reference, `answer_question(refocus=...)`,
`last_focus` of every policy, and `generate --question --policy bm25|needle_oracle`."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from core_reference import COLLAPSE, EXPAND, Illegal, JitCore, RefWC, assert_wc_equal
from mc_jax.base import base_model as bm
from mc_jax.base import chat as chat_mod
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.core import focus
from mc_jax.core import lens_features as lf
from mc_jax.core import working_context as wcm
from mc_jax.errors import InputError
from mc_jax.eval.policies import megacontext as mcp
from mc_jax.eval.policies import registry as pol
from mc_jax.eval.policies.protocol import FOCUS_KEYS
from mc_jax.nets.io import load_nets
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from mc_jax.runtime import answer as answer_mod
from mc_jax.runtime.session import Session

K = 32
CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=1024)
W = 192
CHATML = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


# ------------------------------------------------------------------------------------------------
# keep_blocks_raw vs a plain-Python reference

WCFGS = {
    "d2": wcm.WCConfig(w_max=160, depth=2, protected_blocks=1, max_tokens=200 * K),
    "d2_p2": wcm.WCConfig(w_max=290, depth=2, protected_blocks=2, max_tokens=300 * K),
    "d3": wcm.WCConfig(w_max=200, depth=3, protected_blocks=1, max_tokens=2200 * K),
}


@functools.lru_cache(maxsize=None)
def core(name):
    return JitCore(WCFGS[name], focus.FocusConfig(), with_tree=False)


def covering(ref: RefWC, b):
    for i, (level, node, _) in enumerate(ref.entries):
        g = 1 if level == 0 else ref.K ** (level - 1)
        if node * g <= b < node * g + g:
            return i
    raise AssertionError(b)


def room(ref: RefWC, target, kept):
    """The collapse that makes room: the oldest raw block neither kept nor the target, else the
    oldest complete LOD1 sibling group holding neither."""
    K, last = ref.K, len(ref.entries) - 1
    for i in range(last):
        level, node, _ = ref.entries[i]
        if level == 0 and node < ref.protected_start() and node not in kept and node != target:
            return i
    for i in range(last):
        level, node, _ = ref.entries[i]
        span = set(range(node, node + K))
        if level == 1 and ref.group_head(i) and target not in span and not span & set(kept):
            return i
    return None


def ref_keep(ref: RefWC, blocks, incoming=0):
    kept = []
    for b in blocks:
        if not 0 <= b < ref.protected_start() or b in kept:
            continue
        while ref.entries[covering(ref, b)][0] > 0:
            if ref.cost() + ref.K - 1 + incoming > ref.w_max:
                i = room(ref, b, kept)
                if i is None:
                    return kept, b
                ref.move(COLLAPSE, i)
            else:
                ref.move(EXPAND, covering(ref, b))
        kept.append(b)
    return kept, None


@settings(max_examples=80, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(name=st.sampled_from(sorted(WCFGS)), frac=st.floats(0, 1),
       moves=st.lists(st.tuples(st.sampled_from([EXPAND, COLLAPSE]), st.floats(0, 1)),
                      max_size=8),
       ranks=st.lists(st.one_of(st.floats(0, 1.05), st.just(-0.01)), max_size=12),
       incoming=st.sampled_from([0, 0, 1, K]))
def test_keep_blocks_raw_matches_the_reference(name, frac, moves, ranks, incoming):
    c = core(name)
    wcfg = c.wcfg
    T0 = int(frac * wcfg.max_tokens) if frac > 0.2 else int(frac * 200 * K)
    ref = c.ref().build_recency(T0)
    wc = c.build(T0)
    for kind, f in moves:  # a random WC: recency, then some legal moves
        e = int(f * (len(ref.entries) - 1))
        try:
            ref.move(kind, e)
        except Illegal:
            continue
        wc = wcm.apply_move(wc, kind, e, wcfg)
    assert_wc_equal(wc, ref)
    nb = T0 // K
    blocks = [int(np.floor(r * nb)) for r in ranks]
    cost0 = ref.cost()
    got_wc, kept = focus.keep_blocks_raw(wc, blocks, wcfg, incoming=incoming)
    want, stuck = ref_keep(ref, blocks, incoming)
    assert kept == want
    wcm.check_wc(got_wc, wcfg)
    assert_wc_equal(got_wc, ref)  # the reference's WC; contiguous cover, budget, protection
    raw = {n for lv, n, _, _ in wcm.to_host_entries(got_wc) if lv == 0}
    assert set(kept) <= raw
    # room is left for the incoming tokens (unless the WC had none to begin with)
    assert ref.cost() + incoming <= max(wcfg.w_max, cost0 + incoming)
    pstart = nb - wcfg.protected_blocks
    eligible = list(dict.fromkeys(b for b in blocks if 0 <= b < pstart))
    assert kept == eligible[:len(kept)]  # rank order, and nothing that fits is skipped
    if stuck is not None:  # it stopped only because no legal collapse could make room
        assert kept == eligible[:eligible.index(stuck)]
        ents = wcm.to_host_entries(got_wc)
        assert sum(e[2] for e in ents) + K - 1 + incoming > wcfg.w_max
        lod0 = [n for lv, n, _, _ in ents[:-1] if lv == 0 and n < pstart]
        assert set(lod0) <= set(kept)
        mirror = RefWC(wcfg.w_max, wcfg.depth, K, wcfg.protected_blocks)
        mirror.num_tokens, mirror.entries = T0, [[lv, n, a] for lv, n, _, a in ents]
        heads = [mirror.entries[i][1] for i in range(len(ents)) if mirror.entries[i][0] == 1
                 and mirror.group_head(i)]
        assert all(h <= stuck < h + K for h in heads)


def test_keep_blocks_raw_descends_and_collapses_for_room():
    wcfg = WCFGS["d2_p2"]  # w_max 290, blocks 98 and 99 protected
    wc = wcm.build_recency(100 * K + 5, wcfg)
    pairs = lambda w: [e[:2] for e in wcm.to_host_entries(w)]  # noqa: E731
    # recency: LOD2 over blocks 0..31 and 32..63, LOD1 64..92, raw 93..99, the open block
    assert pairs(wc) == ([(2, 0), (2, 1)] + [(1, n) for n in range(64, 93)]
                         + [(0, n) for n in range(93, 101)])
    out, kept = focus.keep_blocks_raw(wc, [3, 99, 40, 3, -1, 100, 250, 20, 50, 60, 10], wcfg)
    # 99 protected (raw anyway), 100 open, -1 and 250 not history, the second 3 a repeat; 3, 40
    # and 20 take the room of raw blocks 93..97 (oldest first), 50 that of the LOD1 group
    # 64..95 (collapsed back into its LOD2 gist); then nothing is left to collapse for 60
    assert kept == [3, 40, 20, 50]
    got = pairs(out)
    assert {(0, 3), (0, 40), (0, 20), (0, 50), (2, 2), (0, 98), (0, 99)} <= set(got)
    assert not {(0, n) for n in range(93, 98)} & set(got) and (1, 60) in got
    assert int(out.total_cost()) <= wcfg.w_max
    wcm.check_wc(out, wcfg)
    ref = RefWC(wcfg.w_max, wcfg.depth, K, wcfg.protected_blocks).build_recency(100 * K + 5)
    assert ref_keep(ref, [3, 99, 40, 3, -1, 100, 250, 20, 50, 60, 10]) == (kept, 60)
    assert_wc_equal(out, ref)


# ------------------------------------------------------------------------------------------------
# the policies on the tiny base


@pytest.fixture(scope="module")
def plain():
    return TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), ByteTokenizer())


@pytest.fixture(scope="module")
def chat_model(plain):
    tok = ByteTokenizer()
    tok.chat_template = CHATML
    return dataclasses.replace(plain, tokenizer=tok)


def _haystack(n, seed=0):
    """Bytes >= 128 (no ASCII), so an ASCII question's tokens occur only where planted."""
    return np.random.default_rng(seed).integers(128, 256, n).astype(np.int32)


def test_bm25_keeps_the_block_with_the_rare_question_tokens_raw(chat_model):
    hist = _haystack(40 * K + 10)
    hist[5 * K + 3:5 * K + 7] = list(b"qxzj")  # the question's tokens, old (gisted by recency)
    hist[12 * K + 9] = ord("x")  # one of them, once, elsewhere
    p = pol.make_policy("bm25", chat_model, W, gists="meanpool")
    assert isinstance(p.answer(hist, "qxzj", 4, answer_prefix="Answer:"), str)
    f = p.last_focus
    sc = f["block_scores"]
    assert sc.shape == (40,) and sc.dtype == np.float32
    assert int(np.argmax(sc)) == 5 and sc[12] > 0 and (sc > 0).sum() == 2  # question text only
    assert f["kept"] == [5, 12]
    assert {5, 12} <= set(f["raw_blocks"])
    # recency alone reads neither raw
    r = pol.make_policy("meanpool", chat_model, W)
    r.answer(hist, "qxzj", 4, answer_prefix="Answer:")
    assert not {5, 12} & set(r.last_focus["raw_blocks"])
    with pytest.raises(pol.NotApplicable, match="question"):
        p.nll_stream(hist)


def test_needle_oracle_keeps_the_gold_blocks_raw(plain):
    hist = _haystack(30 * K)
    p = pol.make_policy("needle_oracle", plain, W, gists="meanpool")
    q = list(b"Where?")
    p.answer(hist, q, 3, gold_blocks=[7, 2])
    f = p.last_focus
    assert f["kept"] == [7, 2] and {2, 7} <= set(f["raw_blocks"])
    assert f["block_scores"] is None
    with pytest.raises(pol.NotApplicable, match="gold_blocks"):
        p.answer(hist, q, 3)
    assert p.last_focus is None
    with pytest.raises(InputError, match="not blocks"):
        p.answer(hist, q, 3, gold_blocks=[30])
    with pytest.raises(pol.NotApplicable):
        p.nll_stream(hist)
    with pytest.raises(pol.Unavailable):  # gists="trained" needs trained networks
        pol.make_policy("needle_oracle", plain, W, checkpoint="/nonexistent/networks")


def test_answer_with_refocus_restores_the_session(chat_model, monkeypatch):
    gist, _, _ = load_nets(chat_model, None, need_trained=False, meanpool=True)
    s = Session(chat_model, W, gist, None, policy="recency", capacity_tokens=2048)
    hist = _haystack(30 * K)
    s.ingest(hist)
    pr = chat_mod.build_prompt(chat_model.tokenizer, "A question long enough to fill one whole "
                               "block of the byte tokenizer", answer_prefix="A:")
    assert len(pr.tail) >= K  # its first block is ingested before refocus
    before = (list(s.ids), wcm.to_host_entries(s.state.wc), int(s.state.blocks),
              int(s.state.tree.num_tokens))
    seen = {}
    real = answer_mod.answer_after_wc
    monkeypatch.setattr(answer_mod, "answer_after_wc", lambda s, *a, **k: (
        seen.setdefault("entries", wcm.to_host_entries(s.state.wc)), real(s, *a, **k))[1])

    def refocus(sess):
        seen["tokens"] = len(sess.ids)
        wc, kept = focus.keep_blocks_raw(sess.state.wc, [1, 4], sess.cfg.wcfg)
        sess.state = sess.state.replace(wc=wc)
        seen["kept"] = kept

    plain_answer = answer_mod.answer_question(s, [], pr, 4)
    seen.clear()
    a = answer_mod.answer_question(s, [], pr, 4, refocus=refocus)
    assert isinstance(a, str) and seen["kept"] == [1, 4] and seen["tokens"] == 31 * K
    assert {(0, 1), (0, 4)} <= {e[:2] for e in seen["entries"]}  # the base read them raw
    after = (list(s.ids), wcm.to_host_entries(s.state.wc), int(s.state.blocks),
             int(s.state.tree.num_tokens))
    assert after == before  # the question and the refocus did not become history
    seen.clear()
    assert answer_mod.answer_question(s, [], pr, 4, refocus=lambda sess: None) == plain_answer


def test_every_policy_sets_last_focus(plain):
    hist = _haystack(20 * K + 7, 1)
    hist[3 * K] = ord("k")
    q = list(b"k?")
    gist, _, _ = load_nets(plain, None, need_trained=False, meanpool=True)
    lens = LensNet(LensNetConfig.tiny(d_model=CFG.d_model), rngs=nnx.Rngs(1))
    pols = {name: pol.make_policy(name, plain, W) for name in ("full", "truncate", "sinks",
                                                                "meanpool")}
    pols["recency"] = mcp.MegaContextPolicy("recency", plain, W, gist, None, "recency")
    pols["lens"] = mcp.MegaContextPolicy("lens", plain, W, gist, lens, "lens")
    for name in pol.RETRIEVAL_POLICIES:
        pols[name] = pol.make_policy(name, plain, W, gists="meanpool")
    n = len(hist) // K
    for name, p in pols.items():
        p.answer(hist, q, 2, gold_blocks=[3])
        f = p.last_focus
        assert set(FOCUS_KEYS) <= set(f), name
        raw = f["raw_blocks"]
        assert raw == sorted(set(raw)) and all(isinstance(b, int) for b in raw), name
        sc = f["block_scores"]
        if name in ("bm25", "lens"):
            assert sc.shape == (n,) and sc.dtype == np.float32 and np.isfinite(sc).all(), name
        else:
            assert sc is None, name
        if name in pol.RETRIEVAL_POLICIES:
            assert f["kept"] == [3] and 3 in raw, name
    assert pols["full"].last_focus["raw_blocks"] == list(range(n + 1))  # the partial one too
    assert pols["truncate"].last_focus["raw_blocks"] == list(range((len(hist) - W) // K, n + 1))
    assert pols["sinks"].last_focus["raw_blocks"][0] == 0
    assert max(pols["meanpool"].last_focus["raw_blocks"]) == n - 1  # complete blocks only
    assert np.abs(pols["lens"].last_focus["block_scores"]).max() <= 1


def test_lens_block_scores_are_from_levels_over_the_complete_blocks(plain):
    gist, _, _ = load_nets(plain, None, need_trained=False, meanpool=True)
    lens = LensNet(LensNetConfig.tiny(d_model=CFG.d_model), rngs=nnx.Rngs(1))
    s = Session(plain, W, gist, lens, policy="lens", capacity_tokens=2048)  # as the lens policy
    N = 40  # > K: a complete LOD2 gist is among the tail gists
    s.ingest(_haystack(N * K, 2))
    u = np.asarray(mcp.lens_block_scores(s.rt, s.nets, s.state.tree))
    g = s.state.tree.gists

    @jax.jit
    def direct(g1, g2):  # the training layout over exactly the N complete blocks
        f = lf.from_levels(jnp.ones(N, jnp.int32), (g1, g2), block_size=K, depth=2,
                           n_tail=lens.config.n_tail)
        return lf.score(lens, f).u

    np.testing.assert_allclose(u[:N], np.asarray(direct(g[0][:N], g[1][:N // K])), atol=1e-5)
    assert not u[N:].any()


# ------------------------------------------------------------------------------------------------
# the command line


def test_generate_question_with_bm25_and_needle_oracle(plain, tmp_path, monkeypatch, capsys):
    from mc_jax.base import loading
    from mc_jax.cli import commands as cli
    from mc_jax.nets import io as nets_io

    tok = ByteTokenizer()
    tok.chat_template = CHATML
    model = dataclasses.replace(plain, tokenizer=tok)
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: model)
    monkeypatch.setattr(nets_io, "default_checkpoint", lambda: tmp_path / "no-networks")
    doc = tmp_path / "doc.txt"
    text = "".join(f"Line {i}: the quick brown fox.\n" for i in range(40))
    doc.write_text(text)
    base = ["generate", "--input", str(doc), "--budget", str(W), "--max-new-tokens", "3"]
    assert cli.main(base + ["--question", "Which line says xyzzy?", "--policy", "bm25"]) == 0
    out, err = capsys.readouterr()
    assert "policy bm25" in err and "kept raw blocks [" in err and "mean-pool" in err
    assert len(out.rstrip("\n")) <= 3

    needle = "Line 17: the quick"
    assert cli.main(base + ["--question", "Which line?", "--policy", "needle_oracle",
                            "--needle", needle]) == 0
    out, err = capsys.readouterr()
    c0 = text.index(needle)
    want = list(range(c0 // K, -(-(c0 + len(needle)) // K)))  # bytes: tokens = characters
    assert f"blocks {want}" in err and f"kept raw blocks {want}" in err

    assert cli.main(base + ["--question", "Which line?", "--policy", "needle_oracle"]) != 0
    assert "needs --needle" in capsys.readouterr().err
    assert cli.main(base + ["--question", "Which line?", "--policy", "needle_oracle",
                            "--needle", "not in the text"]) != 0
    assert "does not occur" in capsys.readouterr().err
    assert cli.main(base + ["--question", "Which line?", "--policy", "bm25",
                            "--needle", "Line 3"]) != 0
    assert "needle_oracle only" in capsys.readouterr().err

    # --compare: one labelled answer per policy, the --policy first; --show-focus prints the
    # text of each kept block (the demo's output)
    assert cli.main(base + ["--question", "Which line?", "--policy", "needle_oracle", "--needle",
                            needle, "--compare", "truncate", "--show-focus"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert [ln.split(":")[0].strip() for ln in lines] == ["needle_oracle", "truncate"]
    assert "policy truncate: answered" in err
    b = want[0]
    assert f"block {b} (tokens [{K * b}, {K * b + K})" in err and \
        repr(" ".join(text[K * b:K * b + K].split())) in err
    with pytest.raises(SystemExit):  # argparse: oracle cannot answer
        cli.main(base + ["--question", "Which line?", "--policy", "bm25", "--compare", "oracle"])
    assert "invalid choice: 'oracle'" in capsys.readouterr().err
