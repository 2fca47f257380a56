"""Mixtures of sources and objectives: prepared rows per source, batches drawn by weight.

`prepare_mixture` turns the entries of a `data.mixture` (or one non-LM `data` source) into a
folder:

    manifest.json        kind "mixture", seq_len, the sources (name, objective, weight,
                         rows), whether rows carry segment ids, the hashes
    tokenizer.model      one tokenizer trained on the union of every source's text
    source-NN.tokens.npy (rows, seq_len + 1) int32, and .mask.npy (uint8: which tokens count
                         in the loss), .segments.npy (int32, text-to-text packing only)

Sampling: the source of row j of step s's global batch is drawn from the step's weights
(`sources_of_step`: B uniforms from a generator seeded by (seed, step), each mapped through
the cumulative normalised weights), and its example inside that source is position
`s * B + j` of the source's own epoch permutations (seeded by (seed, source, epoch)), as in
`model.data`. So a global batch is a pure function of (seed, step, weights): every island
reads its slice alone and a resume is a step number plus the weights the controller recorded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import corpus as corpus_lib
from . import objectives, tasks
from .corpus import Corpus, DataError
from .tokenizer import MODEL_FILE, Tokenizer, train_tokenizer

logger = logging.getLogger(__name__)

TEXT_SOURCES = ("stdlib", "files", "parquet")
ALL_SOURCES = TEXT_SOURCES + tasks.TASK_SOURCES
MANIFEST_FILE = "manifest.json"
FORMAT = "mixture-1"
WEIGHT_MODES = ("static", "dynamic")


@dataclasses.dataclass(frozen=True)
class MixtureEntry:
    """One source of a mixture (`data.mixture[i]`).

    Attributes:
        source: a text source ("stdlib", "files", "parquet") or a task source
            ("stdlib-tasks", "text2text").
        paths: files for "files", "parquet" and "text2text".
        task: the stdlib task ("stdlib-tasks" only).
        objective: "lm" or "span_corruption" for text sources; a task source is always
            learned text-to-text (loss on its targets), so it takes "lm" (the default).
        weight: the source's share of the batch rows, relative to the other entries.
        column: the text column of a "parquet" source.
        field: where the entry sits in the spec, for error messages.
    """

    source: str
    paths: tuple[str, ...] = ()
    task: str | None = None
    objective: str = "lm"
    weight: float = 1.0
    column: str = "text"
    field: str = "data"

    def __post_init__(self) -> None:
        f = self.field
        object.__setattr__(self, "paths", tuple(os.fspath(p) for p in self.paths))
        if self.source not in ALL_SOURCES:
            raise DataError(
                f"{f}.source={self.source!r} is not one of {', '.join(map(repr, ALL_SOURCES))}."
            )
        if self.objective not in objectives.OBJECTIVES:
            raise DataError(
                f"{f}.objective={self.objective!r} is not one of "
                f"{', '.join(map(repr, objectives.OBJECTIVES))}."
            )
        if self.is_task and self.objective != "lm":
            raise DataError(
                f"{f}.objective={self.objective!r} does not apply to {f}.source="
                f"{self.source!r}: a task source is learned text-to-text (loss on its targets)."
            )
        if self.source == "stdlib-tasks" and self.task not in tasks.TASKS:
            raise DataError(
                f"{f}.task={self.task!r} is not one of {', '.join(map(repr, tasks.TASKS))}."
            )
        if self.source != "stdlib-tasks" and self.task is not None:
            raise DataError(f"{f}.task={self.task!r} is only for source 'stdlib-tasks'.")
        needs_paths = self.source in ("files", "parquet", "text2text")
        if needs_paths and not self.paths:
            raise DataError(f"{f}.paths=[] is empty, but {f}.source={self.source!r} reads files.")
        if not needs_paths and self.paths:
            raise DataError(
                f"{f}.paths={list(self.paths)!r} is not used by {f}.source={self.source!r}."
            )
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not math.isfinite(w) or w < 0:
            raise DataError(f"{f}.weight={w!r} must be a finite number >= 0.")

    @property
    def is_task(self) -> bool:
        return self.source in tasks.TASK_SOURCES

    @property
    def name(self) -> str:
        """A short name for metrics: the task, or source/objective."""
        if self.task:
            return self.task
        if self.source == "text2text":
            return f"text2text:{Path(self.paths[0]).stem}"
        return self.source if self.objective == "lm" else f"{self.source}:{self.objective}"

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["paths"] = list(self.paths)
        del d["field"]
        return d


def normalized_weights(weights: Sequence[float], field: str = "data.mixture") -> np.ndarray:
    """Weights divided by their sum, as float64.

    Raises:
        DataError: a weight is negative or not finite, or they do not sum to a positive number.
    """
    w = np.asarray([float(x) for x in weights], dtype=np.float64)
    if w.size == 0 or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise DataError(
            f"{field} weights {[float(x) for x in weights]!r} must be finite, >= 0, and sum to "
            "a positive number."
        )
    return w / w.sum()


def _entry_text(entry: MixtureEntry, max_bytes: int, skip_undecodable: bool) -> Any:
    """A text source's Corpus, or a task source's training pairs."""
    if entry.source == "stdlib":
        return corpus_lib.stdlib_corpus(max_bytes)
    if entry.source == "files":
        return corpus_lib.files_corpus(entry.paths, max_bytes, skip_undecodable)
    if entry.source == "parquet":
        return corpus_lib.parquet_corpus(entry.paths, entry.column, max_bytes, skip_undecodable)
    try:
        return tasks.task_pairs(entry.source, entry.task, entry.paths, "train", max_bytes=max_bytes)
    except DataError as e:
        raise DataError(f"{entry.field}: {e}") from None


def _union_corpus(texts: Sequence[Any], entries: Sequence[MixtureEntry]) -> Corpus:
    docs: list[str] = []
    names: list[str] = []
    for entry, text in zip(entries, texts, strict=True):
        if isinstance(text, Corpus):
            docs.extend(text.documents)
            names.extend(text.names)
        else:
            for i, pair in enumerate(text):
                docs.append(f"{pair.inputs}\n{pair.targets}")
                names.append(f"{entry.name}#{i}")
    return Corpus(
        documents=tuple(docs),
        names=tuple(names),
        hash=corpus_lib.content_hash(docs),
        num_bytes=sum(len(d.encode()) for d in docs),
        description=f"mixture of {', '.join(e.name for e in entries)}",
    )


def _lm_rows(corpus: Corpus, tok: Tokenizer, seq_len: int) -> np.ndarray:
    encoded = tok.encode_batch(corpus.documents)
    stream = np.fromiter(
        (t for ids in encoded for t in (*ids, tok.eos_id)), dtype=np.int32
    )  # documents, each followed by the end-of-document token
    n = (len(stream) - 1) // seq_len
    if n < 1:
        raise DataError(
            f"seq_len={seq_len} is larger than the data: {corpus.description} tokenizes to "
            f"{len(stream)} tokens, and one example needs {seq_len + 1}."
        )
    windows = np.lib.stride_tricks.sliding_window_view(stream, seq_len + 1)[::seq_len][:n]
    return np.ascontiguousarray(windows, dtype=np.int32)


def _span_rows(corpus: Corpus, tok: Tokenizer, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    length = objectives.raw_length(seq_len, len(tok.sentinel_ids))
    encoded = tok.encode_batch(corpus.documents)
    stream = np.fromiter((t for ids in encoded for t in (*ids, tok.eos_id)), dtype=np.int32)
    n = len(stream) // length
    if n < 1:
        raise DataError(
            f"seq_len={seq_len} is larger than the data: {corpus.description} tokenizes to "
            f"{len(stream)} tokens, and one span-corruption example reads {length}."
        )
    tokens = np.empty((n, seq_len + 1), dtype=np.int32)
    mask = np.empty((n, seq_len + 1), dtype=np.uint8)
    for i in range(n):
        # The noise of example i depends on i alone: the rows are the same on every machine.
        rng = np.random.default_rng(np.random.SeedSequence([i, 0x5A1]))
        tokens[i], mask[i] = objectives.span_corrupt(
            stream[i * length : (i + 1) * length],
            rng,
            seq_len=seq_len,
            sep_id=tok.sep_id,
            eos_id=tok.eos_id,
            sentinel_ids=tok.sentinel_ids,
        )
    return tokens, mask


def prepare_mixture(
    entries: Sequence[MixtureEntry],
    *,
    seq_len: int,
    vocab_size: int,
    max_bytes: int,
    skip_undecodable: bool = False,
    cache_dir: str | os.PathLike | None = None,
    tokenizer: Tokenizer | None = None,
) -> MixtureDataset:
    """Tokenize every entry with one tokenizer trained on their union; cache the rows.

    `max_bytes` caps each source's text. The cache key covers the sources' content, the
    entries (weights included), vocab_size and seq_len. A given `tokenizer` (a fine-tuning
    job's checkpoint's) is used instead of training one, and is part of the key.

    Raises:
        DataError: bad input (a missing file, a task file without inputs/targets, weights
            that do not sum to a positive number, data shorter than one row, ...).
    """
    from .tokenizer import TRAINER_VERSION, default_cache_dir

    weights = normalized_weights([e.weight for e in entries])
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    texts = [_entry_text(e, max_bytes, skip_undecodable) for e in entries]
    union = _union_corpus(texts, entries)
    key_fields = {
        "format": FORMAT,
        "trainer": TRAINER_VERSION,
        "union": union.hash,
        "entries": [e.to_dict() for e in entries],
        "vocab_size": vocab_size,
        "seq_len": seq_len,
        "tokenizer": tokenizer.hash if tokenizer is not None else None,
    }
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    parent = root / "datasets"
    final = parent / key
    if (final / MANIFEST_FILE).is_file():
        return MixtureDataset.open(final)
    tok = tokenizer if tokenizer is not None else train_tokenizer(union, vocab_size, root)
    if tok.sep_id < 0 or not tok.sentinel_ids:
        raise DataError(f"tokenizer {tok.path} has no separator or sentinels (retrain it).")
    start = time.perf_counter()
    segmented = any(e.is_task for e in entries)
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=parent))
    try:
        sources = []
        names = [e.name for e in entries]
        # Two entries of the same name (say two file sets) are told apart by their index.
        names = [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]
        h = hashlib.sha256(FORMAT.encode())
        for i, (entry, text) in enumerate(zip(entries, texts, strict=True)):
            if entry.is_task:
                ids_in = tok.encode_batch([p.inputs for p in text])
                ids_out = tok.encode_batch([p.targets for p in text])
                tokens, mask, segments = objectives.pack_text2text(
                    list(zip(ids_in, ids_out, strict=True)),
                    seq_len=seq_len,
                    sep_id=tok.sep_id,
                    eos_id=tok.eos_id,
                )
            elif entry.objective == "span_corruption":
                tokens, mask = _span_rows(text, tok, seq_len)
                segments = np.ones_like(tokens, dtype=np.int32)  # one example per row
            else:
                tokens = _lm_rows(text, tok, seq_len)
                mask = np.ones_like(tokens, dtype=np.uint8)
                segments = np.ones_like(tokens, dtype=np.int32)
            files = {}
            for part, arr in (("tokens", tokens), ("mask", mask), ("segments", segments)):
                if part == "segments" and not segmented:
                    continue
                name = f"source-{i:02d}.{part}.npy"
                np.save(tmp / name, np.ascontiguousarray(arr))
                h.update(name.encode())
                h.update(np.ascontiguousarray(arr).tobytes())
                files[part] = name
            sources.append(
                {
                    "name": names[i],
                    "entry": entry.to_dict(),
                    "weight": float(weights[i]),
                    "num_examples": len(tokens),
                    "target_tokens": int(mask[:, 1:].sum()),
                    "files": files,
                }
            )
            logger.info(
                "mixture source %s: %d rows of %d (+1) tokens", entry.name, len(tokens), seq_len
            )
        shutil.copyfile(tok.path, tmp / MODEL_FILE)
        manifest = {
            "kind": "mixture",
            "format": FORMAT,
            "seq_len": seq_len,
            "segmented": segmented,
            "sources": sources,
            "tokens_hash": h.hexdigest(),
            "tokenizer_hash": tok.hash,
            "vocab_size": tok.vocab_size,
            "corpus_hash": union.hash,
        }
        manifest["hash"] = _manifest_hash(manifest)
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MANIFEST_FILE).is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info("prepared mixture %s in %.1f s", final, time.perf_counter() - start)
    return MixtureDataset.open(final)


def _manifest_hash(manifest: dict[str, Any]) -> str:
    blob = json.dumps({k: v for k, v in manifest.items() if k != "hash"}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


@dataclasses.dataclass
class Batch:
    """Rows of a mixture batch: what the masked step reads.

    Attributes:
        tokens: (B, T + 1) int32; inputs `[:, :-1]`, targets `[:, 1:]`.
        weights: (B, T) float32: 1 where a target counts in the loss.
        sources: (B,) int32: the source index of each row.
        segments: (B, T) int32 example ids of the input positions, or None (no text-to-text
            source in the mixture: plain causal attention).
        ids: (B,) int64 example ids inside their sources.
    """

    tokens: np.ndarray
    weights: np.ndarray
    sources: np.ndarray
    segments: np.ndarray | None
    ids: np.ndarray


class MixtureDataset:
    """A prepared mixture folder; batches are pure functions of (seed, step, weights)."""

    _PERMUTATION_CACHE = 16

    def __init__(self, path: Path, manifest: dict[str, Any], tokenizer: Tokenizer) -> None:
        self.path = path
        self.manifest = manifest
        self.hash: str = manifest["hash"]
        self.tokenizer = tokenizer
        self.seq_len: int = manifest["seq_len"]
        self.segmented: bool = manifest["segmented"]
        self.source_names: tuple[str, ...] = tuple(s["name"] for s in manifest["sources"])
        self.base_weights = np.asarray([s["weight"] for s in manifest["sources"]])
        self.num_examples = sum(s["num_examples"] for s in manifest["sources"])
        self._arrays: list[dict[str, np.ndarray]] = [
            {part: np.load(path / name, mmap_mode="r") for part, name in s["files"].items()}
            for s in manifest["sources"]
        ]
        self._perms: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()

    @property
    def num_sources(self) -> int:
        return len(self.source_names)

    @classmethod
    def open(cls, path: str | os.PathLike, expected_hash: str | None = None) -> MixtureDataset:
        """Open a folder written by `prepare_mixture`.

        Raises:
            DataError: a missing or inconsistent folder, or a hash mismatch.
        """
        path = Path(path)
        mpath = path / MANIFEST_FILE
        if not mpath.is_file():
            raise DataError(f"dataset folder {str(path)!r} has no {MANIFEST_FILE}.")
        manifest = json.loads(mpath.read_text())
        if manifest.get("format") != FORMAT or _manifest_hash(manifest) != manifest.get("hash"):
            raise DataError(f"mixture manifest {str(mpath)!r} is not format {FORMAT} or damaged.")
        if expected_hash is not None and expected_hash != manifest["hash"]:
            raise DataError(
                f"dataset {str(path)!r} has hash {manifest['hash']}, not the expected "
                f"{expected_hash}."
            )
        tok = Tokenizer.load(path / MODEL_FILE, expected_hash=manifest["tokenizer_hash"])
        return cls(path, manifest, tok)

    def __reduce__(self):
        return (MixtureDataset.open, (str(self.path), self.hash))

    def __repr__(self) -> str:
        return f"MixtureDataset(hash={self.hash[:12]}, sources={self.source_names})"

    def __len__(self) -> int:
        return self.num_examples

    def _permutation(self, seed: int, source: int, epoch: int) -> np.ndarray:
        key = (seed, source, epoch)
        perm = self._perms.get(key)
        if perm is None:
            n = self.manifest["sources"][source]["num_examples"]
            rng = np.random.default_rng(np.random.SeedSequence([seed, source, epoch, 0x6D78]))
            perm = self._perms[key] = rng.permutation(n)
            if len(self._perms) > self._PERMUTATION_CACHE:
                self._perms.popitem(last=False)
        else:
            self._perms.move_to_end(key)
        return perm

    def sources_of_step(
        self, step: int, batch_size: int, seed: int, weights: Sequence[float] | None = None
    ) -> np.ndarray:
        """The source index of every row of step's global batch: (batch_size,) int32."""
        w = self.base_weights if weights is None or len(weights) == 0 else weights
        if len(w) != self.num_sources:
            raise ValueError(f"{len(w)} mixture weights were given for {self.num_sources} sources.")
        cum = np.cumsum(normalized_weights(w))
        rng = np.random.default_rng(np.random.SeedSequence([seed, step, 0x4D49]))
        u = rng.random(batch_size)
        src = np.searchsorted(cum, u, side="right")
        return np.minimum(src, self.num_sources - 1).astype(np.int32)

    def batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        weights: Sequence[float] | None = None,
        lo: int = 0,
        hi: int | None = None,
    ) -> Batch:
        """Rows lo .. hi - 1 of the global batch of `step` under `weights` (default: the
        manifest's)."""
        hi = batch_size if hi is None else hi
        src = self.sources_of_step(step, batch_size, seed, weights)[lo:hi]
        t = self.seq_len
        tokens = np.empty((hi - lo, t + 1), dtype=np.int32)
        mask = np.empty((hi - lo, t + 1), dtype=np.uint8)
        segments = np.empty((hi - lo, t + 1), dtype=np.int32) if self.segmented else None
        ids = np.empty(hi - lo, dtype=np.int64)
        for r, (j, s) in enumerate(zip(range(lo, hi), src, strict=True)):
            n = self.manifest["sources"][s]["num_examples"]
            epoch, off = divmod(step * batch_size + j, n)
            i = int(self._permutation(seed, int(s), epoch)[off])
            arrays = self._arrays[s]
            tokens[r] = arrays["tokens"][i]
            mask[r] = arrays["mask"][i]
            if segments is not None:
                segments[r] = arrays["segments"][i]
            ids[r] = i
        return Batch(
            tokens=tokens,
            weights=mask[:, 1:].astype(np.float32),
            sources=src,
            segments=None if segments is None else segments[:, :-1],
            ids=ids,
        )

    def global_batch(
        self, step: int, batch_size: int, seed: int, weights: Sequence[float] | None = None
    ) -> Batch:
        """The whole batch of `step`."""
        return self.batch(step, batch_size, seed, weights)

    def replica_batch(
        self,
        step: int,
        batch_size: int,
        seed: int,
        replica: int,
        num_replicas: int,
        weights: Sequence[float] | None = None,
    ) -> Batch:
        """Replica `replica`'s contiguous slice of the global batch, read on its own."""
        if batch_size % num_replicas:
            raise ValueError(
                f"batch_size={batch_size} is not divisible by num_replicas={num_replicas}."
            )
        per = batch_size // num_replicas
        return self.batch(step, batch_size, seed, weights, replica * per, (replica + 1) * per)


# Dynamic weights: a source's weight moves at most by a factor e^(+-MAX_SHIFT) per update,
# before renormalisation (so at most e^(2 MAX_SHIFT) from its base weight).
MAX_SHIFT = 1.0


def dynamic_weights(
    base: Sequence[float], loss_sums: Sequence[float], counts: Sequence[float]
) -> tuple[float, ...]:
    """The re-weighting rule of `data.mixture_weights: dynamic` (a pure function).

    With p the normalised base weights and l_i = loss_sums[i] / counts[i] each source's mean
    token loss over the previous block of steps (global, all islands), and l_bar the p-weighted
    mean of l over the sources that had targets:

        w_i = p_i * exp(clip(l_i - l_bar, -MAX_SHIFT, MAX_SHIFT)) / Z

    (a source without targets in the block keeps its base shift 0). Sources whose loss is
    above the mixture's mean get more rows, bounded: w_i / p_i lies in [e^-2, e^2].
    """
    p = normalized_weights(base)
    sums = np.asarray(loss_sums, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    seen = n > 0
    shift = np.zeros_like(p)
    if seen.any():
        mean_i = np.where(seen, sums / np.maximum(n, 1.0), 0.0)
        l_bar = float(np.sum(p[seen] * mean_i[seen]) / np.sum(p[seen]))
        shift = np.where(seen, np.clip(mean_i - l_bar, -MAX_SHIFT, MAX_SHIFT), 0.0)
    w = p * np.exp(shift)
    return tuple(float(x) for x in w / w.sum())


def weights_block_source(step: int, every: int) -> tuple[int, int] | None:
    """The steps [lo, hi) whose losses set the weights of `step` under dynamic weights, or
    None for the first two blocks (base weights): the weights of steps [k + N, k + 2N) come
    from the losses of steps [k - N, k), so the controller knows them with up to N steps in
    flight."""
    block = step // every
    if block < 2:
        return None
    return (block - 2) * every, (block - 1) * every
