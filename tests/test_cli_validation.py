"""Validation at the edge (issue 18): CLI flags, sampling, perplexity input, sweep configs and
results files. Bad input is an `mc-jax: error: ...` (exit 1) naming the flag or file, checked
before a model loads; valid input behaves as before."""

import json
import random

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from mc_jax.base import base_model as bm
from mc_jax.base import loading, sampling, tiny
from mc_jax.base.perplexity import file_perplexity, prefix_ids
from mc_jax.base.tokenizer import Tokenizer
from mc_jax.cli.commands import main
from mc_jax.errors import ConfigError, CorruptFileError, InputError
from mc_jax.eval import sweep as ev
from mc_jax.nets import io as nets_io

CFG = bm.LlamaConfig.tiny(vocab_size=256, max_seq_len=1024)
GENESIS = ev.Path("experiments/data/kjv_genesis.txt").resolve()


@pytest.fixture(scope="module")
def model():
    return tiny.TinyBase(CFG, bm.init_params(CFG, jax.random.PRNGKey(0)), tiny.ByteTokenizer())


@pytest.fixture
def no_model(monkeypatch):
    """Any base-model load fails the test: the flag checks come first."""
    def load_base(*a, **k):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(loading, "load_base", load_base)


def _error(argv, capsys) -> str:
    assert main(argv) == 1
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mc-jax: error: ") and "Traceback" not in err
    return last


# ------------------------------------------------------------------------------------ sampling


def test_top_p_near_zero_is_top_1_and_greedy_is_unchanged():
    logits = jnp.asarray([[0.1, 0.3, 2.0, 1.9, -1.0]])
    keys = jax.random.split(jax.random.PRNGKey(0), 64)
    for top_p in (0.0, 1e-9, 0.01):
        draws = jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0, top_p)[0])(keys)
        assert set(np.asarray(draws).tolist()) == {2}, top_p  # the best token, never token 0
    assert int(sampling.sample_token(logits, keys[0], 0.0, 0.0)[0]) == 2  # greedy: argmax
    both = jax.vmap(lambda k: sampling.sample_token(logits, k, 1.0, 0.55)[0])(keys)
    assert set(np.asarray(both).tolist()) == {2, 3}  # a real nucleus keeps its two tokens


def test_sampling_arguments_are_checked():
    for t, p in ((0.0, 1.0), (0.7, 0.9), (2.0, 1e-6)):
        sampling.check_sampling(t, p)
    for t, p, what in ((-1, 1.0, "temperature"), (float("nan"), 1.0, "temperature"),
                       (float("inf"), 1.0, "temperature"), (1.0, 0.0, "top_p"),
                       (1.0, 2.0, "top_p"), (1.0, float("nan"), "top_p")):
        with pytest.raises(ConfigError, match=what):
            sampling.check_sampling(t, p)


def test_generate_rejects_an_empty_prompt_by_name(model):
    with pytest.raises(InputError, match="the prompt is empty"):
        next(sampling.generate(model.params, CFG, [], max_new_tokens=2))


# ----------------------------------------------------------------------------------- CLI flags


@pytest.mark.parametrize("argv, flag", [
    (["generate", "--prompt", "hi", "--max-new-tokens", "-3"], "--max-new-tokens -3: must be >= 1"),
    (["generate", "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature nan"),
    (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "0"], "--top-p 0.0"),
    (["generate", "--prompt", "hi", "--temperature", "1", "--top-p", "2"], "--top-p 2.0"),
    (["generate", "--prompt", ""], "--prompt is empty"),
    (["generate", "--prompt", "hi", "--budget", "0"], "--budget 0: must be >= 1"),
    (["score", "--input", "x.txt", "--budget", "0"], "--budget 0: must be >= 1"),
    (["score", "--input", "x.txt", "--max-tokens", "0"], "--max-tokens 0: must be >= 1"),
    (["perplexity", "--file", "x.txt", "--max-tokens", "-5"], "--max-tokens -5: must be >= 2"),
    (["fit-lens", "--val-frac", "1.5"], "--val-frac 1.5"),
    (["eval-lens", "--docs", "0"], "--docs 0: must be >= 1"),
])
def test_bad_flags_are_errors_before_anything_loads(argv, flag, no_model, capsys):
    assert flag in _error(argv, capsys)


def test_telemetry_path_is_checked_and_not_emptied(no_model, tmp_path, capsys):
    err = _error(["score", "--input", "x.txt", "--telemetry", str(tmp_path / "no" / "t.jsonl")],
                 capsys)
    assert "--telemetry" in err and "does not exist" in err
    assert "is a folder" in _error(["generate", "--input", "x.txt", "--telemetry",
                                    str(tmp_path)], capsys)
    old = tmp_path / "t.jsonl"
    old.write_text("an earlier run\n")
    _error(["score", "--input", "x.txt", "--budget", "0", "--telemetry", str(old)], capsys)
    assert old.read_text() == "an earlier run\n"  # a failed run leaves the old file alone


def test_budget_too_small_for_the_working_context(model, monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(loading, "load_base", lambda *a, **k: model)
    monkeypatch.setattr(nets_io, "default_checkpoint", lambda: tmp_path / "no-networks")
    doc = tmp_path / "doc.txt"
    doc.write_text("the quick brown fox jumps over the lazy dog. " * 20)
    for argv in (["score", "--input", str(doc), "--budget", "10"],
                 ["generate", "--prompt", "hello", "--budget", "10"],
                 ["generate", "--prompt", "hello", "--budget", "4096"]):
        err = _error(argv, capsys)
        assert f"--budget {argv[-1]}: must be between 95 " in err and "1024" in err


def test_perplexity_tokenises_only_a_prefix_of_a_long_file(model, monkeypatch, tmp_path):
    seen = []

    class Counting(tiny.ByteTokenizer):
        def encode(self, text):
            seen.append(len(text))
            return super().encode(text)

    m = tiny.TinyBase(CFG, model.params, Counting())
    small = tmp_path / "small.txt"
    small.write_text(GENESIS.read_text()[:3000])
    big = tmp_path / "big.txt"
    big.write_text(small.read_text() + "x" * 2_000_000)
    a, b = file_perplexity(m, small, 256), file_perplexity(m, big, 256)
    assert a["perplexity"] == b["perplexity"] and a["tokens"] == b["tokens"] == 256
    assert max(seen) < 50_000  # not the 2 MB


def _bpe() -> Tokenizer:
    """A small byte-level BPE with SmolLM2's pre-tokenizer (digits alone, GPT-2 regex)."""
    hf = tokenizers.Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    hf.train_from_iterator([GENESIS.read_text()[:200_000]], trainers.BpeTrainer(
        vocab_size=600, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    return Tokenizer(hf, "test-bpe")


def test_prefix_ids_equal_the_whole_texts_tokens():
    tok = _bpe()
    rng = random.Random(0)
    genesis = GENESIS.read_text()
    pieces = [genesis[:5000], "   \n\n\t  ", "internationalisation" * 300, "1234567890" * 50,
              "=" * 9000, " ünïcødé 日本語 🙂 ", "\n" * 700]
    for trial in range(12):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(2, 12)))
        for n in (1, 2, 100, 1023, 4000):
            assert prefix_ids(tok, text, n) == tok.encode(text)[:n], (trial, n)


# ---------------------------------------------------------------------------------- sweeps


def _conf(tmp_path, body: str, name="c.py"):
    p = tmp_path / name
    p.write_text(body)
    return str(p)


MINI = ("def get_config(variant=None):\n"
        "    doc = dict(name='g', path=%r, tokens=256)\n"
        "    return dict(name=NAME, base='tiny', base_kw=dict(max_seq_len=512), evaluators=[\n"
        "        dict(name='ppl', policies=POLICIES, budgets=[64], docs=[doc],\n"
        "             blocks_per_doc=2)])\n" % str(GENESIS))


def _mini(tmp_path, name="'mini'", policies="['truncate', 'sinks', 'full']"):
    return _conf(tmp_path, f"NAME = {name}\nPOLICIES = {policies}\n" + MINI)


@pytest.mark.parametrize("body, match", [
    ("def get_config(variant=None):\n    return dict(evaluators=[\n", "cannot be loaded: Syn"),
    ("def get_config(variant=None):\n    raise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("def get_config(variant=None):\n    return dict(name='x', evaluators='ppl')\n",
     "'evaluators' is a str; give a list"),
    ("def get_config(variant=None):\n    return dict(name='x', evaluators=['ppl'])\n",
     "evaluator 0 is a str"),
    ("def get_config(variant=None):\n    return [1]\n", "returned a list"),
    ("def get_config(variant=None):\n    return dict(evaluators=[dict(name='ppl', "
     "policies=['full'], budgets=[0], docs=[])])\n", "budget 0 is not a positive integer"),
    ("def get_config(variant=None):\n    return dict(evaluators=[dict(name='ppl', "
     "policies=['full'], budgets=[64], docs=[dict(name='g', path='g.txt')])])\n",
     "needs name, path and tokens"),
])
def test_bad_sweep_configs_are_config_errors(tmp_path, body, match):
    with pytest.raises(ConfigError, match=match):
        ev.run_sweep(_conf(tmp_path, body), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_unknown_policy_and_unsafe_names_are_refused_before_the_first_row(tmp_path):
    for kw, match in ((dict(policies="['truncate', 'trunacte']"), "unknown policy 'trunacte'"),
                      (dict(policies="'truncate'"), "'policies' is a str"),
                      (dict(name="'../../escaped'"), "not one plain folder name"),
                      (dict(name=repr(str(tmp_path / "abs"))), "not one plain folder name")):
        with pytest.raises(ConfigError, match=match):
            ev.run_sweep(_mini(tmp_path, **kw), tmp_path / "out", progress=False)
        assert not (tmp_path / "out").exists()
    with pytest.raises(ConfigError, match="variant '../x'"):
        ev.load_config(_mini(tmp_path) + ":../x")


def test_eval_cli_only_and_out_are_checked(tmp_path, capsys):
    spec = _mini(tmp_path)
    err = _error(["eval", "--sweep", spec, "--out", str(tmp_path / "o"), "--only", "pplx"],
                 capsys)
    assert "--only pplx: unknown evaluator; known: " in err and "ppl" in err
    assert "does not list it" in _error(["eval", "--sweep", spec, "--out", str(tmp_path / "o"),
                                         "--only", "cost"], capsys)
    f = tmp_path / "afile"
    f.write_text("mine")
    assert "is a file, not a folder" in _error(["eval", "--sweep", spec, "--out", str(f)],
                                               capsys)
    assert f.read_text() == "mine" and not (tmp_path / "o").exists()


def test_a_torn_last_line_loses_no_row(tmp_path, capsys):
    spec, out = _mini(tmp_path), tmp_path / "out"
    assert ev.run_sweep(spec, out, progress=False, plots=False)["computed"] == 3
    path = out / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:-1]) + lines[-1][:40])  # killed while writing the last row
    again = ev.run_sweep(spec, out, progress=False, plots=False)
    assert "the last line is incomplete" in capsys.readouterr().err
    assert again["computed"] == 1 and again["skipped"] == 2
    rows = [json.loads(x) for x in path.read_text().splitlines()]  # every line parses
    assert len(rows) == 3 and {r["key"]["policy"] for r in rows} == {"truncate", "sinks", "full"}

    whole = path.read_text()
    path.write_text(whole.rstrip("\n"))  # a complete last row without its newline: kept
    assert len(ev.read_rows(path)) == 3
    ev.repair_rows(path)
    assert path.read_text() == whole


def test_a_damaged_row_before_the_last_is_reported_and_kept(tmp_path):
    path = tmp_path / "results.jsonl"
    row = json.dumps(dict(key=dict(evaluator="ppl", policy="full"), status="ok"))
    path.write_text(row + "\n{garbage\n" + row + "\n")
    before = path.read_bytes()
    with pytest.raises(CorruptFileError, match="line 2"):
        ev.read_rows(path)
    with pytest.raises(CorruptFileError):
        ev.repair_rows(path)
    assert path.read_bytes() == before
