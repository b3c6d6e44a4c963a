"""mc_jax_corpus (TFDS, ArrayRecord) and the Grain window pipeline, on a tiny stdlib corpus."""

import json
import shutil
import sys
from pathlib import Path

import grain
import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds
from etils import epath

from mc_jax.data import corpus
from mc_jax.data import pipeline as data
from mc_jax.errors import ConfigError, MissingResourceError

STDLIB = Path(corpus.default_stdlib_dir())
FILES = ["json/decoder.py", "json/encoder.py", "textwrap.py", "shlex.py", "string.py",
         "bisect.py", "heapq.py", "fnmatch.py", "glob.py", "keyword.py", "copy.py", "abc.py"]
MIN_DOC = 1000
VAL_PCT = 25.0
T = 512  # window length


class ByteTokenizer:
    """Fake tokenizer: ids are the UTF-8 bytes."""

    name = "bytes"
    vocab_size = 256

    def __init__(self, shift=0):
        self.shift = shift

    def encode(self, text):
        return [(b + self.shift) % 256 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    for f in FILES:
        (root / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(STDLIB / f, root / f)
    (root / "tiny.py").write_text("x = 1\n")  # below MIN_DOC: dropped
    data_dir = tmp_path_factory.mktemp("data")
    opts = dict(sources=["stdlib"], min_doc_tokens=MIN_DOC, validation_percent=VAL_PCT,
                stdlib_dir=str(root))
    p = data.prepare_data(data_dir, ByteTokenizer(), progress=False, **opts)
    return dict(root=root, data_dir=data_dir, opts=opts, prepared=p)


def _train(prepared):
    return data.open_split("train", ByteTokenizer(), data_dir=prepared["data_dir"],
                           **prepared["opts"])


def _batches(source, config, n, **kw):
    it = iter(data.make_window_dataset(source, config, **kw))
    return [next(it) for _ in range(n)]


def test_prepared_dataset_reads_back_with_tfds_data_source_without_tensorflow(prepared):
    p = prepared["prepared"]
    assert p.built and p.path.is_dir()
    names = {}
    for split in ("train", "validation"):
        src = tfds.data_source(f"mc_jax_corpus/{p.config_name}:1.0.0", split=split,
                               data_dir=str(prepared["data_dir"]))
        for i in range(len(src)):
            ex = src[i]
            name = ex["name"].decode()
            text = (prepared["root"] / name).read_bytes()
            np.testing.assert_array_equal(ex["tokens"], np.frombuffer(text, np.uint8))
            assert ex["tokens"].dtype == np.int32 and ex["num_tokens"] == len(text)
            assert ex["source"] == b"stdlib"
            names[name] = split
    assert "tensorflow" not in sys.modules
    assert set(names) == set(FILES)  # tiny.py dropped
    total = {s: sum(v["stdlib"]["docs"] for k, v in p.stats.items() if k == s)
             for s in ("train", "validation")}
    assert total == {s: list(names.values()).count(s) for s in ("train", "validation")}
    assert sum(v["stdlib"]["skipped_short"] for v in p.stats.values()) == 1


def test_prepare_is_idempotent(prepared):
    files = sorted(prepared["prepared"].path.iterdir())
    mtimes = [f.stat().st_mtime_ns for f in files]
    again = data.prepare_data(prepared["data_dir"], ByteTokenizer(), progress=False,
                              **prepared["opts"])
    assert not again.built and again.path == prepared["prepared"].path
    assert again.stats == prepared["prepared"].stats
    assert [f.stat().st_mtime_ns for f in sorted(again.path.iterdir())] == mtimes


def test_splits_are_disjoint_by_document_and_follow_the_name_hash(prepared):
    split_names = {}
    for split in ("train", "validation"):
        src = data.open_split(split, ByteTokenizer(), data_dir=prepared["data_dir"],
                              **prepared["opts"])
        split_names[split] = {src[i]["name"].decode() for i in range(len(src))}
    assert split_names["train"] and split_names["validation"]
    assert not split_names["train"] & split_names["validation"]
    for name in FILES:
        expected = "validation" if corpus.is_validation("stdlib", name, VAL_PCT) else "train"
        assert name in split_names[expected]


def test_window_index_covers_each_long_document_to_its_end():
    idx = data.window_index(np.array([5, 10, 23, 40]), 10)
    assert idx.tolist() == [[1, 0], [2, 0], [2, 10], [2, 13], [3, 0], [3, 10], [3, 20], [3, 30]]
    assert data.window_index(np.array([4]), 10).shape == (0, 2)
    assert data.window_index(np.array([25]), 10, stride=5)[:, 1].tolist() == [0, 5, 10, 15]


def test_windows_have_the_right_length_and_come_from_their_document(prepared):
    src = _train(prepared)
    cfg = data.WindowConfig(window_len=T, global_batch=4, seed=1)
    for batch in _batches(src, cfg, 5):
        assert batch["tokens"].shape == (4, T) and batch["tokens"].dtype == np.int32
        for row, doc, off in zip(batch["tokens"], batch["doc_index"], batch["offset"]):
            np.testing.assert_array_equal(row, src[int(doc)]["tokens"][off:off + T])


def test_one_epoch_visits_every_window_once_and_epochs_reshuffle(prepared):
    src = _train(prepared)
    windows = data.window_index(data.document_lengths(src), T)
    n = len(windows) // 4
    cfg = data.WindowConfig(window_len=T, global_batch=4, seed=0, num_epochs=2)
    batches = list(data.make_window_dataset(src, cfg))
    assert len(batches) == 2 * len(windows) // 4
    seen = [(d, o) for b in batches[:n] for d, o in zip(b["doc_index"], b["offset"])]
    assert len(set(seen)) == len(seen) == 4 * n
    epoch2 = [(d, o) for b in batches[n:2 * n] for d, o in zip(b["doc_index"], b["offset"])]
    assert seen != epoch2


def test_same_seed_same_batches_other_seed_other_batches(prepared):
    src = _train(prepared)
    cfg = data.WindowConfig(window_len=T, global_batch=4, seed=7)
    a, b = _batches(src, cfg, 4), _batches(src, cfg, 4)
    c = _batches(src, data.WindowConfig(window_len=T, global_batch=4, seed=8), 4)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    assert any(not np.array_equal(x["tokens"], z["tokens"]) for x, z in zip(a, c))


def test_restored_state_continues_with_the_same_batches(prepared, tmp_path):
    src = _train(prepared)
    cfg = data.WindowConfig(window_len=T, global_batch=4, seed=3)
    full = [next(it)["tokens"] for it in [data.make_batch_iterator(src, cfg)] for _ in range(7)]

    it = data.make_batch_iterator(src, cfg)
    for _ in range(3):
        next(it)
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    grain.checkpoint.CheckpointHandler().save(epath.Path(tmp_path), item=it)
    next(it)  # moves on; the saved state must not

    resumed = data.make_batch_iterator(src, cfg)
    resumed.set_state(state)
    via_handler = grain.checkpoint.CheckpointHandler().restore(
        epath.Path(tmp_path), item=data.make_batch_iterator(src, cfg))
    for want in full[3:]:
        np.testing.assert_array_equal(next(resumed)["tokens"], want)
        np.testing.assert_array_equal(next(via_handler)["tokens"], want)


def test_state_from_another_pipeline_is_refused(prepared):
    src = _train(prepared)
    state = data.make_batch_iterator(src, data.WindowConfig(T, 4, seed=1)).get_state()
    with pytest.raises(ConfigError, match="different pipeline"):
        data.make_batch_iterator(src, data.WindowConfig(T, 4, seed=2)).set_state(state)


def test_process_shards_are_disjoint_and_reassemble_the_global_batch(prepared):
    src = _train(prepared)
    cfg = data.WindowConfig(window_len=T, global_batch=4, seed=5, num_epochs=1)
    whole = list(data.make_window_dataset(src, cfg, process_index=0, process_count=1))
    parts = [list(data.make_window_dataset(src, cfg, process_index=p, process_count=2))
             for p in range(2)]
    assert len(parts[0]) == len(parts[1]) == len(whole)
    keys = [{(int(d), int(o)) for b in part for d, o in zip(b["doc_index"], b["offset"])}
            for part in parts]
    assert not keys[0] & keys[1]
    for g, p0, p1 in zip(whole, *parts):
        assert p0["tokens"].shape == (2, T)
        np.testing.assert_array_equal(g["tokens"], np.concatenate([p0["tokens"], p1["tokens"]]))
    with pytest.raises(ConfigError, match="divisible"):
        data.make_window_dataset(src, data.WindowConfig(T, 3), process_index=0, process_count=2)


def test_global_arrays_are_sharded_along_the_data_axis(prepared):
    src = _train(prepared)
    assert jax.device_count() == 8
    mesh = jax.make_mesh((4, 2), ("data", "model"))
    cfg = data.WindowConfig(window_len=T, global_batch=8, seed=2)
    batch = next(data.make_batch_iterator(src, cfg, mesh=mesh))
    local = _batches(src, cfg, 1)[0]
    tokens = batch["tokens"]
    assert isinstance(tokens, jax.Array) and tokens.shape == (8, T)
    assert tokens.sharding.spec == jax.sharding.PartitionSpec("data")
    assert {s.data.shape for s in tokens.addressable_shards} == {(2, T)}
    np.testing.assert_array_equal(np.asarray(tokens), local["tokens"])
    np.testing.assert_array_equal(np.asarray(batch["doc_index"]), local["doc_index"])
    with pytest.raises(ConfigError, match="divisible"):
        data.make_batch_iterator(src, data.WindowConfig(T, 6), mesh=mesh)


def test_missing_corpora_name_the_debian_package(prepared, tmp_path):
    with pytest.raises(MissingResourceError, match="apt-get install python3.11-doc"):
        data.prepare_data(tmp_path, ByteTokenizer(), sources=["stdlib", "pydoc"],
                          stdlib_dir=str(prepared["root"]), pydoc_dir=str(tmp_path / "none"))
    with pytest.raises(MissingResourceError, match="apt-get install bible-kjv-text bible-kjv"):
        data.prepare_data(tmp_path, ByteTokenizer(), sources=["kjv"],
                          bible_cmd=str(tmp_path / "no-bible"))
    assert not list(tmp_path.iterdir())  # nothing half-built
    with pytest.raises(MissingResourceError, match="prepare-data"):
        data.open_split("train", ByteTokenizer(), data_dir=tmp_path, sources=["stdlib"])


def test_another_tokenizer_is_refused(prepared):
    other = ByteTokenizer(shift=1)  # same name and vocab size, different ids
    with pytest.raises(data.TokenizerMismatchError, match="only for tokenizer"):
        data.open_split("train", other, data_dir=prepared["data_dir"], **prepared["opts"])
    with pytest.raises(data.TokenizerMismatchError, match="tokenised with bytes"):
        data.open_dataset_dir(prepared["prepared"].path, "train", other)
    with pytest.raises(data.TokenizerMismatchError):
        corpus.McJaxCorpus(data_dir=str(prepared["data_dir"]), tokenizer=other,
                           config=corpus.make_config(ByteTokenizer(), **prepared["opts"]))
    config = corpus.make_config(ByteTokenizer(), **prepared["opts"])
    with pytest.raises(ConfigError, match="needs its tokenizer"):
        corpus.McJaxCorpus(data_dir=str(prepared["data_dir"]), config=config) \
            ._split_generators(None)
    data.register_tokenizer(ByteTokenizer())  # builders made without tokenizer= find it
    assert corpus.McJaxCorpus(data_dir=str(prepared["data_dir"]), config=config)._tokenizer


def test_cli_reports_an_existing_dataset(prepared, monkeypatch, capsys):
    import mc_jax.base.loading
    monkeypatch.setattr(mc_jax.base.loading, "load_tokenizer", lambda base=None: ByteTokenizer())
    opts = prepared["opts"]
    rc = data.prepare_data_cli([
        "--data-dir", str(prepared["data_dir"]), "--sources", "stdlib",
        "--min-doc-tokens", str(MIN_DOC), "--validation-percent", str(VAL_PCT),
        "--stdlib-dir", opts["stdlib_dir"], "--no-progress"])
    out = capsys.readouterr().out
    assert rc == 0 and "already prepared" in out and "validation  stdlib" in out
    try:  # the integrated `mc-jax prepare-data`, once it is wired
        from mc_jax.cli import commands as cli
    except ImportError:
        return
    if "prepare-data" in cli.build_parser().format_help():
        assert cli.main(["prepare-data", "--data-dir", str(prepared["data_dir"]), "--sources",
                         "stdlib", "--min-doc-tokens", str(MIN_DOC), "--validation-percent",
                         str(VAL_PCT), "--stdlib-dir", opts["stdlib_dir"]]) == 0
        assert "already prepared" in capsys.readouterr().out


def test_default_data_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("MC_JAX_DATA", str(tmp_path))
    assert data.default_data_dir() == tmp_path
    monkeypatch.delenv("MC_JAX_DATA")
    assert data.default_data_dir() == Path.home() / ".cache" / "mc_jax" / "data"


@pytest.mark.skipif(shutil.which("bible") is None, reason="bible-kjv not installed")
def test_kjv_reader_gives_66_books():
    docs = corpus.kjv_documents()
    assert [name for name, _ in docs] == list(corpus.KJV_BOOKS)
    genesis, revelation = docs[0][1](), docs[-1][1]()
    assert genesis.startswith("Genesis\n\n1:1 In the beginning God created the heaven")
    assert revelation.rstrip().endswith("Amen.")


@pytest.mark.skipif(not Path(corpus.DEFAULT_PYDOC_DIR).is_dir(), reason="python3.11-doc missing")
def test_pydoc_reader_finds_the_rest_sources():
    docs = dict(corpus.pydoc_documents())
    assert len(docs) > 100 and "library/json.rst.txt" in docs
    assert "json" in docs["library/json.rst.txt"]()


def test_iterator_checkpoints_with_an_orbax_checkpoint_manager(prepared, tmp_path):
    import orbax.checkpoint as ocp
    src = _train(prepared)
    cfg = data.WindowConfig(window_len=T, global_batch=8, seed=4)
    mesh = jax.make_mesh((8,), ("data",))
    it = data.make_batch_iterator(src, cfg, mesh=mesh)
    next(it)
    state = {"w": jax.numpy.arange(3.0)}
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(1, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                             data=grain.checkpoint.CheckpointSave(it)))
        mngr.wait_until_finished()
        want = [np.asarray(next(it)["tokens"]) for _ in range(2)]
        restored = mngr.restore(1, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(state),
            data=grain.checkpoint.CheckpointRestore(data.make_batch_iterator(src, cfg, mesh=mesh))))
    for w in want:
        np.testing.assert_array_equal(np.asarray(next(restored["data"])["tokens"]), w)
