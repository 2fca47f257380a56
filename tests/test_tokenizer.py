"""The tokenizer: lossless round trip, digit splitting, byte fallback, caching by piece hash."""

from __future__ import annotations

import json
import pickle
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathways_lite.model.tokenizer import (
    META_FILE,
    MODEL_FILE,
    NUM_SENTINELS,
    SPACE_MARKER,
    DataError,
    Tokenizer,
    train_tokenizer,
)

ADVERSARIAL = [
    "",
    " ",
    "   leading and trailing   ",
    "def f(x):\n\treturn  x\t\t+ 1\n\n\n",
    "mixed scripts: Ελληνικά русский 中文 日本語 한국어 العربية עברית हिन्दी ไทย",
    "emoji 🎉👩‍👩‍👧‍👦 🏳️‍🌈 flags 🇯🇵 skin 👍🏽",
    "control \x00\x01\x02\x07\x08\x0b\x0c\x0e\x1b[31m\x1f\x7f\x85 end",
    "windows\r\nline\rends\u2028\u2029",
    "spaces      and\ttabs\t \t \t mixed",
    "digits 0123456789 3.14159 1e-10 -42 0x1F ٣٤٥ ١٢",
    "nbsp\u00a0thin\u2009ideographic\u3000zero\u200bwidth\ufeffbom",
    f"marker {SPACE_MARKER} literal{SPACE_MARKER}{SPACE_MARKER} and ▁▁space ▁",
    "combining e\u0301 a\u0308 \u0338 z\u0335\u0321",
    "noncharacters \ufffe\uffff \U0010ffff private \ue000",
    "a" * 5000 + " " * 300 + "\t" * 50,
    "</s> <unk> <0x41> ▁ look like pieces",
]


@pytest.mark.parametrize("text", ADVERSARIAL, ids=range(len(ADVERSARIAL)))
def test_round_trip_is_lossless_on_adversarial_text(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(max_size=200))
def test_round_trip_is_lossless_on_any_text(tokenizer, text: str) -> None:
    assert tokenizer.decode(tokenizer.encode(text)) == text


def test_encode_batch_matches_encode(tokenizer) -> None:
    texts = ADVERSARIAL[:8]
    assert tokenizer.encode_batch(texts) == [tokenizer.encode(t) for t in texts]


def test_digits_are_split_into_single_digit_pieces(tokenizer) -> None:
    ids = tokenizer.encode("x = 1234567890 + 3.14159 * 2024")
    digit_pieces = [tokenizer.id_to_piece(i) for i in ids]
    digit_pieces = [p for p in digit_pieces if any(c.isdigit() for c in p)]
    assert "".join(digit_pieces) == "1234567890314159" + "2024"
    assert all(len(p) == 1 for p in digit_pieces), digit_pieces


def test_unknown_characters_fall_back_to_bytes(tokenizer) -> None:
    text = "𓂀ꙮ"  # Egyptian hieroglyph and Cyrillic multiocular O: not in a stdlib vocabulary
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert all(tokenizer.is_byte(i) for i in ids)
    assert tokenizer.unk_id not in ids
    assert tokenizer.decode(ids) == text


def test_whitespace_runs_become_whitespace_pieces(tokenizer) -> None:
    ids = tokenizer.encode("        return x\n")
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    # Indentation is learnt as whole pieces of U+2581, and the newline is its own piece.
    assert any(len(p) >= 4 and set(p) == {SPACE_MARKER} for p in pieces), pieces
    assert pieces[-1] == "\n"


def test_literal_space_marker_is_escaped_not_turned_into_a_space(tokenizer) -> None:
    with_marker, with_space = tokenizer.encode(f"a{SPACE_MARKER}b"), tokenizer.encode("a b")
    assert with_marker != with_space
    assert tokenizer.decode(with_marker) == f"a{SPACE_MARKER}b"
    assert tokenizer.decode(with_space) == "a b"


def test_eos_separates_documents_and_decodes_to_nothing(tokenizer) -> None:
    ids = tokenizer.encode("one") + [tokenizer.eos_id] + tokenizer.encode("two")
    assert tokenizer.decode(ids) == "onetwo"
    assert tokenizer.eos_id not in tokenizer.encode("</s> eos")


def test_decode_rejects_ids_outside_the_vocabulary(tokenizer) -> None:
    with pytest.raises(ValueError, match=f"token id {tokenizer.vocab_size} is outside"):
        tokenizer.decode([1, tokenizer.vocab_size])


def test_encode_rejects_bytes(tokenizer) -> None:
    with pytest.raises(TypeError, match="takes str, not bytes"):
        tokenizer.encode(b"abc")


def test_training_is_cached_and_identified_by_its_pieces(tmp_path) -> None:
    texts = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('hello, world')\n"] * 3
    first = train_tokenizer(texts, 330, cache_dir=tmp_path / "a")
    again = train_tokenizer(texts, 330, cache_dir=tmp_path / "a")
    elsewhere = train_tokenizer(texts, 330, cache_dir=tmp_path / "b")
    assert again.path == first.path  # from the cache
    assert elsewhere.path != first.path
    assert elsewhere.hash == first.hash  # same pieces, retrained
    assert len(first.hash) == 64 and int(first.hash, 16) >= 0
    other = train_tokenizer(texts + ["something else entirely"], 330, cache_dir=tmp_path / "a")
    assert other.path != first.path
    assert Tokenizer.load(first.path.parent).hash == first.hash
    assert list((tmp_path / "a" / "tokenizers").glob(".*")) == []  # no temporary folders left


def test_pickled_tokenizer_reloads_with_the_same_hash(tokenizer) -> None:
    copy = pickle.loads(pickle.dumps(tokenizer))
    assert copy.hash == tokenizer.hash
    assert copy.encode("x = 12") == tokenizer.encode("x = 12")


def test_load_checks_the_expected_hash(tokenizer) -> None:
    with pytest.raises(DataError, match="not the expected " + "0" * 64):
        Tokenizer.load(tokenizer.path, expected_hash="0" * 64)
    assert Tokenizer.load(tokenizer.path, expected_hash=tokenizer.hash).hash == tokenizer.hash


def test_load_detects_a_model_that_changed_after_training(tokenizer, tmp_path) -> None:
    src = tokenizer.path.parent
    shutil.copy(src / MODEL_FILE, tmp_path / MODEL_FILE)
    meta = {"hash": "f" * 64}
    (tmp_path / META_FILE).write_text(json.dumps(meta))
    with pytest.raises(DataError, match="changed after training"):
        Tokenizer.load(tmp_path)


def test_load_names_a_missing_file(tmp_path) -> None:
    with pytest.raises(DataError, match="nope.model' does not exist"):
        Tokenizer.load(tmp_path / "nope.model")


def test_vocab_larger_than_the_corpus_supports_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match=r"data.vocab_size=2000 is larger than the corpus .*"):
        train_tokenizer(["hello world", "foo bar 123"], 2000, cache_dir=tmp_path)


def test_vocab_smaller_than_the_byte_pieces_is_named(tmp_path) -> None:
    with pytest.raises(DataError, match="data.vocab_size=100 is too small"):
        train_tokenizer(["hello world"], 100, cache_dir=tmp_path)


def test_empty_texts_are_named(tmp_path) -> None:
    with pytest.raises(DataError, match="is empty"):
        train_tokenizer(["", ""], 512, cache_dir=tmp_path)


def test_vocab_too_small_for_the_corpus_characters_is_named(tmp_path) -> None:
    texts = ["".join(chr(0x4E00 + i) for i in range(k, k + 50)) for k in range(0, 400, 50)]
    with pytest.raises(DataError, match="data.vocab_size=300 is too small for the corpus"):
        train_tokenizer(texts, 300, cache_dir=tmp_path)


def test_separator_and_sentinels_are_control_symbols_text_never_produces(tokenizer) -> None:
    specials = [tokenizer.sep_id, *tokenizer.sentinel_ids]
    assert len(tokenizer.sentinel_ids) == NUM_SENTINELS
    assert len(set(specials)) == len(specials) and tokenizer.eos_id not in specials
    assert all(0 <= i < tokenizer.vocab_size for i in specials)
    text = "a <sep> b <extra_id_0> c"  # their piece texts, written out, stay plain text
    ids = tokenizer.encode(text)
    assert not set(ids) & set(specials)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode([*ids, *specials]) == text  # control symbols vanish in decode


def test_the_trainer_version_is_part_of_the_cache_key() -> None:
    from pathways_lite.model import tokenizer as tokenizer_lib

    key = tokenizer_lib._train_key("c" * 64, 512)
    old = tokenizer_lib.TRAINER_VERSION
    try:
        tokenizer_lib.TRAINER_VERSION = old - 1
        assert tokenizer_lib._train_key("c" * 64, 512) != key
    finally:
        tokenizer_lib.TRAINER_VERSION = old


def test_a_job_resuming_on_data_whose_tokenizer_changed_is_refused(tmp_path) -> None:
    """lineage.keep_tokenizer: a job that resumes from its checkpoints with data prepared
    again into another tokenizer (its files changed) is refused naming data.paths (it went on
    with other token ids, silently); the same data's tokenizer trained again (same pieces, a
    file that differs) is fine, and a job with no checkpoint keeps the new one."""
    from pathways_lite.controller.lineage import TOKENIZER_FILE, keep_tokenizer
    from pathways_lite.controller.spec_errors import SpecError

    code = ["def f(x):\n    return x + 1\n", "class A:\n    pass\n", "print('hello')\n"] * 3
    prose = ["the quick brown fox jumps over the lazy dog\n", "lorem ipsum dolor sit\n"] * 3
    before = train_tokenizer(code, 330, cache_dir=tmp_path / "a")
    again = train_tokenizer(code, 330, cache_dir=tmp_path / "b")  # same pieces, another file
    changed = train_tokenizer(prose, 330, cache_dir=tmp_path / "a")
    assert changed.hash != before.hash
    job_dir = str(tmp_path / "job")
    keep_tokenizer(job_dir, str(before.path.parent))
    keep_tokenizer(job_dir, str(again.path.parent), resuming=True)
    with pytest.raises(SpecError, match="data changed") as refused:
        keep_tokenizer(job_dir, str(changed.path.parent), resuming=True)
    assert refused.value.field == "data.paths"
    kept = tmp_path / "job" / TOKENIZER_FILE
    assert Tokenizer.load(kept).hash == before.hash
    keep_tokenizer(job_dir, str(changed.path.parent))  # no checkpoint: it starts afresh
    assert Tokenizer.load(kept).hash == changed.hash
