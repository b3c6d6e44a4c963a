"""Training data: prepare the `mc_jax_corpus` dataset, then stream fixed-length windows.

Data flow: corpora -> `prepare_data` (TFDS ArrayRecord, one example per document) ->
`open_split` (random-access `tfds` data source) -> `make_window_dataset` (Grain: window index,
shuffle, repeat, batch, per-process shard) -> `make_batch_iterator` (global jax arrays on a mesh,
checkpointable with `grain.checkpoint.CheckpointSave/Restore` or `get_state`/`set_state`).

Windows: every document with at least T tokens gives windows at offsets 0, S, 2S, ... plus one
ending exactly at the document's end (S = stride, default T). Shorter documents are skipped, never
concatenated: a window never spans two unrelated documents, so gists and horizons never see a
document boundary. The (document, offset) index is deterministic; Grain shuffles it per epoch.

Shapes: B global batch, b = B / process_count the process-local batch, T window length.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

import grain
import jax
import numpy as np
import tensorflow_datasets as tfds
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from mc_jax.data.corpus import (DATASET_NAME, DEFAULT_MIN_DOC_TOKENS, DEFAULT_VALIDATION_PERCENT,
                           SOURCES, VERSION, CorpusConfig, McJaxCorpus, TokenizerIdentity,
                           TokenizerLike, TokenizerMismatchError, check_tokenizer,
                           corpus_documents, make_config, register_tokenizer,
                           tokenizer_identity)
from mc_jax.base import loading
from mc_jax.errors import ConfigError, MissingResourceError

__all__ = [
    "SOURCES", "TokenizerMismatchError", "register_tokenizer", "tokenizer_identity",
    "default_data_dir", "dataset_dir", "PreparedData", "prepare_data", "add_prepare_data_args",
    "run_prepare_data", "prepare_data_cli", "open_split", "open_dataset_dir", "WindowConfig",
    "window_index", "make_window_dataset", "BatchIterator", "make_batch_iterator",
]


def default_data_dir() -> Path:
    """`$MC_JAX_DATA`, else `~/.cache/mc_jax/data`."""
    return Path(os.environ.get("MC_JAX_DATA") or Path.home() / ".cache" / "mc_jax" / "data")


def dataset_dir(data_dir: str | os.PathLike | None, config: CorpusConfig) -> Path:
    return Path(data_dir or default_data_dir()) / DATASET_NAME / config.name / VERSION


# ----------------------------------------------------------------------------------------------
# Preparing.

@dataclasses.dataclass(frozen=True)
class PreparedData:
    path: Path  # the dataset version directory
    config_name: str
    built: bool  # False when it was already there
    stats: dict  # {split: {source: {"docs", "tokens", "skipped_short"}}}


def prepare_data(data_dir: str | os.PathLike | None = None,
                 tokenizer: TokenizerLike | None = None, *,
                 sources: Sequence[str] = SOURCES,
                 min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                 validation_percent: float = DEFAULT_VALIDATION_PERCENT,
                 stdlib_dir: str | None = None, pydoc_dir: str | None = None,
                 bible_cmd: str | None = None, progress: bool = True) -> PreparedData:
    """Tokenises the corpora into `data_dir` as `mc_jax_corpus/<config>/<version>`; idempotent.

    `tokenizer` defaults to `mc_jax.base.loading.load_tokenizer()`. A missing corpus raises
    MissingResourceError naming the Debian package; stdlib always works.
    """
    if tokenizer is None:
        tokenizer = loading.load_tokenizer()
    config = make_config(tokenizer, sources=sources, min_doc_tokens=min_doc_tokens,
                         validation_percent=validation_percent, stdlib_dir=stdlib_dir,
                         pydoc_dir=pydoc_dir, bible_cmd=bible_cmd)
    path = dataset_dir(data_dir, config)
    if (path / "dataset_info.json").exists():
        builder = _read_builder(path, tokenizer)
        return PreparedData(path, config.name, False, _stats(builder))
    for source in config.sources:  # fail before TFDS creates anything
        corpus_documents(source, config)
    builder = McJaxCorpus(data_dir=os.fspath(data_dir or default_data_dir()), config=config,
                          tokenizer=tokenizer, progress=progress)
    from tensorflow_datasets.core.utils import tqdm_utils
    shown = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)  # ours counts documents; TFDS's would repeat it
    try:
        builder.download_and_prepare()
    finally:
        tfds.display_progress_bar(shown)
    return PreparedData(Path(builder.data_dir), config.name, True, _stats(builder))


def _stats(builder) -> dict:
    return json.loads(json.dumps(dict(builder.info.metadata or {}).get("stats", {})))


def format_stats(stats: dict) -> str:
    rows = [("split", "source", "docs", "tokens", "skipped")]
    for split in sorted(stats):
        for source in SOURCES:
            if source in stats[split]:
                s = stats[split][source]
                rows.append((split, source, str(s["docs"]), f"{s['tokens']:,}",
                             str(s["skipped_short"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    return "\n".join("  ".join(c.rjust(w) if i >= 2 else c.ljust(w)
                               for i, (c, w) in enumerate(zip(r, widths))) for r in rows)


def add_prepare_data_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `mc-jax prepare-data`."""
    parser.add_argument("--data-dir", default=None,
                        help="where datasets live (default: $MC_JAX_DATA or ~/.cache/mc_jax/data)")
    parser.add_argument("--sources", default=",".join(SOURCES),
                        help=f"comma-separated corpora from {','.join(SOURCES)} (default: all)")
    parser.add_argument("--min-doc-tokens", type=int, default=DEFAULT_MIN_DOC_TOKENS,
                        help="drop documents shorter than this many tokens")
    parser.add_argument("--validation-percent", type=float, default=DEFAULT_VALIDATION_PERCENT,
                        help="share of documents (by name hash) in the validation split")
    parser.add_argument("--base", default=None,
                        help="base model whose tokenizer to use (default: the default base)")
    parser.add_argument("--stdlib-dir", default=None, help="Python stdlib sources to read")
    parser.add_argument("--pydoc-dir", default=None,
                        help="Python docs reST sources (default: python3.11-doc's _sources)")
    parser.add_argument("--bible-cmd", default=None, help="the bible-kjv reader executable")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def run_prepare_data(args: argparse.Namespace) -> int:
    """Runs `prepare-data` from parsed arguments; prints where the data is and its statistics."""
    sources = [s.strip() for s in args.sources.split(",") if s.strip()]
    prepared = prepare_data(args.data_dir, loading.load_tokenizer(args.base), sources=sources,
                            min_doc_tokens=args.min_doc_tokens,
                            validation_percent=args.validation_percent,
                            stdlib_dir=args.stdlib_dir, pydoc_dir=args.pydoc_dir,
                            bible_cmd=args.bible_cmd, progress=not args.no_progress)
    state = "prepared" if prepared.built else "already prepared"
    print(f"{DATASET_NAME}/{prepared.config_name} {state} at {prepared.path}")
    print(format_stats(prepared.stats))
    return 0


def prepare_data_cli(argv: Sequence[str] | argparse.Namespace | None = None) -> int:
    """`mc-jax prepare-data`: from command-line words, or from already-parsed arguments."""
    if isinstance(argv, argparse.Namespace):
        return run_prepare_data(argv)
    parser = argparse.ArgumentParser(
        prog="mc-jax prepare-data",
        description="Tokenise the offline corpora into the mc_jax_corpus TFDS dataset.")
    add_prepare_data_args(parser)
    return run_prepare_data(parser.parse_args(argv))


# ----------------------------------------------------------------------------------------------
# Reading.

def _read_builder(path: Path, tokenizer: TokenizerLike | TokenizerIdentity):
    builder = tfds.builder_from_directory(os.fspath(path))
    meta = dict(builder.info.metadata or {})
    if "tokenizer" not in meta:
        raise MissingResourceError(f"{path} is not an {DATASET_NAME} dataset (no tokenizer "
                                   "metadata); run `mc-jax prepare-data`")
    check_tokenizer(TokenizerIdentity(**meta["tokenizer"]), tokenizer,
                    where=f"the dataset at {path}")
    return builder


def open_dataset_dir(path: str | os.PathLike, split: str,
                     tokenizer: TokenizerLike | TokenizerIdentity):
    """Random-access data source of `split` in a prepared dataset directory.

    Raises TokenizerMismatchError if the data was tokenised with a different tokenizer.
    """
    builder = _read_builder(Path(path), tokenizer)
    if split not in builder.info.splits:
        raise ConfigError(f"no split {split!r} in {path}; have {list(builder.info.splits)}")
    return builder.as_data_source(split)


def open_split(split: str, tokenizer: TokenizerLike | TokenizerIdentity, *,
               data_dir: str | os.PathLike | None = None, sources: Sequence[str] = SOURCES,
               min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
               validation_percent: float = DEFAULT_VALIDATION_PERCENT,
               stdlib_dir: str | None = None, pydoc_dir: str | None = None,
               bible_cmd: str | None = None):
    """The `split` ('train' | 'validation') of the dataset `prepare_data` made with these options.

    Raises TokenizerMismatchError when `data_dir` holds this dataset only for other tokenizers,
    MissingResourceError when it is not prepared at all.
    """
    config = make_config(tokenizer, sources=sources, min_doc_tokens=min_doc_tokens,
                         validation_percent=validation_percent, stdlib_dir=stdlib_dir,
                         pydoc_dir=pydoc_dir, bible_cmd=bible_cmd)
    path = dataset_dir(data_dir, config)
    if not (path / "dataset_info.json").exists():
        _, _, rest = config.name.partition(".")
        others = sorted(p.parent for p in path.parent.parent.glob(f"*.{rest}/{VERSION}")
                        if (p / "metadata.json").exists()) if rest else []
        if others:
            made = [TokenizerIdentity(**json.loads((o / VERSION / "metadata.json").read_text())
                                      ["tokenizer"]).describe() for o in others]
            ident = tokenizer if isinstance(tokenizer, TokenizerIdentity) else (
                tokenizer_identity(tokenizer))
            raise TokenizerMismatchError(
                f"{path.parent.parent} holds {DATASET_NAME} ({'+'.join(config.sources)}) only "
                f"for tokenizer(s) {'; '.join(made)}, not for {ident.describe()}. Run "
                f"`mc-jax prepare-data --data-dir {path.parent.parent.parent}` with this model.")
        raise MissingResourceError(
            f"{DATASET_NAME}/{config.name} is not prepared in {path.parent.parent.parent}; run "
            f"`mc-jax prepare-data --data-dir {path.parent.parent.parent} --sources "
            f"{','.join(config.sources)}`")
    return open_dataset_dir(path, split, tokenizer)


# ----------------------------------------------------------------------------------------------
# Windows.

@dataclasses.dataclass(frozen=True)
class WindowConfig:
    """Static settings of the window stream; part of the checkpointed state's signature."""

    window_len: int  # T: tokens per example (context C plus any horizon tokens)
    global_batch: int  # B, over all processes
    stride: int | None = None  # between window starts in a document; None = window_len
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None  # None = repeat forever
    num_threads: int = 2  # Grain reader threads (no worker processes)
    prefetch: int = 4  # batches read ahead

    def __post_init__(self):
        if self.window_len < 1 or self.global_batch < 1:
            raise ConfigError(f"window_len and global_batch must be >= 1: {self}")
        if self.stride is not None and self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")
        if self.num_epochs is not None and self.num_epochs < 1:
            raise ConfigError(f"num_epochs must be >= 1 or None, got {self.num_epochs}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"seed must be in [0, 2**32), got {self.seed}")


def window_index(num_tokens_N: np.ndarray, window_len: int,
                 stride: int | None = None) -> np.ndarray:
    """int64[W, 2] of (document, offset): every window of `window_len` tokens, by document.

    Offsets 0, stride, 2*stride, ... and, if that misses the end, one window ending at the end.
    Documents shorter than `window_len` give none.
    """
    stride = stride or window_len
    rows = []
    for doc, n in enumerate(np.asarray(num_tokens_N, np.int64)):
        if n < window_len:
            continue
        offsets = np.arange(0, n - window_len + 1, stride, dtype=np.int64)
        if offsets[-1] != n - window_len:
            offsets = np.append(offsets, n - window_len)
        rows.append(np.stack([np.full_like(offsets, doc), offsets], axis=1))
    return np.concatenate(rows) if rows else np.zeros((0, 2), np.int64)


def document_lengths(source) -> np.ndarray:
    """int64[N]: `num_tokens` of every document of a data source (reads each once)."""
    n = len(source)
    out = np.zeros(n, np.int64)
    for start in range(0, n, 256):
        idx = list(range(start, min(n, start + 256)))
        items = source.__getitems__(idx) if hasattr(source, "__getitems__") else [
            source[i] for i in idx]
        out[start:start + len(idx)] = [int(x["num_tokens"]) for x in items]
    return out


class _ReadWindow(grain.transforms.Map):
    """Window id -> {'tokens': int32[T], 'doc_index': int32, 'offset': int32}."""

    def __init__(self, source, windows_Wx2: np.ndarray, window_len: int):
        self._source = source
        self._windows = windows_Wx2
        self._len = window_len

    def map(self, window_id):
        doc, offset = (int(v) for v in self._windows[window_id])
        tokens = np.asarray(self._source[doc]["tokens"][offset:offset + self._len], np.int32)
        return {"tokens": tokens, "doc_index": np.int32(doc), "offset": np.int32(offset)}


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    index = jax.process_index() if process_index is None else process_index
    count = jax.process_count() if process_count is None else process_count
    if not 0 <= index < count:
        raise ConfigError(f"process_index {index} not in [0, {count})")
    return index, count


def make_window_dataset(source, config: WindowConfig, *, process_index: int | None = None,
                        process_count: int | None = None,
                        windows_Wx2: np.ndarray | None = None) -> grain.IterDataset:
    """Grain dataset of this process's batches: dicts of numpy `tokens` int32[b, T],
    `doc_index` int32[b], `offset` int32[b] (b = B / process_count).

    Global batch k is windows k*B .. k*B+B-1 of the shuffled, repeated window stream; process p
    holds its rows p*b .. p*b+b-1, so the global batch does not depend on the process count.
    A last incomplete global batch is dropped.
    """
    index, count = _process(process_index, process_count)
    if config.global_batch % count:
        raise ConfigError(f"global_batch {config.global_batch} is not divisible by the "
                          f"{count} processes")
    local_batch = config.global_batch // count
    if windows_Wx2 is None:
        windows_Wx2 = window_index(document_lengths(source), config.window_len, config.stride)
    if len(windows_Wx2) == 0:
        raise ConfigError(f"no document has window_len={config.window_len} tokens; lower the "
                          "window length or prepare the data with more/longer documents")
    ds = grain.MapDataset.range(len(windows_Wx2))
    if config.shuffle:
        ds = ds.shuffle(seed=config.seed)  # reshuffled each epoch by repeat
    ds = ds.repeat(config.num_epochs)
    ds = ds.map(_ReadWindow(source, windows_Wx2, config.window_len))
    ds = ds.batch(local_batch, drop_remainder=True)
    ds = ds[:len(ds) // count * count]  # whole global batches only
    ds = ds[index::count]
    return ds.to_iter_dataset(grain.ReadOptions(num_threads=config.num_threads,
                                                prefetch_buffer_size=config.prefetch))


class BatchIterator(grain.DatasetIterator):
    """Yields global batches as jax arrays; `get_state`/`set_state` resume exactly.

    With a mesh, arrays are sharded over `data_axis` on the batch dimension (NamedSharding,
    assembled with `jax.make_array_from_process_local_data`); without one, on the default device.
    Works with `grain.checkpoint.CheckpointSave/CheckpointRestore` in an Orbax CheckpointManager.
    """

    def __init__(self, parent: grain.DatasetIterator, *, global_batch: int,
                 mesh: Mesh | None, data_axis: str, signature: str):
        super().__init__(parent)
        self._global_batch = global_batch
        self._sharding = NamedSharding(mesh, PartitionSpec(data_axis)) if mesh else None
        self._signature = signature

    def __next__(self) -> dict[str, jax.Array]:
        local = next(self._parent)
        if self._sharding is None:
            return {k: jax.device_put(v) for k, v in local.items()}
        return {k: jax.make_array_from_process_local_data(
                    self._sharding, v, (self._global_batch,) + v.shape[1:])
                for k, v in local.items()}

    def get_state(self) -> dict[str, Any]:
        return {"signature": self._signature, "grain": self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("signature") != self._signature:
            raise ConfigError(
                "data iterator state is for a different pipeline (dataset, window, batch, seed "
                f"or process layout changed): saved {state.get('signature')!r}, "
                f"now {self._signature!r}")
        self._parent.set_state(state["grain"])

    def __str__(self) -> str:
        return f"BatchIterator(global_batch={self._global_batch}, sharding={self._sharding})"


def make_batch_iterator(source, config: WindowConfig, *, mesh: Mesh | None = None,
                        data_axis: str = "data", process_index: int | None = None,
                        process_count: int | None = None) -> BatchIterator:
    """`make_window_dataset` as global jax arrays: `tokens` int32[B, T], `doc_index`, `offset`."""
    index, count = _process(process_index, process_count)
    if mesh is None and count > 1:
        raise ConfigError("several processes need a mesh to assemble global batches")
    if mesh is not None:
        if data_axis not in mesh.shape:
            raise ConfigError(f"mesh has no axis {data_axis!r}: {dict(mesh.shape)}")
        if config.global_batch % mesh.shape[data_axis]:
            raise ConfigError(f"global_batch {config.global_batch} is not divisible by the "
                              f"{mesh.shape[data_axis]} devices of mesh axis {data_axis!r}")
    windows_Wx2 = window_index(document_lengths(source), config.window_len, config.stride)
    ds = make_window_dataset(source, config, process_index=index, process_count=count,
                             windows_Wx2=windows_Wx2)
    signature = hashlib.sha256(json.dumps(
        [repr(dataclasses.replace(config, num_threads=0, prefetch=0)), index, count, len(source),
         hashlib.sha256(windows_Wx2.tobytes()).hexdigest()]).encode()).hexdigest()[:16]
    return BatchIterator(iter(ds), global_batch=config.global_batch, mesh=mesh,
                         data_axis=data_axis, signature=signature)


if __name__ == "__main__":
    sys.exit(prepare_data_cli())
