"""Tokenized, packed training data in memory-mapped Arrow shards, read deterministically by step.

`prepare_dataset` turns a corpus (`DataSpec`) into a dataset folder:

    manifest.json      seq_len, example count, shard list, and the hashes: tokens (what readers
                       see), corpus, tokenizer, and the dataset hash over all of them
    tokenizer.model    a copy of the tokenizer, so the folder is self-contained
    shard-00000.arrow  Arrow IPC files, one column `tokens` of fixed-size lists (seq_len + 1)

Packing follows PaLM: every document is followed by the end-of-document token and the
documents are concatenated into one stream without padding; example i is the window
`stream[i * seq_len : i * seq_len + seq_len + 1]` (inputs are its first seq_len tokens,
targets its last seq_len, so every token after the first is a target exactly once). The tail
that does not fill a window is dropped.

Sampling: global position g = step * batch_size + j (j in the batch) falls in epoch
g // num_examples; each epoch is a permutation of the example ids seeded by (seed, epoch).
So the global batch of a step is a pure function of (seed, step, batch_size), and replica r of
R reads rows r * B/R ... (r + 1) * B/R of it, alone: islands read their slices without
talking to anyone, and resuming is just a step number. Reads go through a memory map: only the
rows of a batch are touched.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from . import corpus as corpus_lib
from .corpus import Corpus, DataError
from .tokenizer import (
    MIN_VOCAB_SIZE,
    MODEL_FILE,
    TRAINER_VERSION,
    Tokenizer,
    default_cache_dir,
    train_tokenizer,
)

logger = logging.getLogger(__name__)

__all__ = ["DataError", "DataSpec", "Dataset", "load_corpus", "prepare_dataset"]

SOURCES = ("stdlib", "files", "parquet", "stdlib-tasks", "text2text")
TEXT_SOURCES = ("stdlib", "files", "parquet")
MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
# 8 MB of UTF-8 text: the whole default build (corpus, 8k tokenizer, tokens) takes seconds.
DEFAULT_MAX_BYTES = 8_000_000
DEFAULT_SHARD_BYTES = 64 << 20
TOKEN_DTYPE = np.int32


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where the training text comes from and how it is tokenized (`data:` in a job spec).

    Attributes:
        source: "stdlib" (the running Python's standard library source), "files" (text files,
            folders or globs in `paths`) or "parquet" (Parquet/Arrow IPC files in `paths`).
        paths: files, folders or globs for "files" and "parquet"; empty for "stdlib".
        column: the text column of a "parquet" source.
        vocab_size: tokenizer size, special and byte pieces included.
        max_bytes: size cap of the corpus in UTF-8 bytes.
        skip_undecodable: skip files (rows) that are not UTF-8 instead of failing.
        task: the stdlib task of source "stdlib-tasks" (`model.tasks.TASKS`).
        objective: "lm" or "span_corruption" (`model.objectives`); a task source is learned
            text-to-text.
        mixture: several sources at once (`model.mixture.MixtureEntry`); then `source` is
            "mixture" and the fields above but vocab_size, max_bytes and skip_undecodable are
            the entries' own.
        mixture_weights: "static" (the entries' weights throughout) or "dynamic" (the
            controller re-weights every `mixture_every` steps from the per-source losses).
        mixture_every: N of dynamic weights.
    """

    source: str = "stdlib"
    paths: tuple[str, ...] = ()
    column: str = "text"
    vocab_size: int = 8192
    max_bytes: int = DEFAULT_MAX_BYTES
    skip_undecodable: bool = False
    task: str | None = None
    objective: str = "lm"
    mixture: tuple[Any, ...] = ()
    mixture_weights: str = "static"
    mixture_every: int = 100

    def __post_init__(self) -> None:
        from .mixture import WEIGHT_MODES, MixtureEntry, normalized_weights

        if self.mixture:
            entries = []
            for i, e in enumerate(self.mixture):
                field = f"data.mixture[{i}]"
                if isinstance(e, dict):
                    unknown = sorted(
                        set(e) - {"source", "paths", "task", "objective", "weight", "column"}
                    )
                    if unknown:
                        raise DataError(f"{field}.{unknown[0]} is not a mixture entry setting.")
                    e = MixtureEntry(**{**e, "paths": tuple(e.get("paths", ())), "field": field})
                elif isinstance(e, MixtureEntry):
                    e = dataclasses.replace(e, field=field)
                else:
                    raise DataError(f"{field}={e!r} must be a mapping such as {{source: stdlib}}.")
                entries.append(e)
            object.__setattr__(self, "mixture", tuple(entries))
            normalized_weights([e.weight for e in entries])
            if self.source not in ("mixture", "stdlib") or self.paths or self.task:
                raise DataError(
                    f"data.source={self.source!r} is not used with data.mixture: each entry "
                    "names its own source."
                )
            object.__setattr__(self, "source", "mixture")
        if self.mixture_weights not in WEIGHT_MODES:
            raise DataError(
                f"data.mixture_weights={self.mixture_weights!r} is not one of "
                f"{', '.join(map(repr, WEIGHT_MODES))}."
            )
        if self.mixture_weights == "dynamic" and len(self.mixture) < 2:
            raise DataError(
                "data.mixture_weights='dynamic' re-weights the sources of data.mixture; give at "
                "least two entries."
            )
        if (
            not isinstance(self.mixture_every, int)
            or isinstance(self.mixture_every, bool)
            or self.mixture_every < 1
        ):
            raise DataError(
                f"data.mixture_every={self.mixture_every!r} must be a positive integer."
            )
        if self.source == "mixture":
            self._check_sizes()
            return
        if not self.is_plain:
            self.entries()  # checks source, task, objective, paths
            self._check_sizes()
            return
        if self.source not in SOURCES:
            raise DataError(
                f"data.source={self.source!r} is not one of {', '.join(map(repr, SOURCES))}."
            )
        paths = self.paths
        if isinstance(paths, str | os.PathLike):
            paths = (paths,)
        try:
            paths = tuple(os.fspath(p) for p in paths)
        except TypeError:
            raise DataError(f"data.paths={self.paths!r} must be a list of paths.") from None
        object.__setattr__(self, "paths", paths)
        if self.source == "stdlib" and paths:
            raise DataError(
                f"data.paths={list(paths)!r} is not used by data.source='stdlib'; "
                "leave it empty or pick source 'files' or 'parquet'."
            )
        if self.source != "stdlib" and not paths:
            raise DataError(
                f"data.paths=[] is empty, but data.source={self.source!r} reads its files."
            )
        if not isinstance(self.column, str) or not self.column:
            raise DataError(f"data.column={self.column!r} must be a non-empty column name.")
        self._check_sizes()

    @property
    def is_plain(self) -> bool:
        """A single text source learned as a language model (the `Dataset` format)."""
        return not self.mixture and self.source in TEXT_SOURCES and self.objective == "lm"

    def entries(self) -> tuple[Any, ...]:
        """The mixture entries (one for a single non-plain source)."""
        from .mixture import MixtureEntry

        if self.mixture:
            return self.mixture
        return (
            MixtureEntry(
                source=self.source,
                paths=self.paths,
                task=self.task,
                objective=self.objective,
                column=self.column,
            ),
        )

    def _check_sizes(self) -> None:
        for name in ("vocab_size", "max_bytes"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise DataError(f"data.{name}={value!r} must be a positive integer.")
        if self.vocab_size < MIN_VOCAB_SIZE:
            raise DataError(
                f"data.vocab_size={self.vocab_size} is too small: the byte pieces and special "
                f"tokens alone take {MIN_VOCAB_SIZE - 1}, so it must be at least {MIN_VOCAB_SIZE}."
            )
        if not isinstance(self.skip_undecodable, bool):
            raise DataError(
                f"data.skip_undecodable={self.skip_undecodable!r} must be true or false."
            )

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataSpec:
        """A spec from a YAML/JSON mapping; unknown keys are rejected.

        Raises:
            DataError: an unknown key or a bad value.
        """
        if not isinstance(d, dict):
            raise DataError(f"data={d!r} must be a mapping such as {{source: stdlib}}.")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise DataError(
                f"data.{unknown[0]} is not a data setting; known: {', '.join(sorted(known))}."
            )
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """The spec as a JSON-ready mapping (paths as a list)."""
        d = dataclasses.asdict(self)
        d["paths"] = list(self.paths)
        d["mixture"] = [e.to_dict() for e in self.mixture]
        return d


def load_corpus(spec: DataSpec) -> Corpus:
    """Read the corpus a spec names (see `pathways_lite.model.corpus`).

    Raises:
        DataError: no files match, a file does not decode, the corpus is empty, ...
    """
    if not spec.is_plain:
        raise DataError(f"data.source={spec.source!r} is not a text corpus.")
    if spec.source == "stdlib":
        return corpus_lib.stdlib_corpus(spec.max_bytes)
    if spec.source == "files":
        return corpus_lib.files_corpus(spec.paths, spec.max_bytes, spec.skip_undecodable)
    return corpus_lib.parquet_corpus(spec.paths, spec.column, spec.max_bytes, spec.skip_undecodable)


def _dataset_hash(fields: dict[str, Any]) -> str:
    keys = ("format", "seq_len", "num_examples", "tokens_hash", "tokenizer_hash", "corpus_hash")
    blob = json.dumps({k: fields[k] for k in keys}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _check_seq_len(seq_len: int) -> None:
    if not isinstance(seq_len, int) or isinstance(seq_len, bool) or seq_len <= 0:
        raise DataError(f"seq_len={seq_len!r} must be a positive integer.")


def prepare_dataset(
    spec: DataSpec,
    seq_len: int,
    cache_dir: str | os.PathLike | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    tokenizer: Tokenizer | None = None,
) -> Dataset:
    """Tokenize and pack a corpus into a cached dataset folder, or open the cached one.

    The cache key is the corpus content hash, the vocabulary size and seq_len, so a changed
    file is noticed. The tokenizer is trained (or loaded) through `train_tokenizer` and cached
    on its own, shared between seq_lens.

    Args:
        spec: the corpus and tokenizer settings.
        seq_len: tokens per training sequence (each example holds seq_len + 1).
        cache_dir: cache root (datasets under `datasets/`, tokenizers under `tokenizers/`);
            defaults to `default_cache_dir()`.
        shard_bytes: target size of one Arrow shard.
        tokenizer: tokenize with this one (a checkpoint's) instead of training one; its
            hash is part of the cache key.

    Raises:
        DataError: bad input (see `load_corpus`, `train_tokenizer`), or seq_len larger than
            the data.
    """
    _check_seq_len(seq_len)
    if not isinstance(spec, DataSpec):
        raise DataError(f"spec={spec!r} must be a DataSpec.")
    if not spec.is_plain:
        from .mixture import prepare_mixture

        return prepare_mixture(
            spec.entries(),
            seq_len=seq_len,
            vocab_size=spec.vocab_size,
            max_bytes=spec.max_bytes,
            skip_undecodable=spec.skip_undecodable,
            cache_dir=cache_dir,
            tokenizer=tokenizer,
        )
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    corpus = load_corpus(spec)
    key_fields = {
        "trainer": TRAINER_VERSION,
        "format": FORMAT_VERSION,
        "corpus_hash": corpus.hash,
        "vocab_size": spec.vocab_size,
        "seq_len": seq_len,
        "shard_bytes": shard_bytes,
    }
    if tokenizer is not None:
        key_fields["tokenizer"] = tokenizer.hash
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    parent = root / "datasets"
    final = parent / key
    if (final / MANIFEST_FILE).is_file():
        ds = Dataset.open(final)
        logger.info("dataset %s from the cache (%s)", ds.hash[:12], final)
        return ds

    if tokenizer is None:
        tokenizer = train_tokenizer(corpus, spec.vocab_size, root)
    start = time.perf_counter()
    logger.info("tokenizing %d documents of %s", len(corpus), corpus.description)
    encoded = tokenizer.encode_batch(corpus.documents)
    lengths = np.fromiter((len(ids) + 1 for ids in encoded), dtype=np.int64, count=len(encoded))
    stream = np.empty(int(lengths.sum()), dtype=TOKEN_DTYPE)
    ends = np.cumsum(lengths)
    for ids, end in zip(encoded, ends, strict=True):
        stream[end - len(ids) - 1 : end - 1] = ids
        stream[end - 1] = tokenizer.eos_id
    del encoded
    num_examples = (len(stream) - 1) // seq_len
    if num_examples < 1:
        raise DataError(
            f"seq_len={seq_len} is larger than the data: the corpus {corpus.description} "
            f"tokenizes to {len(stream)} tokens, and one example needs {seq_len + 1}."
        )
    width = seq_len + 1
    # (num_examples, seq_len + 1): windows with stride seq_len, overlapping by one token.
    rows_nw = np.lib.stride_tricks.sliding_window_view(stream, width)[::seq_len][:num_examples]
    rows_nw = np.ascontiguousarray(rows_nw, dtype="<i4")
    tokens_hash = hashlib.sha256(rows_nw.tobytes()).hexdigest()
    logger.info(
        "packed %d tokens into %d examples of %d (+1) tokens in %.1f s; %d tail tokens dropped",
        len(stream),
        num_examples,
        seq_len,
        time.perf_counter() - start,
        len(stream) - 1 - num_examples * seq_len,
    )

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
    try:
        rows_per_shard = max(1, shard_bytes // (width * 4))
        shards = []
        for i, lo in enumerate(range(0, num_examples, rows_per_shard)):
            chunk_nw = rows_nw[lo : lo + rows_per_shard]
            name = f"shard-{i:05d}.arrow"
            values = pa.array(chunk_nw.reshape(-1), type=pa.int32())
            column = pa.FixedSizeListArray.from_arrays(values, width)
            batch = pa.record_batch([column], names=["tokens"])
            with pa.OSFile(str(tmp / name), "wb") as sink:
                with pa.ipc.new_file(sink, batch.schema) as writer:
                    writer.write_batch(batch)
            shards.append({"file": name, "num_examples": len(chunk_nw)})
        shutil.copyfile(tokenizer.path, tmp / MODEL_FILE)
        manifest = {
            "format": FORMAT_VERSION,
            "seq_len": seq_len,
            "num_examples": num_examples,
            "num_tokens": int(len(stream)),
            "tokens_hash": tokens_hash,
            "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size,
            "eos_id": tokenizer.eos_id,
            "corpus_hash": corpus.hash,
            "corpus": {
                "description": corpus.description,
                "documents": len(corpus),
                "bytes": corpus.num_bytes,
                "skipped": list(corpus.skipped),
                "truncated": corpus.truncated,
            },
            "spec": spec.to_dict(),
            "shards": shards,
        }
        manifest["hash"] = _dataset_hash(manifest)
        # The manifest is written last: a folder with a manifest is complete.
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():
                raise
            logger.info("dataset %s was built concurrently; using %s", key[:12], final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    ds = Dataset.open(final)
    logger.info(
        "dataset %s: %d examples of seq_len %d in %d shards at %s",
        ds.hash[:12],
        ds.num_examples,
        seq_len,
        len(shards),
        final,
    )
    return ds


class Dataset:
    """A prepared dataset folder, memory-mapped; batches are pure functions of (seed, step).

    Attributes:
        path: the dataset folder.
        hash: hex dataset hash (tokens, seq_len, tokenizer and corpus hashes together).
        tokenizer: the tokenizer the tokens come from.
        seq_len: tokens per training sequence; rows hold seq_len + 1.
        num_examples: number of examples (rows).
        manifest: the parsed manifest.json.
    """

    _PERMUTATION_CACHE = 4

    def __init__(self, path: Path, manifest: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.path = path
        self.manifest = manifest
        self.hash: str = manifest["hash"]
        self.tokenizer = tokenizer
        self.seq_len: int = manifest["seq_len"]
        self.num_examples: int = manifest["num_examples"]
        self.corpus_hash: str = manifest["corpus_hash"]
        self.tokens_hash: str = manifest["tokens_hash"]
        width = self.seq_len + 1
        self._shards: list[np.ndarray] = []  # each (rows, seq_len + 1), a view of a memory map
        self._maps: list[pa.MemoryMappedFile] = []
        for shard in manifest["shards"]:
            mm = pa.memory_map(str(path / shard["file"]), "r")
            batch = pa.ipc.open_file(mm).get_batch(0)
            values = batch.column(0).flatten()
            rows_nw = values.to_numpy(zero_copy_only=True).reshape(-1, width)
            if len(rows_nw) != shard["num_examples"]:
                raise DataError(
                    f"dataset shard {str(path / shard['file'])!r} holds {len(rows_nw)} "
                    f"examples, but the manifest says {shard['num_examples']}."
                )
            self._maps.append(mm)
            self._shards.append(rows_nw)
        counts = [len(s) for s in self._shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        if self._starts[-1] != self.num_examples:
            raise DataError(
                f"dataset {str(path)!r} holds {self._starts[-1]} examples, but the manifest "
                f"says {self.num_examples}."
            )
        self._perms: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    @classmethod
    def open(
        cls, path: str | os.PathLike, expected_hash: str | None = None, verify: bool = False
    ) -> Dataset:
        """Open a dataset folder written by `prepare_dataset` (memory-mapped).

        Args:
            path: the dataset folder.
            expected_hash: when given, the manifest's dataset hash must equal it.
            verify: also re-hash every token and the tokenizer (reads the whole dataset).

        Raises:
            DataError: a missing or inconsistent folder, or a hash mismatch.
        """
        path = Path(path)
        manifest_path = path / MANIFEST_FILE
        if not manifest_path.is_file():
            raise DataError(f"dataset folder {str(path)!r} has no {MANIFEST_FILE}.")
        manifest = json.loads(manifest_path.read_text())
        if manifest.get("kind") == "mixture":
            from .mixture import MixtureDataset

            return MixtureDataset.open(path, expected_hash)
        if manifest.get("format") != FORMAT_VERSION:
            raise DataError(
                f"dataset {str(path)!r} has format {manifest.get('format')!r}; this version "
                f"reads format {FORMAT_VERSION}."
            )
        if _dataset_hash(manifest) != manifest["hash"]:
            raise DataError(f"dataset manifest {str(manifest_path)!r} does not match its hash.")
        if expected_hash is not None and expected_hash != manifest["hash"]:
            raise DataError(
                f"dataset {str(path)!r} has hash {manifest['hash']}, not the expected "
                f"{expected_hash}."
            )
        tokenizer = Tokenizer.load(path / MODEL_FILE, expected_hash=manifest["tokenizer_hash"])
        ds = cls(path, manifest, tokenizer)
        if verify:
            ds.verify()
        return ds

    def __reduce__(self):
        # Pickles as its folder and hash; the receiver memory-maps the files itself.
        return (Dataset.open, (str(self.path), self.hash))

    def __repr__(self) -> str:
        return (
            f"Dataset(hash={self.hash[:12]}, seq_len={self.seq_len}, "
            f"num_examples={self.num_examples}, path={self.path})"
        )

    def __len__(self) -> int:
        return self.num_examples

    def verify(self) -> None:
        """Re-hash every token and compare with the manifest.

        Raises:
            DataError: if the tokens changed.
        """
        h = hashlib.sha256()
        for rows_nw in self._shards:
            h.update(np.ascontiguousarray(rows_nw, dtype="<i4").tobytes())
        if h.hexdigest() != self.tokens_hash:
            raise DataError(
                f"dataset {str(self.path)!r}: the tokens hash to {h.hexdigest()}, but the "
                f"manifest says {self.tokens_hash}."
            )

    def examples(self, ids: np.ndarray) -> np.ndarray:
        """Rows of the given example ids, in that order: (len(ids), seq_len + 1) int32.

        Raises:
            IndexError: if an id is outside 0 .. num_examples - 1.
        """
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_examples):
            raise IndexError(f"example ids must be in 0 .. {self.num_examples - 1}.")
        out_bt = np.empty((len(ids), self.seq_len + 1), dtype=TOKEN_DTYPE)
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        for s in np.unique(shard_of):
            where = np.nonzero(shard_of == s)[0]
            out_bt[where] = self._shards[s][ids[where] - self._starts[s]]
        return out_bt

    def _permutation(self, seed: int, epoch: int) -> np.ndarray:
        key = (seed, epoch)
        perm = self._perms.get(key)
        if perm is None:
            rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
            perm = rng.permutation(self.num_examples)
            self._perms[key] = perm
            if len(self._perms) > self._PERMUTATION_CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def example_ids(
        self, step: int, batch_size: int, seed: int, lo: int = 0, hi: int | None = None
    ) -> np.ndarray:
        """Example ids of rows lo .. hi - 1 of the global batch of `step`: (hi - lo,) int64."""
        for name, value in (("step", step), ("seed", seed)):
            if not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"{name}={value!r} must be a non-negative integer.")
        if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        hi = batch_size if hi is None else hi
        positions = int(step) * int(batch_size) + np.arange(lo, hi, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.num_examples)
        ids = np.empty(len(positions), dtype=np.int64)
        for epoch in np.unique(epochs):
            where = epochs == epoch
            ids[where] = self._permutation(int(seed), int(epoch))[offsets[where]]
        return ids

    def global_batch(self, step: int, batch_size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole batch of `step`.

        Returns:
            tokens (batch_size, seq_len + 1) int32 (inputs `[:, :-1]`, targets `[:, 1:]`) and
            the example ids (batch_size,) int64 it holds.

        Raises:
            ValueError: a negative step or seed, or a non-positive batch_size.
        """
        ids = self.example_ids(step, batch_size, seed)
        return self.examples(ids), ids

    def replica_batch(
        self, step: int, batch_size: int, seed: int, replica: int, num_replicas: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Replica `replica`'s contiguous slice of the global batch, read on its own.

        Returns:
            tokens (batch_size / num_replicas, seq_len + 1) int32 and their example ids.

        Raises:
            ValueError: if num_replicas does not divide batch_size or replica is out of range.
        """
        if not isinstance(num_replicas, int | np.integer) or num_replicas <= 0:
            raise ValueError(f"num_replicas={num_replicas!r} must be a positive integer.")
        if not isinstance(replica, int | np.integer) or not 0 <= replica < num_replicas:
            raise ValueError(f"replica={replica!r} must be in 0 .. {num_replicas - 1}.")
        if not isinstance(batch_size, int | np.integer) or batch_size <= 0:
            raise ValueError(f"batch_size={batch_size!r} must be a positive integer.")
        if batch_size % num_replicas:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by num_replicas={num_replicas}."
            )
        per = batch_size // num_replicas
        ids = self.example_ids(step, batch_size, seed, replica * per, (replica + 1) * per)
        return self.examples(ids), ids
