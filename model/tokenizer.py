"""PaLM-style SentencePiece tokenizer: lossless, digits split, byte fallback, cached by corpus.

Training settings follow PaLM: BPE pieces over identity-normalised text (no Unicode
normalisation, whitespace kept as is, no dummy prefix), digits split into single-digit pieces,
byte fallback for every character outside the vocabulary, whitespace-only pieces allowed (code
indentation), newline as its own piece, an end-of-document control token.

Control symbols for the training objectives (never produced by `encode` from text, and
vanishing in `decode`): a separator `<sep>` between a text-to-text example's inputs and its
targets, and `NUM_SENTINELS` sentinels `<extra_id_0>` ... that stand for the spans that span
corruption drops (T5).

Lossless round trip: SentencePiece writes a space as U+2581 ("▁") internally and decodes every
U+2581 back to a space. `Tokenizer.encode` therefore escapes a literal U+2581 in the input as
its three UTF-8 byte pieces, which decode to the character itself, so
`decode(encode(s)) == s` holds for every string that is valid UTF-8 (no lone surrogates).

A tokenizer is identified by a hash of its pieces (the model file's bytes are not reproducible
between identical runs). `train_tokenizer` caches by a hash of the corpus content and the
settings, under `$PATHWAYS_LITE_CACHE/tokenizers` (default `~/.cache/pathways_lite`); two
processes training the same tokenizer at once both succeed (atomic rename, first one wins).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import sentencepiece as spm

from .corpus import Corpus, DataError, content_hash

logger = logging.getLogger(__name__)

MODEL_FILE = "tokenizer.model"
META_FILE = "tokenizer.json"
UNK_ID = 0
EOS_ID = 1
NUM_BYTE_PIECES = 256
SEP_PIECE = "<sep>"
# Span corruption uses at most this many spans per example (one sentinel each).
NUM_SENTINELS = 32
SENTINEL_PIECES = tuple(f"<extra_id_{i}>" for i in range(NUM_SENTINELS))
# unk, eos, "\n", the separator, the sentinels and the 256 byte pieces are always in the
# vocabulary, and SentencePiece needs one learned piece besides.
MIN_VOCAB_SIZE = NUM_BYTE_PIECES + 5 + NUM_SENTINELS
SPACE_MARKER = "\u2581"
# Bumped whenever a setting below changes, so cached tokenizers are not reused across versions.
# 2: the separator and sentinels as control symbols.
TRAINER_VERSION = 2
TRAINER_SETTINGS: dict[str, object] = {
    "model_type": "bpe",
    "split_digits": True,
    "byte_fallback": True,
    "remove_extra_whitespaces": False,
    "normalization_rule_name": "identity",
    "allow_whitespace_only_pieces": True,
    "add_dummy_prefix": False,
    # Rare characters (below 0.05% of the text) are left to byte fallback.
    "character_coverage": 0.9995,
    "unk_id": UNK_ID,
    "eos_id": EOS_ID,
    "bos_id": -1,
    "pad_id": -1,
    "control_symbols": [SEP_PIECE, *SENTINEL_PIECES],
    # Training reads lines; the newline comes back as a piece of its own.
    "user_defined_symbols": ["\n"],
    "max_sentence_length": 1 << 16,
    "hard_vocab_limit": True,
}


def default_cache_dir() -> Path:
    """`$PATHWAYS_LITE_CACHE`, or `~/.cache/pathways_lite` when it is not set."""
    env = os.environ.get("PATHWAYS_LITE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "pathways_lite"


def _pieces_hash(sp: spm.SentencePieceProcessor) -> str:
    """Hex SHA-256 of every piece's text, score and kind, in id order."""
    h = hashlib.sha256(b"pathways_lite tokenizer v1\0")
    for i in range(sp.get_piece_size()):
        kind = (
            "u"
            if sp.is_unknown(i)
            else "c"
            if sp.is_control(i)
            else "b"
            if sp.is_byte(i)
            else "x"
            if sp.is_unused(i)
            else "n"
        )
        h.update(f"{sp.id_to_piece(i)}\0{sp.get_score(i)!r}\0{kind}\n".encode())
    return h.hexdigest()


class Tokenizer:
    """A trained SentencePiece model with a lossless `encode`/`decode` pair.

    Attributes:
        vocab_size: number of pieces (ids are 0 .. vocab_size - 1).
        eos_id: the end-of-document token that separates packed documents.
        sep_id: the separator between a text-to-text example's inputs and targets (-1 for a
            tokenizer trained before version 2, which has none).
        sentinel_ids: the span-corruption sentinels, `<extra_id_0>` first (empty before
            version 2).
        hash: hex content hash of the pieces; identifies the tokenizer.
        path: the model file.
    """

    def __init__(self, path: Path, sp: spm.SentencePieceProcessor, piece_hash: str) -> None:
        self.path = Path(path)
        self._sp = sp
        self.hash = piece_hash
        self.vocab_size: int = sp.get_piece_size()
        self.eos_id: int = sp.eos_id()
        self.unk_id: int = sp.unk_id()
        self.sep_id: int = self._control_id(SEP_PIECE)
        sentinels = tuple(self._control_id(p) for p in SENTINEL_PIECES)
        self.sentinel_ids: tuple[int, ...] = () if -1 in sentinels else sentinels
        # A literal U+2581 is written as its UTF-8 bytes (see the module docstring).
        self._marker_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in SPACE_MARKER.encode()]
        assert all(sp.is_byte(i) for i in self._marker_ids), "tokenizer lacks byte pieces"

    def _control_id(self, piece: str) -> int:
        i = self._sp.piece_to_id(piece)
        return i if i != self._sp.unk_id() and self._sp.is_control(i) else -1

    @classmethod
    def load(cls, path: str | os.PathLike, expected_hash: str | None = None) -> Tokenizer:
        """Load a model file (or a folder holding `tokenizer.model`) and check its hash.

        Args:
            path: the `.model` file or its folder.
            expected_hash: when given, the pieces must hash to this value.

        Raises:
            DataError: the file is missing or unreadable, or a hash does not match (the one
                given, or the one recorded next to the model when it was trained).
        """
        path = Path(path)
        if path.is_dir():
            path = path / MODEL_FILE
        if not path.is_file():
            raise DataError(f"tokenizer file {str(path)!r} does not exist.")
        sp = spm.SentencePieceProcessor()
        try:
            sp.load(str(path))
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer file {str(path)!r} cannot be loaded: {e}") from None
        piece_hash = _pieces_hash(sp)
        meta_path = path.with_name(META_FILE)
        if meta_path.is_file():
            recorded = json.loads(meta_path.read_text()).get("hash")
            if recorded and recorded != piece_hash:
                raise DataError(
                    f"tokenizer {str(path)!r} hashes to {piece_hash}, but {str(meta_path)!r} "
                    f"recorded {recorded}: the file changed after training."
                )
        if expected_hash is not None and expected_hash != piece_hash:
            raise DataError(
                f"tokenizer {str(path)!r} hashes to {piece_hash}, not the expected {expected_hash}."
            )
        return cls(path, sp, piece_hash)

    def __reduce__(self):
        # Pickles (e.g. to a Ray actor) as a path plus hash; the receiver re-checks the hash.
        return (Tokenizer.load, (str(self.path), self.hash))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, hash={self.hash[:12]}, path={self.path})"

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; `decode` gives `text` back exactly."""
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = -1) -> list[list[int]]:
        """Token ids of each text, encoded in parallel by SentencePiece.

        Raises:
            TypeError: if an element is not a str.
        """
        parts: list[str] = []
        counts: list[int] = []
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"Tokenizer.encode takes str, not {type(text).__name__}.")
            split = text.split(SPACE_MARKER)
            parts.extend(split)
            counts.append(len(split))
        encoded = self._sp.encode(parts, out_type=int, num_threads=num_threads)
        out: list[list[int]] = []
        pos = 0
        for n in counts:
            ids = list(encoded[pos])
            for part_ids in encoded[pos + 1 : pos + n]:
                ids.extend(self._marker_ids)
                ids.extend(part_ids)
            out.append(ids)
            pos += n
        return out

    def decode(self, ids: Iterable[int]) -> str:
        """The text of token ids (numpy arrays welcome). Control tokens such as EOS vanish.

        Raises:
            ValueError: if an id is outside 0 .. vocab_size - 1.
        """
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(
                f"token id {bad[0]} is outside this tokenizer's vocabulary of {self.vocab_size}."
            )
        return self._sp.decode(ids)

    def id_to_piece(self, token_id: int) -> str:
        """The piece text of one id (for inspection; bytes show as `<0xNN>`)."""
        return self._sp.id_to_piece(int(token_id))

    def is_byte(self, token_id: int) -> bool:
        """Whether the id is one of the 256 byte-fallback pieces."""
        return self._sp.is_byte(int(token_id))


def _train_key(corpus_hash: str, vocab_size: int) -> str:
    settings = {
        "version": TRAINER_VERSION,
        "corpus": corpus_hash,
        "vocab_size": vocab_size,
        "settings": TRAINER_SETTINGS,
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


def _sentencepiece_error(e: RuntimeError, vocab_size: int, corpus: Corpus) -> DataError:
    msg = str(e)
    too_high = re.search(r"Vocabulary size too high.*<= (\d+)", msg)
    if too_high:
        return DataError(
            f"data.vocab_size={vocab_size} is larger than the corpus {corpus.description} "
            f"({corpus.num_bytes} bytes) supports: at most {too_high.group(1)} pieces."
        )
    if "smaller than required_chars" in msg:
        return DataError(
            f"data.vocab_size={vocab_size} is too small for the corpus {corpus.description}: "
            f"it cannot hold its characters ({msg.rsplit(']', 1)[-1].strip()})."
        )
    return DataError(f"SentencePiece training on {corpus.description} failed: {msg}")


def train_tokenizer(
    texts: Iterable[str] | Corpus, vocab_size: int, cache_dir: str | os.PathLike | None = None
) -> Tokenizer:
    """Train (or load from the cache) a tokenizer of `vocab_size` pieces on a corpus.

    Args:
        texts: a `Corpus`, or documents as strings.
        vocab_size: number of pieces, including unk, eos, newline and the 256 byte pieces.
        cache_dir: the cache root; tokenizers live under `<cache_dir>/tokenizers/`.
            Defaults to `default_cache_dir()`.

    Returns:
        The tokenizer, its model file inside the cache.

    Raises:
        DataError: a bad vocab_size (too small, or larger than the corpus supports) or an
            empty corpus.
    """
    if not isinstance(vocab_size, int) or isinstance(vocab_size, bool):
        raise DataError(f"data.vocab_size={vocab_size!r} must be an integer.")
    if vocab_size < MIN_VOCAB_SIZE:
        raise DataError(
            f"data.vocab_size={vocab_size} is too small: the byte pieces and special tokens "
            f"alone take {MIN_VOCAB_SIZE - 1}, so it must be at least {MIN_VOCAB_SIZE}."
        )
    if not isinstance(texts, Corpus):
        docs = tuple(t for t in texts if t)
        if not docs:
            raise DataError("The corpus given to train_tokenizer is empty: it holds no text.")
        texts = Corpus(
            documents=docs,
            names=tuple(f"text#{i}" for i in range(len(docs))),
            hash=content_hash(docs),
            num_bytes=sum(len(d.encode()) for d in docs),
            description="(texts given to train_tokenizer)",
        )
    corpus = texts
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parent = root / "tokenizers"
    key = _train_key(corpus.hash, vocab_size)
    final = parent / key[:32]
    if (final / MODEL_FILE).is_file():
        tok = Tokenizer.load(final)
        logger.info("tokenizer %s from the cache (%s)", tok.hash[:12], final)
        return tok

    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key[:32]}.", dir=parent))
    try:
        logger.info(
            "training a %d-piece tokenizer on %s (%d bytes)",
            vocab_size,
            corpus.description,
            corpus.num_bytes,
        )
        start = time.perf_counter()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=corpus.lines(),
                model_prefix=str(tmp / "tokenizer"),
                vocab_size=vocab_size,
                num_threads=max(1, min(16, os.cpu_count() or 1)),
                minloglevel=2,
                **TRAINER_SETTINGS,
            )
        except RuntimeError as e:
            raise _sentencepiece_error(e, vocab_size, corpus) from None
        (tmp / "tokenizer.vocab").unlink(missing_ok=True)
        tok = Tokenizer.load(tmp / MODEL_FILE)
        meta = {
            "hash": tok.hash,
            "vocab_size": vocab_size,
            "corpus_hash": corpus.hash,
            "corpus": corpus.description,
            "trainer_version": TRAINER_VERSION,
            "settings": TRAINER_SETTINGS,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        logger.info("trained tokenizer %s in %.1f s", tok.hash[:12], time.perf_counter() - start)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / MODEL_FILE).is_file():
                raise
            # Another process finished the same tokenizer first: use theirs.
            logger.info("tokenizer %s was trained concurrently; using %s", key[:12], final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Tokenizer.load(final)
