"""Training objectives as rows of tokens plus a loss mask: language modelling, T5 span
corruption, and packed text-to-text examples.

Every objective produces rows of seq_len + 1 tokens (inputs are a row's first seq_len tokens,
targets its last seq_len) with a mask over the row's tokens (1: the token is a target that
counts in the loss) and, for text-to-text packing, segment ids (which example a token belongs
to; 0 is padding). A decoder-only model learns an (inputs, targets) example as the sequence
`inputs <sep> targets <eos>` with the loss on `targets <eos>` only.

- `lm`: every token counts (PaLM's packed documents), no segments: the model is unchanged.
- `span_corruption` (T5, Raffel et al. 2020, section 3.1.4): a window of `raw_length(seq_len)`
  tokens has `round(0.15 L)` noise tokens in `round(noise / 3)` spans (noise density 0.15, mean
  span length 3; at most `NUM_SENTINELS` spans, so long windows get longer spans). Each span
  is replaced in the inputs by one sentinel; the targets are every sentinel followed by the
  span it replaced. The row is `inputs <sep> targets <eos>` padded with end-of-document tokens
  that do not count. Which tokens are noise is a pure function of the example's index.
- text-to-text: examples are packed greedily in order into rows (an example that does not fit
  the room left starts a new row; one longer than a row keeps the end of its inputs); each
  example has its own segment id so packed examples never attend to one another.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

NOISE_DENSITY = 0.15
MEAN_SPAN = 3.0
OBJECTIVES = ("lm", "span_corruption")


def _spans(length: int, max_spans: int) -> tuple[int, int]:
    """(noise tokens, noise spans) of a window of `length` tokens."""
    num_noise = min(max(int(round(length * NOISE_DENSITY)), 1), length - 1)
    num_spans = min(max(int(round(num_noise / MEAN_SPAN)), 1), max_spans, num_noise)
    return num_noise, num_spans


def raw_length(seq_len: int, max_spans: int) -> int:
    """The longest raw window whose corrupted `inputs <sep> targets <eos>` fits seq_len + 1."""
    best = 2
    for length in range(2, seq_len + 2):
        _, spans = _spans(length, max_spans)
        # inputs: L - noise + spans; targets: noise + spans; plus <sep> and <eos>.
        if length + 2 * spans + 2 <= seq_len + 1:
            best = length
    return best


def _segmentation(rng: np.random.Generator, items: int, segments: int) -> np.ndarray:
    """`items` split into `segments` positive lengths at random cut points."""
    cuts = np.sort(rng.choice(np.arange(1, items), size=segments - 1, replace=False))
    return np.diff(np.concatenate([[0], cuts, [items]]))


def span_corrupt(
    raw: np.ndarray,
    rng: np.random.Generator,
    *,
    seq_len: int,
    sep_id: int,
    eos_id: int,
    sentinel_ids: Sequence[int],
) -> tuple[np.ndarray, np.ndarray]:
    """One span-corruption row: tokens (seq_len + 1,) int32 and mask (seq_len + 1,) uint8."""
    length = len(raw)
    num_noise, num_spans = _spans(length, len(sentinel_ids))
    noise_lens = _segmentation(rng, num_noise, num_spans)
    keep_lens = _segmentation(rng, length - num_noise, num_spans)
    inputs: list[int] = []
    targets: list[int] = []
    pos = 0
    for i in range(num_spans):
        inputs.extend(raw[pos : pos + keep_lens[i]])
        pos += keep_lens[i]
        inputs.append(sentinel_ids[i])
        targets.append(sentinel_ids[i])
        targets.extend(raw[pos : pos + noise_lens[i]])
        pos += noise_lens[i]
    row = [*inputs, sep_id, *targets, eos_id]
    assert len(row) <= seq_len + 1, (len(row), seq_len)
    tokens = np.full(seq_len + 1, eos_id, dtype=np.int32)
    tokens[: len(row)] = row
    mask = np.zeros(seq_len + 1, dtype=np.uint8)
    mask[len(inputs) + 1 : len(row)] = 1
    return tokens, mask


def pack_text2text(
    examples: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    seq_len: int,
    sep_id: int,
    eos_id: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pack (inputs ids, targets ids) examples into rows (see the module docstring).

    Returns:
        tokens (N, seq_len + 1) int32, mask (N, seq_len + 1) uint8 (1 on `targets <eos>`),
        segments (N, seq_len + 1) int32 (1, 2, ... per example in its row; 0 for padding).
    """
    width = seq_len + 1
    rows_t: list[np.ndarray] = []
    rows_m: list[np.ndarray] = []
    rows_s: list[np.ndarray] = []
    cur_t = cur_m = cur_s = None
    used = width
    for inputs, targets in examples:
        targets = list(targets)[: width - 3]  # room for at least one input token, sep, eos
        inputs = list(inputs)[-(width - 2 - len(targets)) :] if inputs else []
        ex = [*inputs, sep_id, *targets, eos_id]
        if used + len(ex) > width:
            cur_t = np.full(width, eos_id, dtype=np.int32)
            cur_m = np.zeros(width, dtype=np.uint8)
            cur_s = np.zeros(width, dtype=np.int32)
            rows_t.append(cur_t)
            rows_m.append(cur_m)
            rows_s.append(cur_s)
            used = 0
        seg = int(cur_s.max()) + 1
        cur_t[used : used + len(ex)] = ex
        cur_m[used + len(inputs) + 1 : used + len(ex)] = 1
        cur_s[used : used + len(ex)] = seg
        used += len(ex)
    if not rows_t:
        empty = np.zeros((0, width))
        return empty.astype(np.int32), empty.astype(np.uint8), empty.astype(np.int32)
    return np.stack(rows_t), np.stack(rows_m), np.stack(rows_s)
