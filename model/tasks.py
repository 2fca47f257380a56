"""Text-to-text tasks: (inputs, targets) pairs from user files or built from the stdlib corpus.

Two sources give pairs:

- `stdlib-tasks`: tasks generated deterministically from the default corpus's modules
  (`model.corpus.stdlib_files`, in sorted order; every function and method with a docstring,
  in source order, found by `ast`), text no one here wrote:

  * `name_from_docstring`: inputs = the function's docstring (cleaned by `inspect.cleandoc`,
    at most `MAX_FIELD_CHARS`), targets = its name. Dunder names (`__init__`, ...) are left
    out: their docstrings do not name them.
  * `docstring_from_body`: inputs = the function's source without its docstring (at most
    `MAX_FIELD_CHARS`), targets = the first line of its docstring.

  The held-out split is by module: a module (relative path) is held out when the first byte of
  SHA-256("pathways_lite heldout\\0" + path) is below `HELDOUT_BYTE` (about 1 in 10 modules),
  so no function of a held-out module is ever trained on; a training pair identical to a
  held-out one (code copied between modules) is dropped from the training split too.

- `text2text`: user files in `paths`: JSON Lines (`.jsonl`, `.json`: one object per line) or
  tables (`.parquet`, `.arrow`, `.feather`, `.ipc`), each row holding text fields `inputs` and
  `targets`. The held-out split is by content: a row is held out when the first byte of
  SHA-256("pathways_lite heldout\\0" + inputs + "\\0" + targets) is below `HELDOUT_BYTE`, so
  it does not depend on file order and a duplicated row never lands on both sides.

`max_bytes` caps the UTF-8 bytes of inputs plus targets of the pairs returned (the pair that
crosses the cap is dropped with the rest).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import hashlib
import inspect
import json
import logging
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

from . import corpus as corpus_lib
from .corpus import DataError

logger = logging.getLogger(__name__)

TASKS = ("name_from_docstring", "docstring_from_body")
# `ast.parse` in two threads at once can fail with "AST constructor recursion depth mismatch"
# (CPython < 3.11.8 keeps that depth per interpreter, gh-106905): the controller prepares jobs'
# data in threads, and other threads parse too (3.11's traceback carets call ast.parse).
_AST_LOCK = threading.Lock()
_PARSE_TRIES = 5


def _parse(source: str) -> ast.Module:
    """ast.parse, serialised here and retried when another thread's parse raced it (the
    result is a pure function of the source)."""
    for attempt in range(_PARSE_TRIES):
        try:
            with _AST_LOCK:
                return ast.parse(source)
        except SystemError:
            if attempt == _PARSE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


TASK_SOURCES = ("stdlib-tasks", "text2text")
SPLITS = ("train", "heldout")
# A module (or a text2text row) is held out when its hash's first byte is below this: ~1/10.
HELDOUT_BYTE = 26
# Long docstrings and bodies are cut: an example should fit a short training sequence.
MAX_FIELD_CHARS = 600
JSONL_SUFFIXES = (".jsonl", ".json")
FIELDS = ("inputs", "targets")


@dataclasses.dataclass(frozen=True)
class TextPair:
    """One text-to-text example: the model reads `inputs` and learns to write `targets`."""

    inputs: str
    targets: str


def _is_heldout(key: str) -> bool:
    return hashlib.sha256(b"pathways_lite heldout\0" + key.encode()).digest()[0] < HELDOUT_BYTE


def _function_pairs(source: str, task: str) -> Iterator[TextPair]:
    """The task's pairs of one module's source, in source order (empty if it does not parse)."""
    try:
        tree = _parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines(keepends=True)
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        doc = ast.get_docstring(node, clean=True)
        if not doc or not doc.strip():
            continue
        first_line = doc.strip().split("\n", 1)[0].strip()
        if task == "name_from_docstring":
            if node.name.startswith("__") and node.name.endswith("__"):
                continue
            yield TextPair(inputs=inspect.cleandoc(doc)[:MAX_FIELD_CHARS], targets=node.name)
        else:
            doc_node = node.body[0]
            head = "".join(lines[node.lineno - 1 : doc_node.lineno - 1])
            tail = "".join(lines[doc_node.end_lineno : node.end_lineno])
            body = (head + tail).rstrip()
            if not tail.strip() or not first_line:
                continue  # a function that is only a docstring has no body to read
            yield TextPair(inputs=textwrap.dedent(body)[:MAX_FIELD_CHARS], targets=first_line)


@functools.lru_cache(maxsize=4)
def _heldout_set(task: str) -> frozenset[TextPair]:
    return frozenset(_stdlib_pairs(task, "heldout", None))


def _stdlib_pairs(task: str, split: str, max_bytes: int | None) -> list[TextPair]:
    root = corpus_lib.stdlib_root()
    heldout = _heldout_set(task) if split == "train" else frozenset()
    out: list[TextPair] = []
    total = 0
    for rel in corpus_lib.stdlib_files(root):
        if _is_heldout(rel) != (split == "heldout"):
            continue
        try:
            source = (root / rel).read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            continue
        for pair in _function_pairs(source, task):
            if pair in heldout:
                continue
            size = len(pair.inputs.encode()) + len(pair.targets.encode())
            if max_bytes is not None and total + size > max_bytes:
                return out
            out.append(pair)
            total += size
    return out


def _text(value: object, path: Path, row: int, field: str) -> str:
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"data file {str(path)!r} row {row}: {field!r} is not UTF-8.") from None
    if not isinstance(value, str):
        raise DataError(
            f"data file {str(path)!r} row {row}: {field!r}={value!r} must be text "
            f"(a text-to-text row holds text fields {FIELDS[0]!r} and {FIELDS[1]!r})."
        )
    return value


def _jsonl_rows(path: Path) -> Iterator[tuple[int, str, str]]:
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {str(path)!r} is not UTF-8 ({e.reason}).") from None
    for row, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"data file {str(path)!r} row {row} is not JSON: {e.msg}.") from None
        if not isinstance(obj, dict):
            raise DataError(
                f"data file {str(path)!r} row {row} is {type(obj).__name__}, not an object "
                f"with fields {FIELDS[0]!r} and {FIELDS[1]!r}."
            )
        for field in FIELDS:
            if field not in obj:
                raise DataError(
                    f"data file {str(path)!r} row {row} has no field {field!r}; a text-to-text "
                    f"row needs {FIELDS[0]!r} and {FIELDS[1]!r} (it has {sorted(obj)})."
                )
        yield (
            row,
            _text(obj["inputs"], path, row, "inputs"),
            _text(obj["targets"], path, row, "targets"),
        )


def _table_rows(path: Path, fmt: str) -> Iterator[tuple[int, str, str]]:
    import pyarrow as pa
    import pyarrow.dataset as pads

    try:
        table = pads.dataset(str(path), format=fmt)
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"data file {str(path)!r} cannot be read as {fmt}: {e}") from None
    for field in FIELDS:
        if field not in table.schema.names:
            raise DataError(
                f"data file {str(path)!r} has no column {field!r}; a text-to-text table needs "
                f"{FIELDS[0]!r} and {FIELDS[1]!r} (it has {table.schema.names})."
            )
    row = 0
    for batch in table.to_batches(columns=list(FIELDS)):
        for inputs, targets in zip(
            batch.column(0).to_pylist(), batch.column(1).to_pylist(), strict=True
        ):
            yield row, _text(inputs, path, row, "inputs"), _text(targets, path, row, "targets")
            row += 1


def _rows(path: Path) -> Iterator[tuple[int, str, str]]:
    """The (row, inputs, targets) of a JSON Lines or table file, by its suffix."""
    suffix = path.suffix.lower()
    if suffix in JSONL_SUFFIXES:
        return _jsonl_rows(path)
    if suffix in corpus_lib.PARQUET_SUFFIXES:
        return _table_rows(path, corpus_lib.PARQUET_SUFFIXES[suffix])
    known = sorted((*JSONL_SUFFIXES, *corpus_lib.PARQUET_SUFFIXES))
    raise DataError(
        f"data file {str(path)!r} is neither JSON Lines nor a table: "
        f"data.source='text2text' reads files ending in {', '.join(known)}."
    )


def _text2text_pairs(paths: Sequence[str], split: str, max_bytes: int | None) -> list[TextPair]:
    out: list[TextPair] = []
    total = 0
    for path in corpus_lib.expand_paths(paths):
        rows = _rows(path)
        for _, inputs, targets in rows:
            if _is_heldout(f"{inputs}\0{targets}") != (split == "heldout"):
                continue
            size = len(inputs.encode()) + len(targets.encode())
            if max_bytes is not None and total + size > max_bytes:
                return out
            out.append(TextPair(inputs=inputs, targets=targets))
            total += size
    return out


def check_task_files(paths: Sequence[str]) -> None:
    """A quick look at text2text files before any work: each is JSON Lines or a table, and
    its first row (JSON Lines) or its schema (tables) has `inputs` and `targets`.

    Raises:
        DataError: naming the file and the missing field.
    """
    for path in corpus_lib.expand_paths(paths):
        rows = _rows(path)
        next(iter(rows), None)


def task_pairs(
    source: str,
    task: str | None,
    paths: Sequence[str],
    split: str,
    *,
    max_bytes: int | None = None,
) -> list[TextPair]:
    """The (inputs, targets) pairs of a task source's split, in a deterministic order.

    Args:
        source: "stdlib-tasks" (`task` required, `paths` empty) or "text2text" (`paths`:
            .jsonl/.parquet files with `inputs`/`targets`; `task` must be None).
        task: one of `TASKS` for "stdlib-tasks".
        paths: files, folders or globs for "text2text".
        split: "train" or "heldout" (see the module docstring for how each source splits).
        max_bytes: cap on the UTF-8 bytes of inputs plus targets returned.

    Raises:
        DataError: an unknown source, task or split; a missing file; a row without
            `inputs`/`targets` (naming the file, row and field); no pairs at all.
    """
    if source not in TASK_SOURCES:
        raise DataError(
            f"data.source={source!r} is not a task source; one of "
            f"{', '.join(map(repr, TASK_SOURCES))}."
        )
    if split not in SPLITS:
        raise DataError(f"split={split!r} is not one of {', '.join(map(repr, SPLITS))}.")
    if max_bytes is not None and (
        not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes <= 0
    ):
        raise DataError(f"data.max_bytes={max_bytes!r} must be a positive integer.")
    if source == "stdlib-tasks":
        if task not in TASKS:
            raise DataError(
                f"data.task={task!r} is not a stdlib task; one of {', '.join(map(repr, TASKS))}."
            )
        if paths:
            raise DataError(
                f"data.paths={list(paths)!r} is not used by data.source='stdlib-tasks'; "
                "leave it empty."
            )
        pairs = _stdlib_pairs(task, split, max_bytes)
        what = f"stdlib-tasks task {task!r}"
    else:
        if task is not None:
            raise DataError(
                f"data.task={task!r} is only for data.source='stdlib-tasks'; a text2text "
                "source reads its pairs from data.paths."
            )
        pairs = _text2text_pairs(paths, split, max_bytes)
        what = f"text2text {list(paths)!r}"
    if not pairs:
        raise DataError(f"the {split!r} split of {what} holds no (inputs, targets) pairs.")
    logger.info("%s split %s: %d pairs", what, split, len(pairs))
    return pairs
