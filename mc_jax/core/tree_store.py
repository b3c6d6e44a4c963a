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
    56     4     CRC32 of header bytes [0, 56) and [60, 64) (uint32; version 1: [0, 56))
    60     4     depth of the tree the file belongs to (uint32; 0 for a WC file; version 1: 0)

Loading checks magic, version, header checksum, file length (exact), level, block size, width
and dtype against each other and against a config, that the level files are exactly levels
0..depth (the depth every header records; version-1 files, which do not record it, must be
contiguous), then the payload checksum; anything wrong raises `CorruptFileError` naming the
file and the problem.

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
VERSION = 2
READS = (1, 2)  # version 1: no depth field (bytes 60..64 are zero, outside the header CRC)
HEADER = struct.Struct("<8sIiII12sQQIII")
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


def _header_crc(raw: bytes, version: int) -> int:
    return zlib.crc32(raw[:56] + (raw[60:64] if version >= 2 else b""))


def _pack_header(level, K, width, dtype, rows, alloc, crc, depth) -> bytes:
    name = np.dtype(dtype).name.encode()
    body = HEADER.pack(MAGIC, VERSION, level, K, width, name, rows, alloc, crc, 0, depth)
    return body[:56] + struct.pack("<I", _header_crc(body, VERSION)) + body[60:]


def _write(path: Path, level, K, arr_NxW: np.ndarray, depth: int,
           alloc: int | None = None) -> None:
    """Write a level file atomically (temp file + rename)."""
    rows, width = arr_NxW.shape
    alloc = rows if alloc is None else alloc
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(_pack_header(level, K, width, arr_NxW.dtype, rows, alloc, _crc(arr_NxW), depth))
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
    magic, version, level, K, width, name, rows, alloc, crc, _, depth = HEADER.unpack(raw)
    if magic != MAGIC:
        raise CorruptFileError(f"{path}: not an mc_jax tree file (magic {magic!r})")
    if version not in READS:
        raise CorruptFileError(f"{path}: file version {version}, this code reads versions "
                               f"{', '.join(map(str, READS))}")
    if struct.unpack("<I", raw[56:60])[0] != _header_crc(raw, version):
        raise CorruptFileError(f"{path}: header checksum mismatch (corrupt header)")
    try:
        dtype = np.dtype(jnp.dtype(name.rstrip(b"\0").decode()))
    except (TypeError, UnicodeDecodeError) as e:
        raise CorruptFileError(f"{path}: unknown dtype {name!r}") from e
    if dtype.name not in ("int32", "float32", "bfloat16", "float16"):
        raise CorruptFileError(f"{path}: dtype {dtype.name} is not one a tree stores")
    if K < 1 or width < 1 or level < WC_LEVEL or (version >= 2 and level > depth):
        raise CorruptFileError(f"{path}: impossible header (level {level}, depth {depth}, "
                               f"block size {K}, width {width})")
    if rows > alloc:
        raise CorruptFileError(f"{path}: {rows} rows in use but only {alloc} allocated")
    want = HEADER.size + alloc * width * dtype.itemsize
    if size != want:
        raise CorruptFileError(f"{path}: {'truncated: ' if size < want else ''}{size} bytes, "
                               f"the header promises {want}")
    return dict(level=level, block_size=K, width=width, dtype=dtype, rows=rows, alloc=alloc,
                crc=crc, path=path, depth=depth if version >= 2 else None)


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
    _write(_level_path(path, 0), 0, K, np.asarray(h.tokens_T[:T], np.int32).reshape(T, 1),
           cfg.depth)
    for level in range(1, cfg.depth + 1):
        n = T // K ** level
        _write(_level_path(path, level), level, K, np.asarray(h.gists[level - 1])[:n], cfg.depth)
    for f in path.glob("level*.mct"):  # the deeper levels of a tree this one replaces
        if f.name[5:-4].isdigit() and int(f.name[5:-4]) > cfg.depth:
            f.unlink()


def saved_depth(path, h0: dict | None = None) -> int:
    """The saved tree's depth: the one its headers record (version 2), every level file
    1..depth present and no other; version-1 files must be contiguous levels."""
    path = Path(path)
    h0 = h0 or read_header(_level_path(path, 0))
    found = sorted(int(f.name[5:-4]) for f in path.glob("level*.mct")
                   if f.name[5:-4].isdigit())
    depth = h0["depth"] if h0["depth"] is not None else (found[-1] if found else 0)
    if depth == 0:
        raise CorruptFileError(f"{path}: no gist level files (level1.mct missing)")
    missing = [l for l in range(1, depth + 1) if l not in found]
    if missing:
        raise CorruptFileError(f"{_level_path(path, missing[0])}: missing level file (the saved "
                               f"tree has depth {depth}; it is incomplete)")
    extra = [l for l in found if l > depth]
    if extra:
        raise CorruptFileError(f"{_level_path(path, extra[0])}: not part of the saved tree "
                               f"(depth {depth}, recorded in level0.mct); it comes from another "
                               "tree")
    return depth


def _open_levels(path, h0, K, width, dtype=None, verify=True, mode="r"):
    depth = saved_depth(path, h0)
    levels = [_open_level(path, l, K=K, width=width, dtype=dtype, verify=verify, mode=mode)
              for l in range(1, depth + 1)]
    for h, _ in levels:
        if h["depth"] != h0["depth"]:
            raise CorruptFileError(f"{h['path']}: records depth {h['depth']}, level0.mct "
                                   f"{h0['depth']}; the level files come from different trees")
    _levels_consistent(path, h0["rows"], [h["rows"] for h, _ in levels], K)
    return levels


def load_tree(path, cfg: tr.TreeConfig | None = None) -> tuple[tr.Tree, tr.TreeConfig]:
    """Read a saved tree into device arrays, verifying headers and checksums.

    With cfg: it must match the files (block size, depth, d, dtype) and hold the history.
    Without: a config just big enough is derived from the files.
    """
    path = Path(path)
    h0, tok = _open_level(path, 0, K=cfg.block_size if cfg else None, width=1,
                          dtype=np.int32)
    K, T = h0["block_size"], h0["rows"]
    depth = saved_depth(path, h0)
    if cfg is not None and depth != cfg.depth:
        raise CorruptFileError(f"{path}: saved tree has depth {depth}, config wants "
                               f"{cfg.depth}")
    h1 = read_header(_level_path(path, 1))
    if cfg is None:
        cfg = tr.TreeConfig(d=h1["width"], capacity_blocks=max(1, -(-T // K)), depth=depth,
                            block_size=K, dtype=jnp.dtype(h1["dtype"]).name)
    if T > cfg.capacity_tokens:
        raise CapacityError(f"the saved tree holds {T} tokens, more than the config's "
                            f"capacity of {cfg.capacity_tokens}; raise capacity_blocks or use "
                            "HostTree")
    levels = _open_levels(path, h0, K, cfg.d, jnp.dtype(cfg.dtype))
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
    _write(_level_path(path, WC_LEVEL), WC_LEVEL, cfg.block_size, table, 0)


def load_wc(path, cfg: wcm.WCConfig) -> wcm.WorkingContext:
    h, arr = _open_level(path, WC_LEVEL, K=cfg.block_size, width=cfg.max_entries,
                         dtype=np.int32)
    if h["rows"] != 6:
        raise CorruptFileError(f"{h['path']}: a WC file has 6 rows, found {h['rows']}")
    t = np.array(arr[:6])
    n, T, err, w_max, depth, prot = (int(x) for x in t[5, :6])
    valid, level = t[3].astype(bool), t[0]
    if not (0 <= n <= cfg.max_entries and T >= 0 and int(valid.sum()) == n
            and np.all((level[valid] >= 0) & (level[valid] <= depth))):
        raise CorruptFileError(f"{h['path']}: impossible WC ({n} entries, {T} tokens, "
                               f"{int(valid.sum())} valid); the file was altered")
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
        _write(_level_path(path, 0), 0, K, np.zeros((0, 1), np.int32), cfg.depth,
               alloc=cfg.capacity_tokens)
        for level in range(1, cfg.depth + 1):
            _write(_level_path(path, level), level, K, np.zeros((0, cfg.d), jnp.dtype(cfg.dtype)),
                   cfg.depth, alloc=cfg.level_capacity(level))
        return cls.open(path, writable=True)

    @classmethod
    def open(cls, path, writable: bool = False, verify: bool = True) -> "HostTree":
        mode = "r+" if writable else "r"
        h0, tok = _open_level(path, 0, width=1, dtype=np.int32, verify=verify, mode=mode)
        saved_depth(path, h0)
        width = read_header(_level_path(path, 1))["width"]
        levels = _open_levels(path, h0, h0["block_size"], width, verify=verify, mode=mode)
        return cls(path, h0["block_size"], tok, [a for _, a in levels], h0["rows"], writable)

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
                                  _crc(arr[:rows]), self.depth)
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
