"""Artifacts mc_jax writes and later trusts (the converted-base cache, exported networks): damage
is detected (a McJaxError naming the file) or, for the derived cache, repaired by converting
again; bad headers/configs are errors, not tracebacks. Random corruptions at the end."""

import json
import os
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from mc_jax.base import base_model as bm
from mc_jax.base import convert
from mc_jax.base import hf as hf_dir
from mc_jax.base import loading
from mc_jax.errors import CorruptFileError, McJaxError, MissingResourceError
from mc_jax.nets import io as nets_io
from mc_jax.nets.gistnet import GistNetConfig, build_gist_model
from mc_jax.nets.lensnet import LensNet, LensNetConfig
from test_loading import CFG, _tok_from_gguf_fields, write_tiny_gguf

QUIET = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def tiny():
    return bm.init_params(CFG, jax.random.PRNGKey(3))


@pytest.fixture
def gguf_cache(tmp_path, tiny, monkeypatch):
    """(tiny GGUF, its converted cache dir) under tmp_path."""
    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, CFG)
    return g, convert.convert_gguf(g, **QUIET)


def _same_params(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _digests(d):
    return {n: hf_dir.file_digest(d / n, None) for n in hf_dir.CACHED_FILES}


# ----------------------------------------------------------------------- converted base cache

def test_damaged_cache_is_detected_and_converted_again(gguf_cache, tiny):
    g, out = gguf_cache
    good = _digests(out)
    st = out / "model.safetensors"
    with open(st, "r+b") as f:  # zero a stretch of weights: same size, still parses
        f.seek(st.stat().st_size - 4096)
        f.write(b"\0" * 2048)
    with pytest.raises(CorruptFileError, match="model.safetensors.*sha256"):
        hf_dir.load_hf_dir(out)  # the cache dir given directly: a clear error
    m = loading.load_base(g)  # through the GGUF: converted again, same weights
    assert _same_params(jax.device_get(m.params), tiny) and _digests(out) == good


def test_incomplete_or_unmanifested_cache_is_converted_again(gguf_cache):
    g, out = gguf_cache
    (out / "tokenizer.json").unlink()
    assert hf_dir.cache_problem(out) == "tokenizer.json is missing"
    assert convert.convert_gguf(g, **QUIET) == out and (out / "tokenizer.json").is_file()
    meta = json.loads((out / hf_dir.META).read_text())
    del meta["files"]  # as written by an older mc_jax: nothing to verify against
    (out / hf_dir.META).write_text(json.dumps(meta))
    convert.convert_gguf(g, **QUIET)
    assert hf_dir.cache_problem(out) is None


def test_stale_temp_folders_are_cleaned(gguf_cache, tmp_path):
    g, out = gguf_cache
    bases = out.parent
    # a conversion killed by SIGKILL mid-save, in another process
    code = ("import os, sys; from mc_jax.base import convert as C\n"
            "def die(path, *a, **k):\n"
            "    (path / 'model.safetensors').write_bytes(b'x' * 1000); os._exit(9)\n"
            "C.save_hf_dir = die\n"
            "C.convert_gguf(sys.argv[1], force=True, log=lambda *_: None)\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    assert subprocess.run([sys.executable, "-c", code, str(g)], env=env).returncode == 9
    killed = [p for p in bases.glob("*.tmp-*")]
    assert len(killed) == 1 and (killed[0] / "writer.json").exists()
    live = bases / "other.tmp-live"  # a conversion running now in this process: kept
    live.mkdir()
    (live / "writer.json").write_text(json.dumps({"pid": os.getpid(),
                                                  "host": os.uname().nodename}))
    old = bases / "other.tmp-old"  # an older mc_jax's temp folder, hours old: removed
    young = bases / "other.tmp-young"  # ... a minute old: kept (it may be converting)
    for d, age in ((old, 2 * convert.STALE_TEMP_S), (young, 60)):
        d.mkdir()
        os.utime(d, (time.time() - age,) * 2)
    convert.convert_gguf(g, force=True, **QUIET)
    assert sorted(p.name for p in bases.glob("*.tmp-*")) == ["other.tmp-live", "other.tmp-young"]
    assert hf_dir.cache_problem(out) is None


# ----------------------------------------------------------------------- bad inputs (case 11)

def _hf(tmp_path, tiny):
    return hf_dir.save_hf_dir(tmp_path / "hf", tiny, CFG,
                               loading.Tokenizer(hf=_tok_from_gguf_fields(), name="t"))


def test_bad_hf_checkpoints_are_clear_errors(tmp_path, tiny):
    d = _hf(tmp_path, tiny)
    from safetensors.numpy import load_file, save_file
    t = load_file(str(d / "model.safetensors"))
    good = dict(t)
    t["model.layers.1.self_attn.q_proj.weight"] = np.zeros((3, 5), np.float32)
    save_file(t, str(d / "model.safetensors"))
    with pytest.raises(CorruptFileError, match=r"hf.*layers\.1\.self_attn\.q_proj.*shape \(3, 5\)"):
        hf_dir.load_hf_dir(d)
    save_file(good, str(d / "model.safetensors"))
    cfg_json = json.loads((d / "config.json").read_text())
    for bad, match in (([cfg_json], "JSON object, this holds a list"),
                       ({k: v for k, v in cfg_json.items() if k != "hidden_size"},
                        "missing key.*hidden_size"),
                       (dict(cfg_json, num_hidden_layers="2"), "num_hidden_layers must be a")):
        (d / "config.json").write_text(json.dumps(bad))
        with pytest.raises(CorruptFileError, match=match) as e:
            hf_dir.load_hf_dir(d)
        assert "config.json" in str(e.value)


def test_bad_ggufs_are_clear_errors(tmp_path, tiny, monkeypatch, capsys):
    from mc_jax.cli.commands import main

    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "noemb.gguf", tiny, CFG, embedding_length=False)
    with pytest.raises(CorruptFileError, match="noemb.gguf.*lacks llama.embedding_length"):
        convert.convert_gguf(g, **QUIET)
    g = write_tiny_gguf(tmp_path / "shape.gguf", tiny, CFG,
                        replace={"blk.0.attn_k.weight": np.zeros((6, 64), np.float32)})
    with pytest.raises(CorruptFileError, match=r"shape.gguf.*'blk.0.attn_k.weight' has shape"):
        convert.convert_gguf(g, **QUIET)
    assert main(["convert-base", "--base", str(g)]) == 1
    assert "blk.0.attn_k.weight" in capsys.readouterr().err


# ----------------------------------------------------------------------- exported networks

def _export(path, dtype="bfloat16"):
    gcfg, lcfg = GistNetConfig.tiny(d_model=64), LensNetConfig.tiny(d_model=64)
    gist, lens = build_gist_model(gcfg, rngs=nnx.Rngs(1)), LensNet(lcfg, rngs=nnx.Rngs(2))
    nets_io.save_networks(path, nnx.state(gist, nnx.Param), nnx.state(lens, nnx.Param), gcfg,
                          lcfg, {"steps": 3}, dtype)
    return path


def _params(gist, lens):
    return [np.asarray(x) for m in (gist, lens) for x in jax.tree.leaves(nnx.state(m, nnx.Param))]


def test_export_checksum_detects_damage(tmp_path):
    p = _export(tmp_path / "nets")
    info = json.loads((p / "networks.json").read_text())
    assert len(info[nets_io.CHECKSUM_KEY]) == 64
    nets_io.load_networks(p)
    st = p / "networks.safetensors"
    b = bytearray(st.read_bytes())
    for i in range(400):
        b[len(b) // 2 + i] ^= 0x5A
    st.write_bytes(bytes(b))
    with pytest.raises(CorruptFileError, match="do not match the checksum_sha256"):
        nets_io.load_networks(p)


def test_shipped_exports_verify_and_old_exports_load(tmp_path):
    for d in (nets_io.default_checkpoint(), nets_io.DEFAULT_NETWORKS.parents[2] / "experiments"
              / "gist_capacity" / "recon_stage2_pair"):
        info, _ = nets_io.read_networks(d)  # checksum present and matching
        assert nets_io.CHECKSUM_KEY in info
    p = _export(tmp_path / "old")
    info = json.loads((p / "networks.json").read_text())
    del info[nets_io.CHECKSUM_KEY]  # written before checksums: loads unchecked
    (p / "networks.json").write_text(json.dumps(info))
    nets_io.load_networks(p)


@pytest.mark.parametrize("edit,match", [
    (lambda i: i["gist_config"].update(colour="red"), "gist_config has unknown field.*colour"),
    (lambda i: i["lens_config"].pop("d_model"), "lens_config lacks field.*d_model"),
    (lambda i: i["gist_config"].update(width="32"), "gist_config.width must be int"),
    (lambda i: i["gist_config"].update(heads=3), "gist_config: .*width 32 / heads 3"),
    (lambda i: i.update(lens_config=[1]), "lens_config is not an object"),
])
def test_bad_networks_json_is_a_clear_error(tmp_path, edit, match):
    p = _export(tmp_path / "nets")
    info = json.loads((p / "networks.json").read_text())
    edit(info)
    del info[nets_io.CHECKSUM_KEY]  # a hand-edited file: the checks still hold without it
    (p / "networks.json").write_text(json.dumps(info))
    with pytest.raises(CorruptFileError, match=match) as e:
        nets_io.load_networks(p)
    assert "networks.json" in str(e.value)


def test_mistyped_checkpoint_is_an_error(tmp_path):
    from mc_jax.base.tiny import build_base

    base = build_base("tiny")
    for need in (True, False):
        with pytest.raises(MissingResourceError, match="typo.*not found"):
            nets_io.load_nets(base, tmp_path / "typo", need_trained=need, log=print)
    _, lens, info = nets_io.load_nets(base, None, need_trained=False, meanpool=True)
    assert lens is None and info["checkpoint"] is None


# ----------------------------------------------------------------------- random corruptions

def _corrupt(rng, files):
    """Flip bytes in, truncate, or delete one of `files`; returns what was done."""
    f = files[rng.randint(len(files))]
    kind = ["flip", "flip", "truncate", "delete"][rng.randint(4)]
    if kind == "delete":
        f.unlink()
        return f"delete {f.name}"
    b = bytearray(f.read_bytes())
    if kind == "truncate":
        f.write_bytes(bytes(b[:rng.randint(len(b))]))
        return f"truncate {f.name}"
    for i in rng.randint(0, len(b), rng.randint(1, 9)):
        b[i] ^= 1 << rng.randint(8)
    f.write_bytes(bytes(b))
    return f"flip {f.name}"


def test_random_corruptions_are_detected_or_repaired(tmp_path, tiny, monkeypatch):
    rng = np.random.RandomState(18)
    monkeypatch.setenv("MC_JAX_CACHE", str(tmp_path / "cache"))
    g = write_tiny_gguf(tmp_path / "tiny.gguf", tiny, CFG)
    out = convert.convert_gguf(g, **QUIET)
    good = _digests(out)
    nets = _export(tmp_path / "nets")
    gist0, lens0, info0 = nets_io.load_networks(nets)
    want = _params(gist0, lens0)
    pristine = {f.name: f.read_bytes() for f in nets.iterdir()}
    monkeypatch.setattr(loading, "_stderr", lambda *_: None)
    for trial in range(16):
        # converted base: loading the directory is an error or exact; the GGUF repairs it
        what = _corrupt(rng, sorted(out.iterdir()))
        try:
            m = hf_dir.load_hf_dir(out)
            assert _same_params(m.params, tiny), what
        except McJaxError:
            pass
        m = loading.load_base(g)
        assert _same_params(jax.device_get(m.params), tiny) and _digests(out) == good, what
        # exported networks: an error, or exactly the networks and info that were saved
        what = _corrupt(rng, sorted(nets.iterdir()))
        try:
            gist, lens, info = nets_io.load_networks(nets)
            assert info == info0 and all(np.array_equal(a, b) for a, b in
                                         zip(_params(gist, lens), want)), what
        except McJaxError:
            pass
        for name, data in pristine.items():
            (nets / name).write_bytes(data)
