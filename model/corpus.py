"""Text corpora for tokenizer training and datasets: the Python stdlib, text files, Parquet/Arrow.

A corpus is an ordered list of documents (one per file, or one per table row) with a content
hash, so that two machines that read different bytes (for instance two different Pythons for
the default `stdlib` corpus) end up with different hashes instead of silently training on
different data.

The default corpus is the standard library source of the running interpreter
(`sysconfig.get_paths()["stdlib"]`): every `*.py` file below it, in sorted order of its
relative POSIX path, except

- anything inside a folder named `site-packages` or `dist-packages` (third-party code),
- anything inside a folder named `test`, `tests` or `idle_test`: the top-level `Lib/test`
  suite and the packages' own test folders (`ctypes/test`, `unittest/test`, `lib2to3/tests`,
  `idlelib/idle_test`, ...),
- the interpreter's build configuration (`config-*` folders and `_sysconfigdata_*.py`), which
  holds machine-specific paths and would make the hash differ between identical Pythons,
- `__pycache__`.

Files that do not decode as UTF-8 are skipped and counted in the log. The corpus is capped at
`max_bytes` bytes of UTF-8 text; the document that crosses the cap is cut at a character
boundary and the rest is dropped.
"""

from __future__ import annotations

import dataclasses
import glob
import hashlib
import logging
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

# Folder names whose contents never enter the default corpus (see the module docstring).
STDLIB_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# File suffixes read as tables by the "parquet" source.
PARQUET_SUFFIXES = {".parquet": "parquet", ".arrow": "ipc", ".feather": "ipc", ".ipc": "ipc"}
_HASH_DOMAIN = b"pathways_lite corpus v1\0"


class DataError(ValueError):
    """Bad data input: the message is a sentence naming the field or file and the bad value."""


@dataclasses.dataclass(frozen=True)
class Corpus:
    """An ordered list of documents and the content hash that identifies them.

    Attributes:
        documents: the texts, in corpus order; none is empty.
        names: one name per document (a relative path, a file, or `file#row`).
        hash: hex SHA-256 over the documents' UTF-8 bytes, length-prefixed, in order.
        num_bytes: total UTF-8 bytes of the documents.
        description: where the corpus came from, for logs and errors.
        skipped: files or rows that were skipped because they do not decode as UTF-8.
        truncated: whether the size cap cut the corpus short.
    """

    documents: tuple[str, ...]
    names: tuple[str, ...]
    hash: str
    num_bytes: int
    description: str
    skipped: tuple[str, ...] = ()
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.documents)

    def lines(self) -> Iterator[str]:
        """Every non-empty line of every document, without its newline (tokenizer training)."""
        for doc in self.documents:
            for line in doc.split("\n"):
                if line:
                    yield line


def content_hash(documents: Iterable[str]) -> str:
    """Hex SHA-256 of documents in order; lengths are included, so boundaries count."""
    h = hashlib.sha256(_HASH_DOMAIN)
    for doc in documents:
        data = doc.encode("utf-8")
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.hexdigest()


class _Builder:
    """Accumulates documents up to a byte cap."""

    def __init__(self, max_bytes: int, description: str) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0:
            raise DataError(f"data.max_bytes={max_bytes!r} must be a positive integer.")
        self.max_bytes = max_bytes
        self.description = description
        self.documents: list[str] = []
        self.names: list[str] = []
        self.skipped: list[str] = []
        self.num_bytes = 0
        self.truncated = False

    @property
    def full(self) -> bool:
        return self.truncated or self.num_bytes >= self.max_bytes

    def add(self, name: str, text: str) -> None:
        if not text or self.full:
            return
        data = text.encode("utf-8")
        room = self.max_bytes - self.num_bytes
        if len(data) > room:
            # Cut at a character boundary: drop a partial multi-byte sequence at the end.
            text = data[:room].decode("utf-8", errors="ignore")
            data = text.encode("utf-8")
            self.truncated = True
            logger.info(
                "corpus %s reached data.max_bytes=%d inside %s; the rest is dropped",
                self.description,
                self.max_bytes,
                name,
            )
            if not text:
                return
        self.documents.append(text)
        self.names.append(name)
        self.num_bytes += len(data)

    def build(self) -> Corpus:
        if not self.documents:
            raise DataError(f"The corpus {self.description} is empty: it holds no text at all.")
        corpus = Corpus(
            documents=tuple(self.documents),
            names=tuple(self.names),
            hash=content_hash(self.documents),
            num_bytes=self.num_bytes,
            description=self.description,
            skipped=tuple(self.skipped),
            truncated=self.truncated,
        )
        logger.info(
            "corpus %s: %d documents, %d bytes, %d skipped as not UTF-8, hash %s",
            corpus.description,
            len(corpus),
            corpus.num_bytes,
            len(corpus.skipped),
            corpus.hash[:12],
        )
        return corpus


def stdlib_root() -> Path:
    """The standard library folder of the running interpreter (the base one inside a venv)."""
    return Path(sysconfig.get_paths()["stdlib"]).resolve()


def stdlib_files(root: Path | None = None) -> list[str]:
    """Relative POSIX paths of the default corpus's files, sorted (before the size cap).

    Args:
        root: the stdlib folder; defaults to `stdlib_root()`.
    """
    root = stdlib_root() if root is None else Path(root)
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Prune in place so os.walk never descends into excluded folders.
        dirnames[:] = [
            d for d in dirnames if d not in STDLIB_EXCLUDED_DIRS and not d.startswith("config-")
        ]
        for name in filenames:
            if name.endswith(".py") and not name.startswith("_sysconfigdata_"):
                found.append((rel_dir / name).as_posix())
    return sorted(found)


def stdlib_corpus(max_bytes: int) -> Corpus:
    """The default corpus: the running interpreter's standard library source (module docstring)."""
    root = stdlib_root()
    builder = _Builder(max_bytes, f"stdlib ({root})")
    for rel in stdlib_files(root):
        if builder.full:
            break
        try:
            text = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            builder.skipped.append(rel)
            continue
        builder.add(rel, text)
    if builder.skipped:
        logger.info(
            "stdlib corpus: skipped %d files that are not UTF-8: %s",
            len(builder.skipped),
            ", ".join(builder.skipped[:10]),
        )
    return builder.build()


def expand_paths(paths: Iterable[str]) -> list[Path]:
    """Files named by `paths` (files, folders searched recursively, or globs), sorted per entry.

    Raises:
        DataError: if `paths` is empty or an entry matches no file.
    """
    paths = list(paths)
    if not paths:
        raise DataError("data.paths=() is empty: name at least one file, folder or glob.")
    files: list[Path] = []
    seen: set[Path] = set()
    for entry in paths:
        matches = sorted(glob.glob(os.path.expanduser(str(entry)), recursive=True))
        entry_files: list[Path] = []
        for match in matches:
            p = Path(match)
            if p.is_dir():
                entry_files.extend(sorted(q for q in p.rglob("*") if q.is_file()))
            elif p.is_file():
                entry_files.append(p)
        if not entry_files:
            raise DataError(f"data.paths entry {entry!r} matches no files.")
        for p in entry_files:
            key = p.resolve()
            if key not in seen:
                seen.add(key)
                files.append(p)
    return files


def files_corpus(paths: Iterable[str], max_bytes: int, skip_undecodable: bool = False) -> Corpus:
    """One document per text file, in the order the paths name them.

    Raises:
        DataError: no files match, a file does not decode as UTF-8 (unless `skip_undecodable`),
            or the corpus is empty.
    """
    paths = tuple(paths)
    builder = _Builder(max_bytes, f"files {list(paths)!r}")
    for path in expand_paths(paths):
        if builder.full:
            break
        try:
            text = path.read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            if not skip_undecodable:
                raise DataError(
                    f"data file {str(path)!r} is not UTF-8 text ({e.reason} at byte {e.start}); "
                    "fix it, remove it, or set data.skip_undecodable=true to skip such files."
                ) from None
            builder.skipped.append(str(path))
            logger.warning("skipping %s: it is not UTF-8 text", path)
            continue
        builder.add(str(path), text)
    return builder.build()


def parquet_corpus(
    paths: Iterable[str], column: str, max_bytes: int, skip_undecodable: bool = False
) -> Corpus:
    """One document per row of a text column of Parquet or Arrow IPC files.

    Raises:
        DataError: no files match, a file has an unknown suffix, the column is missing or is not
            text, a binary cell does not decode (unless `skip_undecodable`), or the corpus is empty.
    """
    import pyarrow as pa
    import pyarrow.dataset as pads

    paths = tuple(paths)
    if not isinstance(column, str) or not column:
        raise DataError(f"data.column={column!r} must be a non-empty column name.")
    builder = _Builder(max_bytes, f"parquet {list(paths)!r} column {column!r}")
    for path in expand_paths(paths):
        if builder.full:
            break
        fmt = PARQUET_SUFFIXES.get(path.suffix.lower())
        if fmt is None:
            raise DataError(
                f"data file {str(path)!r} is not a table: data.source='parquet' reads files "
                f"ending in {', '.join(sorted(PARQUET_SUFFIXES))}."
            )
        try:
            table = pads.dataset(str(path), format=fmt)
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(f"data file {str(path)!r} cannot be read as {fmt}: {e}") from None
        if column not in table.schema.names:
            raise DataError(
                f"data.column={column!r} is not a column of {str(path)!r}; "
                f"it has {table.schema.names}."
            )
        col_type = table.schema.field(column).type
        is_text = pa.types.is_string(col_type) or pa.types.is_large_string(col_type)
        is_binary = pa.types.is_binary(col_type) or pa.types.is_large_binary(col_type)
        if not (is_text or is_binary):
            raise DataError(
                f"data.column={column!r} of {str(path)!r} has type {col_type}; it must be text."
            )
        row = 0
        for batch in table.to_batches(columns=[column]):
            for value in batch.column(0).to_pylist():
                name = f"{path}#{row}"
                row += 1
                if value is None:
                    continue
                if is_binary:
                    try:
                        value = value.decode("utf-8")
                    except UnicodeDecodeError:
                        if not skip_undecodable:
                            raise DataError(
                                f"data row {name!r} (data.column={column!r}) is not UTF-8 text; "
                                "set data.skip_undecodable=true to skip such rows."
                            ) from None
                        builder.skipped.append(name)
                        continue
                builder.add(name, value)
                if builder.full:
                    break
            if builder.full:
                break
    return builder.build()
