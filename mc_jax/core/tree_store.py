"""Tree persistence and paging: memory-mapped level files, and a host-resident tree.

A saved tree is a directory with one file per level: `level0.mct` (token ids, int32) and
`level{l}.mct` for each gist level l = 1..depth. A WC may sit next to it as `wc.mct`. Each file
is a 64-byte header followed by a row-major payload that numpy can memory-map:

    offset size  field
    0      8     magic b"MCJXTREE"
    8      4     version (uint32, = 1)
    12     4     level (int32; -1 for a WC file)
    16     4     block size K (uint32)
    20     4     width: 1 for tokens, D for gists, E_max for a WC file (uint32)
    24     12    dtype name, ASCII, NUL padded ("int32", "float32", "bfloat16", ...)
    36     8     rows in use (uint64)
    44     8     rows allocated (uint64; >= rows in use, so a host tree can grow in place)
    52     4     CRC32 of the payload rows in use (uint32)
    56     4     CRC32 of header bytes [0, 56) (uint32)
    60     4     zero

Loading checks magic, version, header checksum, file length, level, block size, width and
dtype against each other and against a config, then the payload checksum; anything wrong raises
`CorruptFileError` naming the file and the problem.

`HostTree` keeps every level as a numpy memmap, so a history far beyond device memory lives on
disk/host RAM, and `HostTree.gather(wc, wcfg)` pages in only what the WC shows: the K token ids
of each LOD0 entry and one vector per entry (a gather by the WC's node indices).
"""
from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mc_jax.core import tree as tr
from mc_jax.core import materialise as mat
from mc_jax.core import working_context as wcm
from mc_jax.errors import CapacityError, CorruptFileError

MAGIC = b"MCJXTREE"
VERSION = 1
HEADER = struct.Struct("<8sIiII12sQQII4x")
assert HEADER.size == 64
WC_LEVEL = -1
_CHUNK = 1 << 24


def _level_path(path, level: int) -> Path:
    return Path(path) / ("wc.mct" if level == WC_LEVEL else f"level{level}.mct")


def _crc(arr: np.ndarray) -> int:
    flat = np.ascontiguousarray(arr).reshape(-1).view(np.uint8)
    crc = 0
    for i in range(0, flat.size, _CHUNK):
        crc = zlib.crc32(flat[i:i + _CHUNK], crc)
    return crc


def _pack_header(level, K, width, dtype, rows, alloc, crc) -> bytes:
    name = np.dtype(dtype).name.encode()
    body = HEADER.pack(MAGIC, VERSION, level, K, width, name, rows, alloc, crc, 0)
    return body[:56] + struct.pack("<I", zlib.crc32(body[:56])) + body[60:]


def _write(path: Path, level, K, arr_NxW: np.ndarray, alloc: int | None = None) -> None:
    """Write a level file atomically (temp file + rename)."""
    rows, width = arr_NxW.shape
    alloc = rows if alloc is None else alloc
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(_pack_header(level, K, width, arr_NxW.dtype, rows, alloc, _crc(arr_NxW)))
        f.write(np.ascontiguousarray(arr_NxW).tobytes())
        pad = (alloc - rows) * width * arr_NxW.dtype.itemsize
        if pad:
            f.truncate(HEADER.size + alloc * width * arr_NxW.dtype.itemsize)
    os.replace(tmp, path)


def read_header(path) -> dict:
    path = Path(path)
    if not path.exists():
        raise CorruptFileError(f"{path}: missing level file (the saved tree is incomplete)")
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(HEADER.size)
    if len(raw) < HEADER.size:
        raise CorruptFileError(f"{path}: truncated header ({len(raw)} of {HEADER.size} bytes)")
    magic, version, level, K, width, name, rows, alloc, crc, _ = HEADER.unpack(raw)
    if magic != MAGIC:
        raise CorruptFileError(f"{path}: not an mc_jax tree file (magic {magic!r})")
    if version != VERSION:
        raise CorruptFileError(f"{path}: file version {version}, this code reads version "
                               f"{VERSION}")
    if struct.unpack("<I", raw[56:60])[0] != zlib.crc32(raw[:56]):
        raise CorruptFileError(f"{path}: header checksum mismatch (corrupt header)")
    try:
        dtype = np.dtype(jnp.dtype(name.rstrip(b"\0").decode()))
    except (TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: unknown dtype {name!r}") from e
    if rows > alloc:
        raise CorruptFileError(f"{path}: {rows} rows in use but only {alloc} allocated")
    want = HEADER.size + alloc * width * dtype.itemsize
    if size < want:
        raise CorruptFileError(f"{path}: truncated: {size} bytes, header promises {want}")
    return dict(level=level, block_size=K, width=width, dtype=dtype, rows=rows, alloc=alloc,
                crc=crc, path=path)


def _map(h: dict, mode="r") -> np.ndarray:
    if h["alloc"] == 0:  # numpy cannot map an empty range
        return np.zeros((0, h["width"]), h["dtype"])
    return np.memmap(h["path"], dtype=h["dtype"], mode=mode, offset=HEADER.size,
                     shape=(h["alloc"], h["width"]))


def _open_level(path, level, K=None, width=None, dtype=None, verify=True, mode="r"):
    h = read_header(_level_path(path, level))
    p = h["path"]
    if h["level"] != level:
        raise CorruptFileError(f"{p}: header says level {h['level']}, expected {level}")
    if K is not None and h["block_size"] != K:
        raise CorruptFileError(f"{p}: block size {h['block_size']} does not match {K}")
    if width is not None and h["width"] != width:
        raise CorruptFileError(f"{p}: width {h['width']} does not match {width}")
    if dtype is not None and h["dtype"] != np.dtype(dtype):
        raise CorruptFileError(f"{p}: dtype {h['dtype']} does not match {np.dtype(dtype)}")
    arr = _map(h, mode)
    if verify and _crc(arr[:h["rows"]]) != h["crc"]:
        raise CorruptFileError(f"{p}: payload checksum mismatch (corrupt data)")
    return h, arr


def _levels_consistent(path, num_tokens, counts, K):
    for level, n in enumerate(counts, start=1):
        if n != num_tokens // K ** level:
            raise CorruptFileError(
                f"{_level_path(path, level)}: holds {n} gists but {num_tokens} tokens make "
                f"{num_tokens // K ** level}; the level files come from different trees")


# ----------------------------------------------------------------------------- device tree

def save_tree(tree: tr.Tree, cfg: tr.TreeConfig, path) -> None:
    """Write a device tree: only the rows in use (count per level), one file per level."""
    tr.check_tree(tree, cfg)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    h = jax.device_get(tree)
    T = int(h.num_tokens)
    K = cfg.block_size
    _write(_level_path(path, 0), 0, K, np.asarray(h.tokens_T[:T], np.int32).reshape(T, 1))
    for level in range(1, cfg.depth + 1):
        n = T // K ** level
        _write(_level_path(path, level), level, K, np.asarray(h.gists[level - 1])[:n])


def saved_depth(path) -> int:
    depth = 0
    while _level_path(path, depth + 1).exists():
        depth += 1
    return depth


def load_tree(path, cfg: tr.TreeConfig | None = None) -> tuple[tr.Tree, tr.TreeConfig]:
    """Read a saved tree into device arrays, verifying headers and checksums.

    With cfg: it must match the files (block size, depth, d, dtype) and hold the history.
    Without: a config just big enough is derived from the files.
    """
    path = Path(path)
    h0, tok = _open_level(path, 0, K=cfg.block_size if cfg else None, width=1,
                          dtype=np.int32)
    K, T = h0["block_size"], h0["rows"]
    depth = saved_depth(path)
    if cfg is not None and depth != cfg.depth:
        raise CorruptFileError(f"{path}: saved tree has depth {depth}, config wants "
                               f"{cfg.depth}")
    if depth == 0:
        raise CorruptFileError(f"{path}: no gist level files (level1.mct missing)")
    h1 = read_header(_level_path(path, 1))
    if cfg is None:
        cfg = tr.TreeConfig(d=h1["width"], capacity_blocks=max(1, -(-T // K)), depth=depth,
                            block_size=K, dtype=jnp.dtype(h1["dtype"]).name)
    if T > cfg.capacity_tokens:
        raise CapacityError(f"the saved tree holds {T} tokens, more than the config's "
                            f"capacity of {cfg.capacity_tokens}; raise capacity_blocks or use "
                            "HostTree")
    levels = [_open_level(path, l, K=K, width=cfg.d, dtype=jnp.dtype(cfg.dtype))
              for l in range(1, depth + 1)]
    _levels_consistent(path, T, [h["rows"] for h, _ in levels], K)
    tree = tr.init_tree(cfg)
    tokens = np.zeros(tree.tokens_T.shape, np.int32)
    tokens[:T] = tok[:T, 0]
    gists = []
    for (h, arr), rows in zip(levels, tree.gists):
        g = np.zeros(rows.shape, rows.dtype)
        g[:h["rows"]] = arr[:h["rows"]]
        gists.append(jnp.asarray(g))
    return tr.Tree(tokens_T=jnp.asarray(tokens), num_tokens=jnp.asarray(T, jnp.int32),
                   gists=tuple(gists), error=jnp.zeros((), jnp.int32)), cfg


# ----------------------------------------------------------------------------- working context

def save_wc(wc: wcm.WorkingContext, cfg: wcm.WCConfig, path) -> None:
    wcm.check_wc(wc, cfg)
    h = jax.device_get(wc)
    E = cfg.max_entries
    scal = np.zeros(E, np.int32)
    scal[:6] = [int(h.num_entries), int(h.num_tokens), int(h.error), cfg.w_max, cfg.depth,
                cfg.protected_blocks]
    table = np.stack([h.level_E, h.node_E, h.cost_E, h.valid_E.astype(np.int32), h.age_E,
                      scal]).astype(np.int32)
    Path(path).mkdir(parents=True, exist_ok=True)
    _write(_level_path(path, WC_LEVEL), WC_LEVEL, cfg.block_size, table)


def load_wc(path, cfg: wcm.WCConfig) -> wcm.WorkingContext:
    h, arr = _open_level(path, WC_LEVEL, K=cfg.block_size, width=cfg.max_entries,
                         dtype=np.int32)
    if h["rows"] != 6:
        raise CorruptFileError(f"{h['path']}: a WC file has 6 rows, found {h['rows']}")
    t = np.array(arr[:6])
    n, T, err, w_max, depth, prot = (int(x) for x in t[5, :6])
    if (w_max, depth, prot) != (cfg.w_max, cfg.depth, cfg.protected_blocks):
        raise CorruptFileError(f"{h['path']}: saved for w_max={w_max}, depth={depth}, "
                               f"protected_blocks={prot}; config has {cfg.w_max}, "
                               f"{cfg.depth}, {cfg.protected_blocks}")
    return wcm.WorkingContext(
        level_E=jnp.asarray(t[0]), node_E=jnp.asarray(t[1]), cost_E=jnp.asarray(t[2]),
        valid_E=jnp.asarray(t[3].astype(bool)), age_E=jnp.asarray(t[4]),
        num_entries=jnp.asarray(n, jnp.int32), num_tokens=jnp.asarray(T, jnp.int32),
        error=jnp.asarray(err, jnp.int32))


# ----------------------------------------------------------------------------- host tree

class HostTree:
    """A tree whose levels are numpy memmaps (host RAM / disk), for histories beyond device
    capacity. Grows in place up to the rows allocated at `create`; `flush` rewrites the
    checksums so the directory is a valid saved tree again."""

    def __init__(self, path, K, tokens, gists, num_tokens, writable):
        self.path, self.block_size = Path(path), K
        self.tokens_Tx1, self.gists = tokens, gists
        self.num_tokens, self.writable = num_tokens, writable

    @property
    def depth(self) -> int:
        return len(self.gists)

    @property
    def d(self) -> int:
        return self.gists[0].shape[1]

    def counts(self) -> list[int]:
        return [self.num_tokens // self.block_size ** l for l in range(1, self.depth + 1)]

    @classmethod
    def create(cls, path, cfg: tr.TreeConfig) -> "HostTree":
        """An empty host tree with room for cfg.capacity_tokens (files are sparse)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        K = cfg.block_size
        _write(_level_path(path, 0), 0, K, np.zeros((0, 1), np.int32),
               alloc=cfg.capacity_tokens)
        for level in range(1, cfg.depth + 1):
            _write(_level_path(path, level), level, K,
                   np.zeros((0, cfg.d), jnp.dtype(cfg.dtype)), alloc=cfg.level_capacity(level))
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path, writable: bool = False, verify: bool = True) -> "HostTree":
        mode = "r+" if writable else "r"
        h0, tok = _open_level(path, 0, width=1, dtype=np.int32, verify=verify, mode=mode)
        K = h0["block_size"]
        depth = saved_depth(path)
        if depth == 0:
            raise CorruptFileError(f"{path}: no gist level files (level1.mct missing)")
        width = read_header(_level_path(path, 1))["width"]
        levels = [_open_level(path, l, K=K, width=width, verify=verify, mode=mode)
                  for l in range(1, depth + 1)]
        _levels_consistent(path, h0["rows"], [h["rows"] for h, _ in levels], K)
        return cls(path, K, tok, [a for _, a in levels], h0["rows"], writable)

    def append(self, ids, embed_fn, gist_fn) -> None:
        """Append token ids on the host; gists of the nodes they complete are computed with
        gist_fn (one batched call per level) and written into the memmaps."""
        if not self.writable:
            raise PermissionError(f"{self.path}: opened read-only; use HostTree.open(..., "
                                  "writable=True)")
        ids = np.asarray(ids)
        if ids.dtype != np.int32:
            raise tr.TokenDtypeError(f"token ids must be int32, got {ids.dtype}")
        K, T0 = self.block_size, self.num_tokens
        T1 = T0 + ids.size
        if T1 > self.tokens_Tx1.shape[0]:
            raise CapacityError(f"{self.path}: {T1} tokens exceed the host tree's "
                                f"{self.tokens_Tx1.shape[0]}; nothing was appended")
        self.tokens_Tx1[T0:T1, 0] = ids
        lo, hi = T0 // K, T1 // K  # new level-1 nodes [lo, hi)
        for level in range(1, self.depth + 1):
            if hi <= lo:
                break
            if level == 1:
                kids = embed_fn(jnp.asarray(self.tokens_Tx1[lo * K:hi * K, 0].reshape(-1, K)))
            else:
                kids = jnp.asarray(self.gists[level - 2][lo * K:hi * K]).reshape(-1, K, self.d)
            self.gists[level - 1][lo:hi] = np.asarray(gist_fn(level, kids)).astype(
                self.gists[level - 1].dtype)
            lo, hi = lo // K, hi // K
        self.num_tokens = T1

    def flush(self) -> None:
        """Write the rows in use and the checksums into the headers."""
        K = self.block_size
        arrays = [(0, self.tokens_Tx1, self.num_tokens)] + [
            (l, a, n) for l, (a, n) in enumerate(zip(self.gists, self.counts()), start=1)]
        for level, arr, rows in arrays:
            arr.flush()
            header = _pack_header(level, K, arr.shape[1], arr.dtype, rows, arr.shape[0],
                                  _crc(arr[:rows]))
            with open(_level_path(self.path, level), "r+b") as f:
                f.write(header)

    def gather(self, wc: wcm.WorkingContext, wcfg: wcm.WCConfig) -> mat.EntryData:
        """Page in what the WC needs: a gather by its entries' node indices (host side).

        Same result as `working_context.gather_entries` on a device tree with this content.
        """
        K, E = self.block_size, wcfg.max_entries
        h = jax.device_get(wc)
        if int(h.num_tokens) > self.num_tokens:
            raise CapacityError(f"the WC covers {int(h.num_tokens)} tokens, the host tree "
                                f"holds {self.num_tokens}")
        level, node, valid = np.asarray(h.level_E), np.asarray(h.node_E), np.asarray(h.valid_E)
        is_tok = valid & (level == 0)
        tokens = np.zeros((E, K), np.int32)
        idx = np.nonzero(is_tok)[0]
        if idx.size:
            t_idx = node[idx, None] * K + np.arange(K)[None, :]
            got = self.tokens_Tx1[np.clip(t_idx, 0, self.num_tokens - 1).reshape(-1), 0]
            tokens[idx] = np.where(t_idx < self.num_tokens, got.reshape(-1, K), 0)
        vec = np.zeros((E, self.d), self.gists[0].dtype)
        complete = is_tok & (node < int(h.num_tokens) // K)
        view = np.where(level == 0, 1, level)
        for l in range(1, self.depth + 1):
            sel = np.nonzero(valid & (view == l) & ((level > 0) | complete))[0]
            if sel.size:
                vec[sel] = self.gists[l - 1][node[sel]]
        return mat.EntryData(tokens_ExK=jnp.asarray(tokens), vec_ExD=jnp.asarray(vec))
