"""The public API (`mc_jax.MegaContext`) on the tiny random base, and the README's example run
as it is written on the real SmolLM2."""
import contextlib
import io
import re
from pathlib import Path

import jax
import numpy as np
import pytest

import mc_jax
from mc_jax.base import base_model as bm
from mc_jax.base import tiny
from mc_jax.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=1024)


@pytest.fixture(scope="module")
def mc():
    model = tiny.TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), tiny.ByteTokenizer())
    # the shipped networks are for SmolLM2 (d_model 576): the API falls back to mean-pool gists
    return mc_jax.MegaContext.load(model, budget=192, capacity_tokens=4096)


def spans_cover(focus, n):
    assert focus[0]["start"] == 0 and focus[-1]["end"] == n
    for a, b in zip(focus, focus[1:]):
        assert a["end"] == b["start"]


def test_ingest_focus_score_generate_answer(mc):
    K = mc.block_size
    assert mc.session.cfg.policy == "recency"  # no LensNet for this base
    n = mc.ingest("The grass is green. The sky is blue. " * 30)  # 1,110 bytes
    assert n == 1110 and len(mc.pending) == 1110 % K and len(mc.session.ids) == 1110 // K * K
    f = mc.focus()
    spans_cover(f, len(mc.session.ids))
    assert {e["level"] for e in f} >= {0, 1}  # 1,088 tokens do not fit 192 slots raw
    assert sum(K if e["level"] == 0 else 1 for e in f) <= 192

    before = len(mc.session.ids)
    res = mc.score("x" * 70)  # 22 pending + 70 = 2 whole blocks and 28 left over
    assert res["tokens"] == 2 * K and np.isfinite(res["nll"])
    assert res["perplexity"] == pytest.approx(np.exp(res["nll"]))
    assert len(mc.session.ids) == before + 2 * K and len(mc.pending) == 28

    out = mc.answer("What colour is the sky?", max_new_tokens=4)
    assert isinstance(out, str) and len(out) <= 4  # a byte token decodes to at most 1 char
    assert len(mc.pending) == 28  # the question is not history

    text = mc.generate(" and", max_new_tokens=5)
    assert isinstance(text, str) and len(text) <= 5
    assert mc.pending == [] and len(mc.session.ids) % K == 0
    spans_cover(mc.focus(), len(mc.session.ids))


def test_bad_input_is_named(mc):
    with pytest.raises(InputError, match="question is empty"):
        mc.answer("")
    with pytest.raises(InputError, match="whole block"):
        mc.score("ab")


def readme_example() -> str:
    text = (ROOT / "README.md").read_text()
    m = re.search(r"<!-- api-example[^>]*-->\s*```python\n(.*?)```\s*<!-- /api-example -->", text,
                  re.S)
    assert m, "README.md has no api-example block"
    return m.group(1)


@pytest.mark.smollm2
def test_readme_example_runs_as_written(monkeypatch):
    monkeypatch.chdir(ROOT)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(readme_example(), "README.md:api-example", "exec"), {})
    lines = out.getvalue().splitlines()
    assert len(lines) >= 4, lines  # the answer may span lines
    n_tokens = int(lines[0].split()[0])
    assert n_tokens > 2000
    assert lines[1].startswith("[{'start': 0, 'end': ")
    score = eval(lines[2])  # a dict of plain numbers
    assert score["tokens"] > 0 and 1.0 < score["perplexity"] < 1000
    assert "".join(lines[3:]).strip()  # some answer
