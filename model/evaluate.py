"""Evaluating a PaLM model: held-out loss and perplexity, and text-to-text exact match and F1.

Language-model sources are scored by their mean token cross-entropy (no z-loss: perplexity
is exp of it) over the first `max_examples` examples of the data, in order (no shuffle: two
evaluations of one dataset read the same examples). Text-to-text sources are scored on the
targets' tokens only (`inputs + separator + targets`, loss masked to the targets), and each
input is greedily decoded (model/sampling.py) after `shots` training examples put before it
(k-shot prompting: `inputs + sep + targets + eos` per shot, then `inputs + sep`); the decoded
text, cut at the first end-of-sequence token, is compared with the reference by exact match
and token F1 (SQuAD's: over whitespace tokens, lower-cased, as a bag).

Everything here is a pure function of (parameters, data, settings): every host of an island
runs it on the same arrays (SPMD), and the reference trainer gives the same numbers.
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@dataclasses.dataclass(frozen=True)
class SourceScore:
    """One source's evaluation: mean token loss, and for text-to-text sources exact match and
    token F1 in [0, 1] (None for language-model sources)."""

    name: str
    loss: float
    examples: int
    exact_match: float | None = None
    token_f1: float | None = None

    @property
    def perplexity(self) -> float:
        return float(np.exp(min(self.loss, 700.0)))


def loss_sums_fn(fns: Any) -> Callable[[Any, Any, Any], tuple[jax.Array, jax.Array]]:
    """A compiled (params, tokens (B, T+1), weights (B, T)) -> (sum of weighted token
    cross-entropies, sum of weights), on the mesh of `fns` (model/train.py's StepFunctions).
    The weights mask padding rows and, for text-to-text sources, everything but targets."""

    def impl(params: Any, tokens_bt1: jax.Array, weights_bt: jax.Array):
        model = nnx.merge(fns.graphdef, params)
        inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
        logits_btv = model(inputs_bt).astype(jnp.float32)  # (B, T, V)
        log_z_bt = jax.nn.logsumexp(logits_btv, axis=-1)  # (B, T)
        target_bt = jnp.take_along_axis(logits_btv, targets_bt[..., None], axis=-1)[..., 0]
        ce_bt = log_z_bt - target_bt  # (B, T)
        return jnp.sum(ce_bt * weights_bt), jnp.sum(weights_bt)

    batch = fns.batch_sharding
    return jax.jit(
        impl,
        in_shardings=(fns.param_shardings, batch, batch),
        out_shardings=(fns.replicated, fns.replicated),
    )


def mean_loss(
    loss_sums: Callable,
    params: Any,
    rows: np.ndarray,
    weights: np.ndarray,
    batch_rows: int,
    place: Callable[[np.ndarray], Any],
    mesh: Any,
) -> float:
    """Mean weighted token loss over `rows` (N, T+1) with `weights` (N, T), in batches of
    `batch_rows` (the last padded with weight-0 copies of row 0). Sums are exchanged, never
    means, so the batching does not change the result beyond float rounding."""
    total = count = 0.0
    for lo in range(0, len(rows), batch_rows):
        chunk, w = rows[lo : lo + batch_rows], weights[lo : lo + batch_rows]
        pad = batch_rows - len(chunk)
        if pad:
            chunk = np.concatenate([chunk, np.repeat(rows[:1], pad, axis=0)])
            w = np.concatenate([w, np.zeros((pad, w.shape[1]), w.dtype)])
        with jax.set_mesh(mesh):
            s, c = loss_sums(params, place(chunk.astype(np.int32)), place(w.astype(np.float32)))
        total += float(jax.device_get(s))
        count += float(jax.device_get(c))
    return total / max(count, 1.0)


# ---- text-to-text ------------------------------------------------------------------------


def normalize(text: str) -> list[str]:
    """Whitespace tokens, lower-cased (what exact match and F1 compare)."""
    return text.lower().split()


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the prediction's tokens equal the reference's, else 0.0."""
    return float(normalize(prediction) == normalize(reference))


def token_f1(prediction: str, reference: str) -> float:
    """F1 of the prediction's and the reference's whitespace tokens, as bags (SQuAD's)."""
    pred, ref = normalize(prediction), normalize(reference)
    if not pred or not ref:
        return float(pred == ref)
    common = sum((collections.Counter(pred) & collections.Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


def prompt_ids(tokenizer: Any, shots: Sequence[Any], inputs: str, *, max_len: int) -> list[int]:
    """k-shot prompt tokens: each shot as `inputs sep targets eos`, then `inputs sep`; the
    oldest shots are dropped (then the input's head) until it fits in `max_len` tokens."""
    sep, eos = tokenizer.sep_id, tokenizer.eos_id
    tail = [*tokenizer.encode(inputs), sep]
    blocks = [[*tokenizer.encode(s.inputs), sep, *tokenizer.encode(s.targets), eos] for s in shots]
    while blocks and sum(map(len, blocks)) + len(tail) > max_len:
        blocks.pop(0)
    ids = [t for b in blocks for t in b] + tail
    return ids[-max_len:]


def pair_rows(tokenizer: Any, pairs: Sequence[Any], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`inputs sep targets eos` rows (N, seq_len + 1), right-padded with eos, and their
    weights (N, seq_len): 1 on the positions that predict a target (or its eos) token."""
    sep, eos = tokenizer.sep_id, tokenizer.eos_id
    rows = np.full((len(pairs), seq_len + 1), eos, np.int32)
    weights = np.zeros((len(pairs), seq_len), np.float32)
    for i, pair in enumerate(pairs):
        head = [*tokenizer.encode(pair.inputs), sep]
        target = [*tokenizer.encode(pair.targets), eos]
        # Keep every target token: cut the input's head when the row is too long.
        head = head[-max(1, seq_len + 1 - len(target)) :]
        ids = (head + target)[: seq_len + 1]
        rows[i, : len(ids)] = ids
        start = len(head) - 1  # position t predicts token t + 1
        weights[i, start : len(ids) - 1] = 1.0
    return rows, weights


def evaluate_text2text(
    fns: Any,
    params: Any,
    tokenizer: Any,
    name: str,
    pairs: Sequence[Any],
    shots_pool: Sequence[Any],
    *,
    shots: int,
    seq_len: int,
    batch_rows: int,
    place,
    max_new_tokens: int = 32,
) -> SourceScore:
    """A text-to-text source: target-token loss, and greedy-decoded exact match and F1 with
    `shots` examples of `shots_pool` before each input (the same k for every input, taken in
    a fixed rotation so the scores are deterministic)."""
    rows, weights = pair_rows(tokenizer, pairs, seq_len)
    loss = mean_loss(loss_sums_fn(fns), params, rows, weights, batch_rows, place, fns.mesh)
    model = nnx.merge(fns.graphdef, params)
    max_prompt = max(1, model.cfg.max_seq_len - max_new_tokens)
    prompts = []
    for i, pair in enumerate(pairs):
        chosen = (
            [shots_pool[(i * shots + j) % len(shots_pool)] for j in range(shots)]
            if (shots_pool)
            else []
        )
        prompts.append(prompt_ids(tokenizer, chosen, pair.inputs, max_len=max_prompt))
    decoded = greedy_decode(model, prompts, tokenizer.eos_id, max_new_tokens, fns.mesh)
    texts = [tokenizer.decode(t) for t in decoded]
    em = sum(exact_match(t, p.targets) for t, p in zip(texts, pairs, strict=True))
    f1 = sum(token_f1(t, p.targets) for t, p in zip(texts, pairs, strict=True))
    n = max(1, len(pairs))
    return SourceScore(name, loss, len(pairs), em / n, f1 / n)


DECODE_BATCH = 32


def bucket(length: int, cap: int) -> int:
    """The padded prompt length: the next power of two >= 16, at most `cap`."""
    return min(cap, max(16, 1 << (max(1, length) - 1).bit_length()))


def greedy_decode(
    model: Any, prompts: Sequence[Sequence[int]], eos_id: int, max_new_tokens: int, mesh: Any
) -> list[list[int]]:
    """Greedy continuations of token prompts, cut at the first eos.

    Prompts are decoded DECODE_BATCH at a time, each left-padded with eos tokens to a shared
    power-of-two length: the model reads eos as a document boundary (packed training data),
    and one compiled program serves every prompt of a bucket.
    """
    from .sampling import generate

    cap = max(1, model.cfg.max_seq_len - max_new_tokens)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for lo in range(0, len(order), DECODE_BATCH):
        chunk = order[lo : lo + DECODE_BATCH]
        width = bucket(max(len(prompts[i]) for i in chunk), cap)
        batch = np.full((len(chunk), width), eos_id, np.int32)
        for r, i in enumerate(chunk):
            ids = list(prompts[i])[-width:]
            batch[r, width - len(ids) :] = ids
        with jax.set_mesh(mesh):
            tokens = np.asarray(generate(model, batch, max_new_tokens))
        for r, i in enumerate(chunk):
            row = [int(t) for t in tokens[r]]
            out[i] = row[: row.index(eos_id)] if eos_id in row else row
    return out
