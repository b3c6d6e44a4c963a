"""Tree persistence: exact round trips, corruption detection, and the paged host tree."""
import os
import struct

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mc_jax.core import focus
from mc_jax.core import tree as tr
from mc_jax.core import tree_store as ts
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, CorruptFileError
from core_reference import dyadic_table

K = 32
TABLE = jnp.asarray(dyadic_table(61, 4))


def embed(ids):
    return TABLE[ids]


def built(T, depth=2, dtype="float32", cap=None, seed=0):
    cfg = tr.TreeConfig(d=4, capacity_blocks=cap or -(-T // K) + 1, depth=depth, dtype=dtype)
    ids = np.random.RandomState(seed).randint(0, 61, T).astype(np.int32)
    return tr.build_tree(ids, cfg, embed, tr.mean_pool_gist_fn), cfg, ids


def assert_trees_equal(a, b):
    assert int(a.num_tokens) == int(b.num_tokens)
    np.testing.assert_array_equal(np.asarray(a.tokens_T), np.asarray(b.tokens_T))
    for x, y in zip(a.gists, b.gists):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.float32)),
                                      np.asarray(y.astype(jnp.float32)))


@pytest.mark.parametrize("depth,dtype,T", [(2, "float32", 1024 * 2 + 77), (3, "bfloat16", 5000),
                                           (2, "float32", 0)])
def test_round_trip_is_exact(tmp_path, depth, dtype, T):
    tree, cfg, _ = built(T, depth, dtype)
    ts.save_tree(tree, cfg, tmp_path)
    loaded, cfg2 = ts.load_tree(tmp_path, cfg)
    assert cfg2 == cfg
    assert_trees_equal(loaded, tree)
    derived, cfg3 = ts.load_tree(tmp_path)  # config derived from the files
    assert (cfg3.depth, cfg3.d, cfg3.dtype) == (depth, 4, dtype)
    assert int(derived.num_tokens) == T


def test_wc_round_trip(tmp_path):
    wcfg = wcm.WCConfig(w_max=160, depth=2)
    wc = jax.jit(wcm.build_recency, static_argnums=1)(3000, wcfg)
    wc, _ = jax.jit(focus.allocate, static_argnums=(2, 3))(
        wc, jnp.linspace(-1, 1, wcfg.max_entries), wcfg, focus.FocusConfig())
    ts.save_wc(wc, wcfg, tmp_path)
    back = ts.load_wc(tmp_path, wcfg)
    for a, b in zip(jax.tree.leaves(wc), jax.tree.leaves(back)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(CorruptFileError, match="w_max"):
        ts.load_wc(tmp_path, wcm.WCConfig(w_max=160, depth=2, protected_blocks=2))


def _saved(tmp_path):
    tree, cfg, _ = built(3000, 2)
    ts.save_tree(tree, cfg, tmp_path)
    return cfg


def _patch(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _rewrite_header(path, **change):
    with open(path, "rb") as f:
        raw = f.read(64)
    fields = list(ts.HEADER.unpack(raw))
    names = ["magic", "version", "level", "K", "width", "dtype", "rows", "alloc", "crc", "hcrc",
             "depth"]
    for k, v in change.items():
        fields[names.index(k)] = v
    body = ts.HEADER.pack(*fields)  # a crafted header: its checksum is made to match
    crc = ts._header_crc(body, min(fields[1], ts.VERSION))
    _patch(path, 0, body[:56] + struct.pack("<I", crc) + body[60:])


@pytest.mark.parametrize("damage,match", [
    ("payload", "payload checksum"),
    ("header", "header checksum"),
    ("truncate", "truncated"),
    ("magic", "not an mc_jax tree file"),
    ("version", "version 3"),
    ("level", "expected 1"),
    ("block", "block size"),
    ("missing0", "missing"),
    ("mixed", "different trees"),
])
def test_corruption_is_detected(tmp_path, damage, match):
    cfg = _saved(tmp_path)
    f1 = tmp_path / "level1.mct"
    if damage == "payload":
        _patch(f1, 64 + 37, b"\x7f")
    elif damage == "header":
        _patch(f1, 40, b"\x01")
    elif damage == "truncate":
        os.truncate(f1, os.path.getsize(f1) - 3)
    elif damage == "magic":
        _patch(f1, 0, b"NOTATREE")
    elif damage == "version":
        _rewrite_header(f1, version=3)
    elif damage == "level":
        _rewrite_header(f1, level=2)
    elif damage == "block":
        _rewrite_header(f1, K=16)
    elif damage == "missing0":
        os.remove(tmp_path / "level0.mct")
    elif damage == "mixed":
        other, ocfg, _ = built(5000, 2, seed=1)
        ts.save_tree(other, ocfg, tmp_path / "other")
        os.replace(tmp_path / "other" / "level1.mct", f1)
    with pytest.raises(CorruptFileError, match=match):
        ts.load_tree(tmp_path, cfg)
    with pytest.raises(CorruptFileError):
        ts.HostTree.open(tmp_path)


def test_config_mismatch_and_capacity(tmp_path):
    cfg = _saved(tmp_path)
    with pytest.raises(CorruptFileError, match="depth"):
        ts.load_tree(tmp_path, tr.TreeConfig(d=4, capacity_blocks=200, depth=3))
    with pytest.raises(CorruptFileError, match="width"):
        ts.load_tree(tmp_path, tr.TreeConfig(d=8, capacity_blocks=200, depth=2))
    with pytest.raises(CorruptFileError, match="dtype"):
        ts.load_tree(tmp_path, tr.TreeConfig(d=4, capacity_blocks=200, depth=2,
                                             dtype="bfloat16"))
    with pytest.raises(CapacityError):
        ts.load_tree(tmp_path, tr.TreeConfig(d=4, capacity_blocks=10, depth=2))


def test_host_tree_streams_and_pages_in_what_the_wc_needs(tmp_path):
    """A host tree holds a history; the WC's entries are paged in by index and materialise
    exactly as from a device tree with the same content."""
    depth, T = 3, 70_000
    device, dcfg, ids = built(T, depth)
    hcfg = tr.TreeConfig(d=4, capacity_blocks=4096, depth=depth)
    host = ts.HostTree.create(tmp_path, hcfg)
    gist = jax.jit(tr.mean_pool_gist_fn, static_argnums=0)
    for chunk in np.array_split(ids, 5):  # uneven chunks, blocks complete mid-chunk
        host.append(chunk, embed, gist)
    with pytest.raises(tr.TokenDtypeError):
        host.append(ids[:3].astype(np.int64), embed, gist)
    host.flush()
    reopened = ts.HostTree.open(tmp_path)
    assert reopened.counts() == list(np.asarray(device.counts(K)))
    loaded, _ = ts.load_tree(tmp_path, tr.TreeConfig(d=4, capacity_blocks=dcfg.capacity_blocks,
                                                     depth=depth))
    assert_trees_equal(loaded, device)

    wcfg = wcm.WCConfig(w_max=200, depth=depth, max_tokens=hcfg.capacity_tokens)
    wc = jax.jit(wcm.build_recency, static_argnums=1)(T, wcfg)
    rng = np.random.RandomState(0)
    alloc = jax.jit(focus.allocate, static_argnums=(2, 3))
    for _ in range(5):
        wc, _ = alloc(wc, jnp.asarray(rng.uniform(-1, 1, wcfg.max_entries)), wcfg,
                      focus.FocusConfig(cooldown=0), 0)
    wcm.check_wc(wc, wcfg)
    paged = reopened.gather(wc, wcfg)
    direct = mat.gather_entries(wc, device, wcfg)
    np.testing.assert_array_equal(np.asarray(paged.tokens_ExK), np.asarray(direct.tokens_ExK))
    np.testing.assert_array_equal(np.asarray(paged.vec_ExD), np.asarray(direct.vec_ExD))
    materialise = jax.jit(lambda wc, data, mode: mat.materialise(wc, data, embed, wcfg, mode),
                          static_argnums=2)
    for mode in ("compact", "global"):
        a, b = materialise(wc, paged, mode), materialise(wc, direct, mode)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_host_tree_capacity(tmp_path):
    host = ts.HostTree.create(tmp_path, tr.TreeConfig(d=4, capacity_blocks=2, depth=2))
    gist = tr.mean_pool_gist_fn
    host.append(np.zeros(40, np.int32), embed, gist)
    with pytest.raises(CapacityError, match="nothing was appended"):
        host.append(np.zeros(30, np.int32), embed, gist)
    assert host.num_tokens == 40
    with pytest.raises(PermissionError):
        ts.HostTree.open(tmp_path, verify=False).append(np.zeros(1, np.int32), embed, gist)


@pytest.mark.parametrize("damage,match", [
    ("top", "level2.mct: missing level file.*depth 2"),
    ("middle", "level2.mct: missing level file.*depth 3"),
    ("K0", "impossible header"),
    ("width0", "impossible header"),
    ("dtype", "dtype float64 is not one a tree stores"),
    ("rows", "rows in use but only"),
    ("alloc", "the header promises"),
    ("trailing", "the header promises"),
    ("depth", "level3.mct: missing level file"),
    ("extra", "level3.mct: not part of the saved tree"),
])
def test_missing_levels_and_crafted_headers(tmp_path, damage, match):
    """Headers with a matching checksum but impossible or inconsistent contents, and level
    files missing, are detected with or without a config."""
    depth = 3 if damage == "middle" else 2
    tree, cfg, _ = built(3000, depth)
    ts.save_tree(tree, cfg, tmp_path)
    f1 = tmp_path / "level1.mct"
    if damage in ("top", "middle"):
        os.remove(tmp_path / "level2.mct")
    elif damage == "K0":
        _rewrite_header(f1, K=0)
    elif damage == "width0":
        _rewrite_header(f1, width=0)
    elif damage == "dtype":
        _rewrite_header(f1, dtype=b"float64")
    elif damage == "rows":
        _rewrite_header(f1, rows=10 ** 6)
    elif damage == "alloc":
        _rewrite_header(f1, alloc=10 ** 12)
    elif damage == "trailing":
        with open(f1, "ab") as f:
            f.write(b"\0" * 16)
    elif damage == "depth":
        for l in range(3):
            _rewrite_header(tmp_path / f"level{l}.mct", depth=3)
    elif damage == "extra":
        os.replace(tmp_path / "level2.mct", tmp_path / "level3.mct")
        ts.save_tree(tree, cfg, tmp_path / "x")
        os.replace(tmp_path / "x" / "level2.mct", tmp_path / "level2.mct")
    for c in (None, cfg):
        with pytest.raises(CorruptFileError, match=match):
            ts.load_tree(tmp_path, c)
    with pytest.raises(CorruptFileError, match=match):
        ts.HostTree.open(tmp_path)


def test_version1_files_still_load_and_must_be_contiguous(tmp_path):
    tree, cfg, _ = built(3000, 3)
    ts.save_tree(tree, cfg, tmp_path)
    for l in range(4):  # as written before headers recorded the depth
        _rewrite_header(tmp_path / f"level{l}.mct", version=1, depth=0)
    assert_trees_equal(ts.load_tree(tmp_path, cfg)[0], tree)
    os.remove(tmp_path / "level2.mct")
    with pytest.raises(CorruptFileError, match="level2.mct: missing level file"):
        ts.load_tree(tmp_path)


def test_saving_over_a_deeper_tree_replaces_it(tmp_path):
    deep, dcfg, _ = built(5000, 3)
    ts.save_tree(deep, dcfg, tmp_path)
    tree, cfg, _ = built(3000, 2)
    ts.save_tree(tree, cfg, tmp_path)
    assert_trees_equal(ts.load_tree(tmp_path, cfg)[0], tree)
    assert not (tmp_path / "level3.mct").exists()


def test_crafted_wc_file_is_detected(tmp_path):
    wcfg = wcm.WCConfig(w_max=160, depth=2)
    ts.save_wc(jax.jit(wcm.build_recency, static_argnums=1)(3000, wcfg), wcfg, tmp_path)
    f = tmp_path / "wc.mct"
    h = ts.read_header(f)
    t = np.array(np.memmap(f, np.int32, "r", 64, (6, h["width"])))
    t[5, 0] = wcfg.max_entries + 5  # num_entries beyond the table, checksums made to match
    raw = bytearray(open(f, "rb").read(64))
    _patch(f, 64, t.tobytes())
    _rewrite_header(f, crc=ts._crc(t))
    with pytest.raises(CorruptFileError, match="impossible WC"):
        ts.load_wc(tmp_path, wcfg)
    assert raw[:8] == ts.MAGIC


def test_random_corruptions_of_tree_files_are_detected(tmp_path):
    """Byte flips, truncations and deletions of any tree file: an error, or the same tree."""
    rng = np.random.RandomState(13)
    tree, cfg, _ = built(3000, 3)
    for trial in range(40):
        d = tmp_path / str(trial)
        ts.save_tree(tree, cfg, d)
        files = sorted(d.iterdir())
        f = files[rng.randint(len(files))]
        kind = rng.randint(4)
        if kind == 0:
            f.unlink()
        elif kind == 1:
            os.truncate(f, rng.randint(f.stat().st_size))
        else:
            b = bytearray(f.read_bytes())
            for i in rng.randint(0, len(b) if kind == 2 else 64, rng.randint(1, 4)):
                b[i] ^= 1 << rng.randint(8)
            f.write_bytes(bytes(b))
        for c in (None, cfg):
            try:
                got, gcfg = ts.load_tree(d, c)
            except CorruptFileError:
                continue
            assert gcfg.depth == 3 and int(got.num_tokens) == 3000
            np.testing.assert_array_equal(got.tokens_T[:3000], tree.tokens_T[:3000])
            for x, y, n in zip(got.gists, tree.gists, (93, 2, 0)):
                np.testing.assert_array_equal(x[:n], y[:n])
