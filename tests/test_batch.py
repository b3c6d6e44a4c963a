"""Batched runtime (issue 17, item 6): B streams in one vmapped step equal B Sessions stepped
one by one (tiny base, lens policy with an untrained LensNet that edits the WC), including
streams of different history lengths and sampled blocks; one compile serves every step."""
import chex
import jax
import numpy as np
import pytest
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base.tiny import ByteTokenizer, TinyBase
from mc_jax.core import focus as fm
from mc_jax.errors import CapacityError, InputError
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from mc_jax.runtime import batch as batch_mod
from mc_jax.runtime import step as step_mod
from mc_jax.runtime.batch import BatchedSession
from mc_jax.runtime.session import Session

K, W = 32, 192
KW = dict(policy="lens", capacity_tokens=2048, chunk=32,
          focus=fm.FocusConfig(tau_expand=0.01, tau_collapse=0.01, cooldown=1))


@pytest.fixture(scope="module")
def parts():
    cfg = bm.LlamaConfig.tiny()
    model = TinyBase(cfg, bm.init_params(cfg, jax.random.PRNGKey(0)), ByteTokenizer())
    gist = build_gist_model(GistNetConfig.tiny(64), rngs=nnx.Rngs(0))
    lens = LensNet(LensNetConfig.tiny(d_model=64), rngs=nnx.Rngs(1))
    return model, gist, lens


def _ids(n, seed):
    return np.random.RandomState(seed).randint(0, 256, n).astype(np.int32)


def test_batched_streams_equal_sessions_one_by_one(parts, monkeypatch):
    model, gist, lens = parts
    B, n_teach, n_sample = 3, 3, 1
    hist = [_ids(K * n, 10 + b) for b, n in enumerate((20, 7, 13))]  # different lengths
    blocks = [_ids(K * (n_teach + n_sample), 20 + b) for b in range(B)]
    bs = BatchedSession(model, W, gist, lens, batch=B, seed=5, **KW)
    bs.ingest(hist)
    got_nll, got_tok = [], []
    for j in range(n_teach):
        info = bs.step(np.stack([x[K * j:K * (j + 1)] for x in blocks]), teacher=True)
        got_nll.append(info.nll_K)
    # a sampled block: 5 tokens given, the rest drawn (temperature 1: the streams' own keys)
    j = n_teach
    info = bs.step(np.stack([x[K * j:K * j + 5] for x in blocks]), n_given=5, teacher=False,
                   temperature=1.0)
    got_tok.append(info.tokens_K)
    # one compile: more steps of the same session trace nothing again
    chex.clear_trace_counter()
    monkeypatch.setattr(step_mod, "block_step", chex.assert_max_traces(step_mod.block_step, n=0))
    monkeypatch.setattr(batch_mod, "block_step", chex.assert_max_traces(batch_mod.block_step, n=0))
    bs.step(np.stack([x[:K] for x in blocks]))
    monkeypatch.undo()
    for b in range(B):
        s = Session(model, W, gist, lens, seed=5 + b, **KW)
        s.ingest(hist[b])
        for j in range(n_teach):
            ref = s.step(blocks[b][K * j:K * (j + 1)], teacher=True)
            np.testing.assert_allclose(got_nll[j][b], ref.nll_K, atol=2e-5, rtol=2e-5)
        j = n_teach
        ref = s.step(blocks[b][K * j:K * j + 5], n_given=5, teacher=False, temperature=1.0)
        np.testing.assert_array_equal(got_tok[0][b], ref.tokens_K)
        st = bs.stream_state(b)
        s.step(blocks[b][:K])  # the extra block the batch took
        np.testing.assert_array_equal(np.asarray(st.wc.level_E), np.asarray(s.state.wc.level_E))
        np.testing.assert_array_equal(np.asarray(st.wc.node_E), np.asarray(s.state.wc.node_E))
        assert int(st.wc.num_tokens) == len(s.ids) == len(bs.ids[b])
        np.testing.assert_allclose(np.asarray(st.tree.gists[0]), np.asarray(s.state.tree.gists[0]),
                                   atol=1e-5)


def test_batched_session_bad_inputs(parts):
    model, gist, lens = parts
    bs = BatchedSession(model, W, gist, lens, batch=2, **KW)
    with pytest.raises(InputError, match="ingest got 1 streams, the session has 2"):
        bs.ingest([_ids(K, 0)])
    with pytest.raises(InputError, match="stream 1: ingest takes whole blocks"):
        bs.ingest([_ids(K, 0), _ids(K + 3, 1)])
    with pytest.raises(InputError, match=r"shape \[2, <= 32\]"):
        bs.step(np.zeros((3, K), np.int32))
    with pytest.raises(CapacityError, match="stream 0: 2080 tokens exceed"):
        bs.ingest([_ids(2080, 0), _ids(K, 1)])
    assert bs.ids == [[], []]  # a refused call changes nothing
    with pytest.raises(InputError, match="at least one stream"):
        BatchedSession(model, W, gist, lens, batch=0, **KW)


def test_cli_score_several_files_as_one_batch(parts, tmp_path, monkeypatch, capsys):
    """`mc-jax score --input A --input B`: the files are the streams of one batched step, and
    each file's perplexity equals scoring it alone."""
    import json

    from mc_jax.base import loading
    from mc_jax.cli import commands as cli
    from mc_jax.nets import io as nets_io

    model = parts[0]
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: model)
    monkeypatch.setattr(nets_io, "default_checkpoint", lambda: tmp_path / "no-networks")
    paths = []
    for i, n in enumerate((30, 18)):  # different lengths
        p = tmp_path / f"doc{i}.txt"
        p.write_text("".join(f"Line {j} of {i}: the quick brown fox.\n" for j in range(n)))
        paths.append(str(p))
    args = ["--budget", "192"]
    assert cli.main(["score", "--input", paths[0], "--input", paths[1], "--json"] + args) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["streams"] == 2 and [f["input"] for f in res["files"]] == paths
    for f in res["files"]:
        assert cli.main(["score", "--input", f["input"], "--json"] + args) == 0
        one = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert one["tokens"] == f["tokens"] and one["scored"] == f["scored"]
        np.testing.assert_allclose(f["perplexity"], one["perplexity"], rtol=1e-5)
    assert cli.main(["score", "--input", paths[0], "--input", paths[1], "--telemetry",
                     str(tmp_path / "t.jsonl")] + args) != 0
    assert "--telemetry records one stream" in capsys.readouterr().err
