"""The data pipeline: default corpus, packing, deterministic batches, replica slices, errors."""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pathways_lite.model.corpus import (
    STDLIB_EXCLUDED_DIRS,
    content_hash,
    stdlib_corpus,
    stdlib_files,
    stdlib_root,
)
from pathways_lite.model.data import DataError, Dataset, DataSpec, load_corpus, prepare_dataset

SMALL_VOCAB = 400
# What the shared `stdlib_dataset` fixture (tests/conftest.py) is built with; checked below.
TEST_MAX_BYTES = 1_000_000
TEST_SEQ_LEN = 64


@pytest.fixture(scope="module")
def text_files(tmp_path_factory) -> Path:
    """A folder of a few text files (about 60 KB, cut from the stdlib so it is real text)."""
    folder = tmp_path_factory.mktemp("texts")
    root = stdlib_root()
    for i, rel in enumerate(["json/decoder.py", "json/encoder.py", "textwrap.py", "bisect.py"]):
        (folder / f"doc{i}.txt").write_text((root / rel).read_text("utf-8")[:15_000])
    return folder


# --- the default corpus --------------------------------------------------------------------


def test_default_corpus_excludes_site_packages_and_test_folders() -> None:
    root = stdlib_root()
    files = stdlib_files()
    assert files == sorted(files)
    assert "json/__init__.py" in files and "os.py" in files and "asyncio/events.py" in files
    for rel in files:
        assert not set(Path(rel).parts[:-1]) & STDLIB_EXCLUDED_DIRS, rel
        assert not rel.startswith("config-") and "_sysconfigdata_" not in rel, rel
    # The excluded folders do exist in this Python, so the exclusion is doing something.
    assert (root / "test").is_dir()
    assert not any(rel.startswith("test/") for rel in files)
    assert not any("/tests/" in f"/{rel}" or "/test/" in f"/{rel}" for rel in files)


def test_default_corpus_hash_is_stable_and_covers_the_content() -> None:
    a, b = stdlib_corpus(TEST_MAX_BYTES), stdlib_corpus(TEST_MAX_BYTES)
    assert a.hash == b.hash
    assert a.hash == content_hash(a.documents)
    assert a.num_bytes == TEST_MAX_BYTES == sum(len(d.encode()) for d in a.documents)
    assert list(a.names) == stdlib_files()[: len(a.names)]  # sorted prefix of the file list
    assert a.truncated
    assert stdlib_corpus(TEST_MAX_BYTES - 1).hash != a.hash
    # Document boundaries are part of the hash, not only the concatenated text.
    assert content_hash(["ab", "c"]) != content_hash(["a", "bc"])


def test_manifest_records_the_corpus_and_tokenizer_hashes(stdlib_dataset, tokenizer) -> None:
    manifest = json.loads((stdlib_dataset.path / "manifest.json").read_text())
    assert manifest["spec"] == DataSpec(vocab_size=1024, max_bytes=TEST_MAX_BYTES).to_dict()
    assert manifest["corpus_hash"] == stdlib_corpus(TEST_MAX_BYTES).hash
    assert manifest["tokenizer_hash"] == tokenizer.hash
    assert manifest["seq_len"] == TEST_SEQ_LEN == stdlib_dataset.seq_len
    assert manifest["hash"] == stdlib_dataset.hash
    stdlib_dataset.verify()


# --- packing -------------------------------------------------------------------------------


def test_examples_are_the_packed_stream_of_eos_separated_documents(text_files, tmp_path) -> None:
    spec = DataSpec(source="files", paths=(str(text_files),), vocab_size=SMALL_VOCAB)
    ds = prepare_dataset(spec, seq_len=32, cache_dir=tmp_path)
    corpus = load_corpus(spec)
    tok = ds.tokenizer
    expected = []
    for doc in corpus.documents:
        expected += tok.encode(doc) + [tok.eos_id]
    rows = ds.examples(np.arange(ds.num_examples))
    assert rows.shape == (ds.num_examples, 33) and rows.dtype == np.int32
    # Consecutive windows overlap by one token: the last target is the next first input.
    np.testing.assert_array_equal(rows[:-1, -1], rows[1:, 0])
    stream = np.concatenate([rows[0], rows[1:, 1:].reshape(-1)])
    assert ds.num_examples == (len(expected) - 1) // 32
    np.testing.assert_array_equal(stream, expected[: len(stream)])
    assert int((stream == tok.eos_id).sum()) >= len(corpus) - 1  # no padding, EOS between docs
    assert tok.decode(stream).startswith(corpus.documents[0] + corpus.documents[1][:100])


def test_shards_read_like_one_file(stdlib_dataset) -> None:
    spec = DataSpec(vocab_size=stdlib_dataset.tokenizer.vocab_size, max_bytes=TEST_MAX_BYTES)
    sharded = prepare_dataset(spec, seq_len=TEST_SEQ_LEN, shard_bytes=40_000)
    assert len(sharded.manifest["shards"]) > 5
    assert sharded.tokens_hash == stdlib_dataset.tokens_hash
    for step in (0, 7, 1000):
        a, ids_a = sharded.global_batch(step, 16, seed=5)
        b, ids_b = stdlib_dataset.global_batch(step, 16, seed=5)
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(ids_a, ids_b)


# --- batches -------------------------------------------------------------------------------


def test_global_batch_is_a_function_of_seed_and_step(stdlib_dataset) -> None:
    reopened = Dataset.open(stdlib_dataset.path, expected_hash=stdlib_dataset.hash)
    tokens, ids = stdlib_dataset.global_batch(step=3, batch_size=8, seed=0)
    assert tokens.shape == (8, TEST_SEQ_LEN + 1) and tokens.dtype == np.int32
    assert ids.shape == (8,) and ids.dtype == np.int64
    again, again_ids = reopened.global_batch(step=3, batch_size=8, seed=0)
    np.testing.assert_array_equal(tokens, again)
    np.testing.assert_array_equal(ids, again_ids)
    np.testing.assert_array_equal(tokens, stdlib_dataset.examples(ids))
    assert not np.array_equal(ids, stdlib_dataset.global_batch(4, 8, 0)[1])
    assert not np.array_equal(ids, stdlib_dataset.global_batch(3, 8, 1)[1])


def test_an_epoch_serves_every_example_once_in_a_seeded_order(stdlib_dataset) -> None:
    n = stdlib_dataset.num_examples
    epoch0 = stdlib_dataset.example_ids(step=0, batch_size=n, seed=2)
    epoch1 = stdlib_dataset.example_ids(step=1, batch_size=n, seed=2)
    np.testing.assert_array_equal(np.sort(epoch0), np.arange(n))
    np.testing.assert_array_equal(np.sort(epoch1), np.arange(n))
    assert not np.array_equal(epoch0, epoch1)
    # Steps index into the epoch's order: batch k of size B is positions k*B .. (k+1)*B - 1.
    np.testing.assert_array_equal(stdlib_dataset.global_batch(5, 12, seed=2)[1], epoch0[60:72])
    # A batch that straddles the epoch boundary continues into the next epoch's order.
    b = n // 2 + 1
    straddle = stdlib_dataset.example_ids(step=1, batch_size=b, seed=2)
    np.testing.assert_array_equal(straddle, np.concatenate([epoch0[b:], epoch1[: 2 * b - n]]))


@pytest.mark.parametrize("num_replicas", [1, 2, 4, 8])
def test_replica_slices_are_disjoint_and_together_the_global_batch(
    stdlib_dataset, num_replicas: int
) -> None:
    step, batch, seed = 11, 16, 7
    tokens, ids = stdlib_dataset.global_batch(step, batch, seed)
    # Each replica reads on its own, from a separately opened dataset (as an island would).
    parts = [
        Dataset.open(stdlib_dataset.path).replica_batch(step, batch, seed, r, num_replicas)
        for r in range(num_replicas)
    ]
    for part_tokens, part_ids in parts:
        assert part_tokens.shape == (batch // num_replicas, TEST_SEQ_LEN + 1)
        assert part_ids.shape == (batch // num_replicas,)
    all_ids = np.concatenate([p[1] for p in parts])
    assert len(set(all_ids.tolist())) == batch  # disjoint
    np.testing.assert_array_equal(all_ids, ids)
    np.testing.assert_array_equal(np.concatenate([p[0] for p in parts]), tokens)


def test_replica_batch_checks_divisibility_and_range(stdlib_dataset) -> None:
    with pytest.raises(ValueError, match="batch_size=6 is not divisible by num_replicas=4"):
        stdlib_dataset.replica_batch(0, 6, 0, replica=0, num_replicas=4)
    with pytest.raises(ValueError, match="replica=4 must be in 0 .. 3"):
        stdlib_dataset.replica_batch(0, 8, 0, replica=4, num_replicas=4)
    with pytest.raises(ValueError, match="step=-1 must be a non-negative integer"):
        stdlib_dataset.global_batch(-1, 8, 0)


def test_reading_is_memory_mapped(stdlib_dataset) -> None:
    before = pa.total_allocated_bytes()
    ds = Dataset.open(stdlib_dataset.path)
    size = ds.num_examples * (ds.seq_len + 1) * 4
    # Opening allocates nothing near the size of the tokens: the shards are mapped, not read.
    assert pa.total_allocated_bytes() - before < size // 100
    assert all(isinstance(m, pa.MemoryMappedFile) for m in ds._maps)
    assert all(not s.flags.owndata and not s.flags.writeable for s in ds._shards)
    tokens, _ = ds.global_batch(0, 4, 0)
    tokens[0, 0] = -1  # batches are copies the caller may change
    assert ds.global_batch(0, 4, 0)[0][0, 0] != -1


def test_pickled_dataset_reads_the_same_batches(stdlib_dataset) -> None:
    copy = pickle.loads(pickle.dumps(stdlib_dataset))
    assert copy.hash == stdlib_dataset.hash
    a, b = copy.global_batch(2, 4, 9)[0], stdlib_dataset.global_batch(2, 4, 9)[0]
    np.testing.assert_array_equal(a, b)


def test_changed_tokens_or_a_wrong_hash_are_caught(stdlib_dataset, tmp_path) -> None:
    copy = tmp_path / "ds"
    shutil.copytree(stdlib_dataset.path, copy)
    with pytest.raises(DataError, match="not the expected " + "0" * 64):
        Dataset.open(copy, expected_hash="0" * 64)
    shard = copy / stdlib_dataset.manifest["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    row0 = stdlib_dataset.examples(np.array([0]))[0]
    at = bytes(data).find(row0.astype("<i4").tobytes())
    assert at > 0
    data[at] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match="the tokens hash to"):
        Dataset.open(copy, verify=True)


# --- sources and caching -------------------------------------------------------------------


def test_prepare_dataset_is_cached_by_content(text_files, tmp_path) -> None:
    folder = tmp_path / "texts"
    shutil.copytree(text_files, folder)
    spec = DataSpec(source="files", paths=(str(folder / "*.txt"),), vocab_size=SMALL_VOCAB)
    first = prepare_dataset(spec, seq_len=16, cache_dir=tmp_path / "cache")
    assert prepare_dataset(spec, seq_len=16, cache_dir=tmp_path / "cache").path == first.path
    other_len = prepare_dataset(spec, seq_len=8, cache_dir=tmp_path / "cache")
    assert other_len.path != first.path
    assert other_len.tokenizer.hash == first.tokenizer.hash  # the tokenizer is shared
    with open(folder / "doc0.txt", "a") as f:
        f.write("\n# one more line\n")
    changed = prepare_dataset(spec, seq_len=16, cache_dir=tmp_path / "cache")
    assert changed.path != first.path and changed.hash != first.hash
    assert changed.manifest["corpus_hash"] != first.manifest["corpus_hash"]


def test_parquet_and_arrow_sources_read_one_document_per_row(text_files, tmp_path) -> None:
    docs = [p.read_text() for p in sorted(text_files.iterdir())]
    table = pa.table({"id": list(range(len(docs))), "body": docs})
    pq.write_table(table.slice(0, 2), tmp_path / "part-0.parquet")
    with pa.OSFile(str(tmp_path / "part-1.arrow"), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as writer:
            writer.write_table(table.slice(2))
    spec = DataSpec(
        source="parquet",
        paths=(str(tmp_path / "*.parquet"), str(tmp_path / "*.arrow")),
        column="body",
        vocab_size=SMALL_VOCAB,
    )
    corpus = load_corpus(spec)
    assert list(corpus.documents) == docs
    ds = prepare_dataset(spec, seq_len=32, cache_dir=tmp_path / "cache")
    assert ds.manifest["corpus_hash"] == content_hash(docs)
    with pytest.raises(DataError, match=r"data.column='text' is not a column of .*part-0.parquet"):
        load_corpus(DataSpec(source="parquet", paths=(str(tmp_path / "*.parquet"),)))
    with pytest.raises(DataError, match=r"data.column='id' .* has type int64; it must be text"):
        load_corpus(DataSpec(source="parquet", paths=(str(tmp_path / "*.parquet"),), column="id"))


def test_two_processes_preparing_the_same_dataset_at_once_agree(text_files, tmp_path) -> None:
    script = textwrap.dedent(
        f"""
        from pathways_lite.model.data import DataSpec, prepare_dataset
        spec = DataSpec(source="files", paths=({str(text_files)!r},), vocab_size={SMALL_VOCAB})
        ds = prepare_dataset(spec, seq_len=16, cache_dir={str(tmp_path)!r})
        print(ds.hash, ds.tokenizer.hash, ds.path)
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env, text=True)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=120)[0].split() for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    assert outputs[0] == outputs[1]
    assert len(list((tmp_path / "datasets").iterdir())) == 1  # one folder, no temporaries left
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1


# --- errors --------------------------------------------------------------------------------


def test_a_glob_that_matches_nothing_is_named(tmp_path) -> None:
    pattern = str(tmp_path / "missing" / "*.txt")
    message = re.escape(f"data.paths entry '{pattern}' matches no files")
    with pytest.raises(DataError, match=message):
        prepare_dataset(DataSpec(source="files", paths=(pattern,)), seq_len=8, cache_dir=tmp_path)


def test_an_empty_corpus_is_named(tmp_path) -> None:
    (tmp_path / "empty.txt").write_text("")
    spec = DataSpec(source="files", paths=(str(tmp_path / "empty.txt"),))
    with pytest.raises(DataError, match=r"The corpus files .*empty.txt.* is empty"):
        prepare_dataset(spec, seq_len=8, cache_dir=tmp_path)


def test_an_undecodable_file_is_named_or_skipped_on_request(text_files, tmp_path) -> None:
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("café au lait\n".encode("latin-1"))
    paths = (str(text_files), str(bad))
    with pytest.raises(DataError, match=r"data file '.*latin1.txt' is not UTF-8.*skip_undecodable"):
        load_corpus(DataSpec(source="files", paths=paths))
    corpus = load_corpus(DataSpec(source="files", paths=paths, skip_undecodable=True))
    assert corpus.skipped == (str(bad),)
    assert len(corpus) == 4


def test_a_vocabulary_larger_than_the_corpus_supports_is_named(tmp_path) -> None:
    (tmp_path / "tiny.txt").write_text("hello world, hello data\n")
    spec = DataSpec(source="files", paths=(str(tmp_path / "tiny.txt"),), vocab_size=4096)
    with pytest.raises(DataError, match=r"data.vocab_size=4096 is larger than the corpus"):
        prepare_dataset(spec, seq_len=8, cache_dir=tmp_path)


def test_a_seq_len_larger_than_the_data_is_named(text_files, tmp_path) -> None:
    spec = DataSpec(source="files", paths=(str(text_files / "doc3.txt"),), vocab_size=SMALL_VOCAB)
    with pytest.raises(DataError, match=r"seq_len=100000 is larger than the data"):
        prepare_dataset(spec, seq_len=100_000, cache_dir=tmp_path)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"source": "s3"}, "data.source='s3' is not one of 'stdlib', 'files', 'parquet'"),
        ({"paths": ("a.txt",)}, r"data.paths=\['a.txt'\] is not used by data.source='stdlib'"),
        ({"source": "files"}, r"data.paths=\[\] is empty, but data.source='files'"),
        ({"vocab_size": 0}, "data.vocab_size=0 must be a positive integer"),
        ({"vocab_size": 200}, "data.vocab_size=200 is too small: .* at least 293"),
        ({"max_bytes": -5}, "data.max_bytes=-5 must be a positive integer"),
        ({"column": ""}, "data.column='' must be a non-empty column name"),
        ({"skip_undecodable": "yes"}, "data.skip_undecodable='yes' must be true or false"),
    ],
)
def test_bad_specs_are_named(kwargs, message) -> None:
    with pytest.raises(DataError, match=message):
        DataSpec(**kwargs)


def test_spec_from_dict_rejects_unknown_keys() -> None:
    assert DataSpec.from_dict({"source": "stdlib"}) == DataSpec()
    spec = DataSpec.from_dict({"source": "files", "paths": ["a/*.txt"]})
    assert spec.paths == ("a/*.txt",)
    with pytest.raises(DataError, match="data.vocab is not a data setting"):
        DataSpec.from_dict({"vocab": 10})
