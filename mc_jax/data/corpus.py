"""The `mc_jax_corpus` TFDS dataset: tokenised long documents from offline corpora.

One example per document (a stdlib module, a Python-docs reST file, a KJV Bible book):

  tokens      int32[T]  the document's token ids (`tokenizer.encode(text)`, nothing added)
  source      str       'stdlib' | 'pydoc' | 'kjv'
  name        str       path relative to the corpus root, or the Bible book's name
  num_tokens  int32     T

Splits are by document: a document goes to `validation` when a hash of `source/name` falls in
the first `validation_percent` of the hash range, so a document never moves between splits when
other documents are added or removed. Documents shorter than `min_doc_tokens` are dropped.

The builder needs a tokenizer. It is passed as the builder kwarg `tokenizer=` (or registered with
`register_tokenizer` and found by name), and its identity (name, vocab size, fingerprint) is part
of the config name and of the stored metadata, so data built with one tokenizer is never read
with another (`TokenizerMismatchError`). Files are ArrayRecord, read with `tfds.data_source`
without tensorflow.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import tensorflow_datasets as tfds

from mc_jax.errors import ConfigError, MissingResourceError

DATASET_NAME = "mc_jax_corpus"
VERSION = "1.0.0"
SOURCES = ("stdlib", "pydoc", "kjv")
DEFAULT_MIN_DOC_TOKENS = 512
DEFAULT_VALIDATION_PERCENT = 5.0
DEFAULT_PYDOC_DIR = "/usr/share/doc/python3.11/html/_sources"
DEFAULT_BIBLE_CMD = "bible"
DEBIAN_PACKAGES = {"pydoc": "python3.11-doc", "kjv": "bible-kjv-text bible-kjv"}

# Probe text for tokenizers without a `fingerprint`: the hash of its encoding identifies them.
_PROBE_TEXT = (
    "def f(x):\n    return x ** 2  # 0123456789\n"
    "In the beginning God created the heaven and the earth.\n"
    ".. note:: ``reST`` *markup* — naïve café, 日本語, emoji 🙂, tabs\tand  spaces.\n"
)


class TokenizerMismatchError(ConfigError):
    """A dataset built with one tokenizer opened with another."""


class TokenizerLike(Protocol):
    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
    """What makes two tokenizers interchangeable for stored token ids."""

    name: str
    vocab_size: int
    fingerprint: str

    @property
    def slug(self) -> str:
        """Short, path-safe id used in the config name."""
        name = re.sub(r"[^A-Za-z0-9]+", "-", self.name).strip("-").lower() or "tok"
        return f"{name}-{self.vocab_size}-{self.fingerprint[:8]}"

    def describe(self) -> str:
        return f"{self.name} (vocab {self.vocab_size}, fingerprint {self.fingerprint[:16]})"


def tokenizer_identity(tokenizer: TokenizerLike) -> TokenizerIdentity:
    """Name, vocab size and fingerprint of `tokenizer`.

    Uses the tokenizer's own `name`, `vocab_size` and `fingerprint` when it has them; otherwise
    the class name, and a hash of how it encodes a fixed probe text.
    """
    name = str(getattr(tokenizer, "name", None) or type(tokenizer).__name__)
    vocab = getattr(tokenizer, "vocab_size", None)
    if callable(vocab):
        vocab = vocab()
    probe = hashlib.sha256(np.asarray(tokenizer.encode(_PROBE_TEXT), np.int64).tobytes())
    if vocab is None:
        vocab = -1
    fingerprint = getattr(tokenizer, "fingerprint", None)
    if callable(fingerprint):
        fingerprint = fingerprint()
    if not fingerprint:
        fingerprint = probe.hexdigest()
    return TokenizerIdentity(name=name, vocab_size=int(vocab), fingerprint=str(fingerprint))


_TOKENIZERS: dict[str, TokenizerLike] = {}


def register_tokenizer(tokenizer: TokenizerLike) -> TokenizerIdentity:
    """Makes `tokenizer` findable by a builder made without `tokenizer=` (e.g. `tfds.builder`)."""
    ident = tokenizer_identity(tokenizer)
    _TOKENIZERS[ident.slug] = tokenizer
    return ident


# ----------------------------------------------------------------------------------------------
# Corpora: each yields (name, load_text) pairs without reading the text yet.

Document = tuple[str, Callable[[], str]]


def default_stdlib_dir() -> str:
    return sysconfig.get_paths()["stdlib"]


def _read(path: Path) -> Callable[[], str]:
    return lambda: path.read_text(encoding="utf-8", errors="replace")


def stdlib_documents(root: str | None = None) -> list[Document]:
    """Every `*.py` under the standard library (no site-packages, no caches, no tests)."""
    root_path = Path(root or default_stdlib_dir())
    if not root_path.is_dir():
        raise MissingResourceError(f"Python standard library sources not found at {root_path}")
    skip = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}
    docs = []
    for dirpath, dirnames, filenames in os.walk(root_path):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        for f in sorted(filenames):
            if f.endswith(".py"):
                path = Path(dirpath) / f
                docs.append((path.relative_to(root_path).as_posix(), _read(path)))
    return docs


def _missing(source: str, what: str) -> MissingResourceError:
    return MissingResourceError(
        f"the '{source}' corpus is not installed ({what}). Install it with "
        f"`sudo apt-get install {DEBIAN_PACKAGES[source]}`, or leave '{source}' out of the "
        f"sources (e.g. --sources stdlib).")


def pydoc_documents(root: str | None = None) -> list[Document]:
    """The reST sources of the Python documentation (Debian package python3.11-doc)."""
    root_path = Path(root or DEFAULT_PYDOC_DIR)
    files = sorted(root_path.rglob("*.rst.txt")) if root_path.is_dir() else []
    if not files:
        raise _missing("pydoc", f"no *.rst.txt files under {root_path}")
    return [(p.relative_to(root_path).as_posix(), _read(p)) for p in files]


# The 66 books in the order `bible` prints them.
KJV_BOOKS = (
    "Genesis", "Exodus", "Leviticus", "Numbers", "Deuteronomy", "Joshua", "Judges", "Ruth",
    "1 Samuel", "2 Samuel", "1 Kings", "2 Kings", "1 Chronicles", "2 Chronicles", "Ezra",
    "Nehemiah", "Esther", "Job", "Psalms", "Proverbs", "Ecclesiastes", "Song of Solomon",
    "Isaiah", "Jeremiah", "Lamentations", "Ezekiel", "Daniel", "Hosea", "Joel", "Amos", "Obadiah",
    "Jonah", "Micah", "Nahum", "Habakkuk", "Zephaniah", "Haggai", "Zechariah", "Malachi",
    "Matthew", "Mark", "Luke", "John", "Acts", "Romans", "1 Corinthians", "2 Corinthians",
    "Galatians", "Ephesians", "Philippians", "Colossians", "1 Thessalonians", "2 Thessalonians",
    "1 Timothy", "2 Timothy", "Titus", "Philemon", "Hebrews", "James", "1 Peter", "2 Peter",
    "1 John", "2 John", "3 John", "Jude", "Revelation",
)
_VERSE_RE = re.compile(r"^(\d?[A-Za-z]+)(\d+):(\d+) (.*)$")


def kjv_documents(bible_cmd: str | None = None) -> list[Document]:
    """The King James Bible, one document per book, via the `bible` reader (bible-kjv).

    `bible -f Gen1:1-Rev22:21` prints one verse per line as `Ge1:1 In the beginning ...`;
    each book becomes "Genesis\\n\\n1:1 In the beginning ...\\n1:2 ...".
    """
    cmd = bible_cmd or DEFAULT_BIBLE_CMD
    exe = shutil.which(cmd)
    if exe is None:
        raise _missing("kjv", f"the `{cmd}` reader is not on PATH")
    try:
        out = subprocess.run([exe, "-f", "Gen1:1-Rev22:21"], stdin=subprocess.DEVNULL,
                             capture_output=True, text=True, timeout=120, check=True).stdout
    except (subprocess.SubprocessError, OSError) as e:
        raise _missing("kjv", f"`{cmd} -f Gen1:1-Rev22:21` failed: {e}") from e
    books: list[list[str]] = []
    abbrev = None
    for line in out.splitlines():
        m = _VERSE_RE.match(line)
        if m is None:
            continue
        if m.group(1) != abbrev:
            abbrev = m.group(1)
            books.append([])
        books[-1].append(f"{m.group(2)}:{m.group(3)} {m.group(4)}")
    if len(books) != len(KJV_BOOKS):
        raise _missing("kjv", f"`{cmd}` printed {len(books)} books, expected {len(KJV_BOOKS)} "
                              "(is bible-kjv-text installed?)")
    return [(name, (lambda n=name, v=verses: n + "\n\n" + "\n".join(v) + "\n"))
            for name, verses in zip(KJV_BOOKS, books)]


def corpus_documents(source: str, config: "CorpusConfig") -> list[Document]:
    if source == "stdlib":
        return stdlib_documents(config.stdlib_dir or None)
    if source == "pydoc":
        return pydoc_documents(config.pydoc_dir or None)
    if source == "kjv":
        return kjv_documents(config.bible_cmd or None)
    raise ConfigError(f"unknown corpus source {source!r}; choose from {', '.join(SOURCES)}")


def is_validation(source: str, name: str, validation_percent: float) -> bool:
    """Deterministic split by document: hash of 'source/name' into [0, 100)."""
    h = int.from_bytes(hashlib.sha256(f"{source}/{name}".encode()).digest()[:8], "big")
    return (h % 1_000_000) < validation_percent * 10_000


# ----------------------------------------------------------------------------------------------
# The builder.

@dataclasses.dataclass
class CorpusConfig(tfds.core.BuilderConfig):
    """Everything that changes what is stored; `make_config` fills `name` from it."""

    sources: tuple[str, ...] = SOURCES
    min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS
    validation_percent: float = DEFAULT_VALIDATION_PERCENT
    tokenizer_name: str = ""
    tokenizer_vocab_size: int = -1
    tokenizer_fingerprint: str = ""
    stdlib_dir: str = ""  # "" = the running interpreter's stdlib
    pydoc_dir: str = ""  # "" = DEFAULT_PYDOC_DIR
    bible_cmd: str = ""  # "" = DEFAULT_BIBLE_CMD

    @property
    def tokenizer(self) -> TokenizerIdentity:
        return TokenizerIdentity(self.tokenizer_name, self.tokenizer_vocab_size,
                                 self.tokenizer_fingerprint)


def make_config(tokenizer: TokenizerLike | TokenizerIdentity, *,
                sources: Sequence[str] = SOURCES,
                min_doc_tokens: int = DEFAULT_MIN_DOC_TOKENS,
                validation_percent: float = DEFAULT_VALIDATION_PERCENT,
                stdlib_dir: str | None = None, pydoc_dir: str | None = None,
                bible_cmd: str | None = None) -> CorpusConfig:
    """The config for these options; its name is `<tokenizer>.<sources>.min<N>[.<hash>]`.

    The name carries the tokenizer's slug, so datasets for different tokenizers live side by
    side; the optional hash covers a non-default validation percent or corpus paths.
    """
    sources = tuple(dict.fromkeys(sources))
    unknown = [s for s in sources if s not in SOURCES]
    if unknown or not sources:
        raise ConfigError(f"unknown or no corpus sources {list(sources)}; "
                          f"choose from {', '.join(SOURCES)}")
    sources = tuple(s for s in SOURCES if s in sources)  # canonical order
    if min_doc_tokens < 1:
        raise ConfigError(f"min_doc_tokens must be >= 1, got {min_doc_tokens}")
    if not 0 <= validation_percent < 100:
        raise ConfigError(f"validation_percent must be in [0, 100), got {validation_percent}")
    ident = tokenizer if isinstance(tokenizer, TokenizerIdentity) else tokenizer_identity(tokenizer)
    paths = {k: str(Path(v).resolve()) if k != "bible_cmd" else v
             for k, v in (("stdlib_dir", stdlib_dir), ("pydoc_dir", pydoc_dir),
                          ("bible_cmd", bible_cmd)) if v}
    name = f"{ident.slug}.{'+'.join(sources)}.min{min_doc_tokens}"
    extra = dict(paths)
    if validation_percent != DEFAULT_VALIDATION_PERCENT:
        extra["validation_percent"] = validation_percent
    if extra:
        name += "." + hashlib.sha256(repr(sorted(extra.items())).encode()).hexdigest()[:8]
    return CorpusConfig(
        name=name, version=VERSION,
        description=(f"{'+'.join(sources)} tokenised with {ident.describe()}, documents >= "
                     f"{min_doc_tokens} tokens, {validation_percent}% validation"),
        sources=sources, min_doc_tokens=min_doc_tokens, validation_percent=validation_percent,
        tokenizer_name=ident.name, tokenizer_vocab_size=ident.vocab_size,
        tokenizer_fingerprint=ident.fingerprint, **paths)


class McJaxCorpus(tfds.core.GeneratorBasedBuilder):
    """TFDS builder `mc_jax_corpus`; construct with `config=make_config(...)`, `tokenizer=`."""

    VERSION = tfds.core.Version(VERSION)
    BUILDER_CONFIGS: list[CorpusConfig] = []

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls):
        # TFDS finds a packaged builder's file with importlib_resources, which is not installed.
        from etils import epath
        return epath.Path(__file__)

    def __init__(self, *, tokenizer: TokenizerLike | None = None, progress: bool = False,
                 **kwargs: Any):
        self._progress = progress
        kwargs.setdefault("file_format", "array_record")
        super().__init__(**kwargs)
        config: CorpusConfig = self.builder_config
        if not isinstance(config, CorpusConfig):
            raise ConfigError("McJaxCorpus needs config=make_config(tokenizer, ...)")
        if tokenizer is None:
            tokenizer = _TOKENIZERS.get(config.tokenizer.slug)
        if tokenizer is not None:
            check_tokenizer(config.tokenizer, tokenizer, where=f"config {config.name}")
        self._tokenizer = tokenizer

    def _info(self) -> tfds.core.DatasetInfo:
        config: CorpusConfig = self.builder_config
        meta = tfds.core.MetadataDict(
            tokenizer=dataclasses.asdict(config.tokenizer),
            sources=list(config.sources),
            min_doc_tokens=config.min_doc_tokens,
            validation_percent=config.validation_percent,
            stats={},
        )
        # DatasetInfo directly: `dataset_info_from_configs` would scan this package's folder
        # for README/CITATIONS files.
        return tfds.core.DatasetInfo(
            builder=self,
            description="Tokenised long documents (stdlib modules, Python docs, KJV books).",
            features=tfds.features.FeaturesDict({
                "tokens": tfds.features.Tensor(shape=(None,), dtype=np.int32),
                "source": tfds.features.Text(),
                "name": tfds.features.Text(),
                "num_tokens": np.int32,
            }),
            metadata=meta,
        )

    def _split_generators(self, dl_manager):
        del dl_manager
        config: CorpusConfig = self.builder_config
        if self._tokenizer is None:
            raise ConfigError(
                f"building {DATASET_NAME}/{config.name} needs its tokenizer "
                f"{config.tokenizer.describe()}: pass tokenizer= or register_tokenizer() it")
        docs = {s: corpus_documents(s, config) for s in config.sources}  # fails fast if missing
        splits: dict[str, list[tuple[str, str, Callable[[], str]]]] = {"train": [],
                                                                        "validation": []}
        for source, items in docs.items():
            for name, load in items:
                split = ("validation" if is_validation(source, name, config.validation_percent)
                         else "train")
                splits[split].append((source, name, load))
        return {split: self._generate_examples(split, items) for split, items in splits.items()}

    def _generate_examples(self, split: str, items):
        config: CorpusConfig = self.builder_config
        stats = self.info.metadata["stats"].setdefault(split, {})
        progress = _progress(len(items), f"tokenising {split}", self._progress)
        for source, name, load in items:
            s = stats.setdefault(source, {"docs": 0, "tokens": 0, "skipped_short": 0})
            tokens = np.asarray(self._tokenizer.encode(load()), dtype=np.int32)
            progress.update(1)
            if len(tokens) < config.min_doc_tokens:
                s["skipped_short"] += 1
                continue
            s["docs"] += 1
            s["tokens"] += int(len(tokens))
            yield f"{source}/{name}", {"tokens": tokens, "source": source, "name": name,
                                       "num_tokens": len(tokens)}
        progress.close()


class _NoProgress:
    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, desc: str, enable: bool):
    if not enable:
        return _NoProgress()
    from tqdm.auto import tqdm
    return tqdm(total=total, desc=desc, unit="doc")


def check_tokenizer(stored: TokenizerIdentity, tokenizer: TokenizerLike | TokenizerIdentity,
                    *, where: str) -> None:
    """Raises TokenizerMismatchError unless `tokenizer` is the one `stored` describes."""
    given = tokenizer if isinstance(tokenizer, TokenizerIdentity) else tokenizer_identity(tokenizer)
    if (given.vocab_size, given.fingerprint) != (stored.vocab_size, stored.fingerprint):
        raise TokenizerMismatchError(
            f"{where} was tokenised with {stored.describe()}, but the tokenizer given is "
            f"{given.describe()}. Token ids from one tokenizer are meaningless to another: "
            f"run `mc-jax prepare-data` with the model's tokenizer, or use that dataset's "
            f"tokenizer.")

