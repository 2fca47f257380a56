"""Slot decoding for serving: a fixed (max_batch x max_seq_len) KV cache whose rows (slots)
are filled and freed independently, so requests join and leave a running batch between steps.

`Palm.decode_step` decodes a batch whose rows all sit at one position; here every slot has its
own position. A `SlotDecoder` holds the cache and two compiled programs per shape bucket:

- prefill: N newcomers' prompts, padded to a length bucket (and N to a power of two up to
  max_batch), run through the model; their K/V are written into their slots' rows and each
  newcomer's first token is sampled from the logits at its last prompt position.
- decode: one token for each of the first R slots at its own position, R the slots up to the
  last occupied one rounded up to a decode bucket (powers of four, then max_batch: requests
  take the lowest free slots, so a lightly loaded service decodes a few rows, not the whole
  cache; inactive slots among them compute and are ignored), the K/V written at that
  position, the next token sampled. Its attention reads the cache in chunks of 128
  positions up to the furthest row's (`cached_attention`): a cache of 1024 positions (the
  default `max_seq_len` of palm-small) costs short requests their own length only
  (bench/serving.py --max-seq-len 1024 on 2 CPU cores: 1,436 -> 4,832 tokens/s with 32
  clients, per-token p99 16.6 -> 9.5 ms with 8).

Sampling is per slot (temperature, top-k, top-p, seed): the key of a request's n-th token is
`fold_in(key(seed), n)` (the seed's 64 bits are the threefry key's two words, so a seed below
2**32 gives `jax.random.key(seed)`), so a request's tokens depend only on its prompt, the
parameters and its seed, never on which slot it got or who shares the batch, up to the last
bits of floating point: programs of different row counts (the prefill and decode buckets) may
round differently (palm-small on CPU: logits within 5e-6 of the 32-row program's at 1 and 4
rows, bitwise equal at 16), which can change a token only where its top two logits nearly tie
(the equivalence tests stop comparing there). Only ids below the tokenizer's vocabulary are
ever chosen (`vocab_size`): a model may embed more ids than its tokenizer has pieces
(`model.overrides.vocab_size`), and an id the tokenizer cannot decode would end the request.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import KVCache, LayerCache, cached_attention, causal_attention

logger = logging.getLogger(__name__)

MIN_PREFILL_BUCKET = 16
# Positions of the cache a decode step's attention reads at a time, up to its furthest row.
DECODE_CHUNK = 128


def _geometric(first: int, factor: int, last: int) -> tuple[int, ...]:
    """first, first * factor, ... while below `last`, then `last`."""
    out, n = [], first
    while n < last:
        out.append(n)
        n *= factor
    out.append(last)
    return tuple(out)


def length_buckets(max_seq_len: int) -> tuple[int, ...]:
    """Prompt-length buckets: powers of two from 16, capped by (and ending at) max_seq_len."""
    return _geometric(MIN_PREFILL_BUCKET, 2, max_seq_len)


def row_buckets(max_batch: int) -> tuple[int, ...]:
    """Prefill row-count buckets: powers of two up to (and ending at) max_batch."""
    return _geometric(1, 2, max_batch)


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Decode row-count buckets: powers of four up to (and ending at) max_batch. On 2 CPU
    cores palm-small decodes 1 row in 1.2 ms, 4 in 2.1, 16 in 4.0 and 32 in 6.3 (128
    positions, the cache donated): a lone request paid for every slot of the cache before.
    Powers of four, not two: each bucket is one more program compiled when the service
    loads (about 1 s each there)."""
    return _geometric(1, 4, max_batch)


def bucket_for(n: int, buckets: Sequence[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}.")


def sample_rows(
    logits_bv: jax.Array,
    temperature_b: jax.Array,
    top_k_b: jax.Array,
    top_p_b: jax.Array,
    seed_b2: jax.Array,
    count_b: jax.Array,
    *,
    vocab_size: int | None = None,
) -> jax.Array:
    """One token per row: argmax where temperature is 0, else a draw from softmax(logits / T)
    restricted to the top k (0: all) and the top-p nucleus (0 or >= 1: all), with the key
    fold_in(key(seed), count). Returns (B,) int32.

    Args:
        seed_b2: each row's 64-bit seed as (high, low) uint32 words, the threefry key's data.
        vocab_size: only ids below it are chosen, greedy or sampled (the tokenizer's
            vocabulary; None: every id of the logits).
    """
    if vocab_size is not None:
        logits_bv = logits_bv[:, :vocab_size]  # (B, V') the ids the tokenizer can decode
    vocab = logits_bv.shape[-1]

    def row(logits_v, temp, top_k, top_p, seed, count):
        greedy = jnp.argmax(logits_v).astype(jnp.int32)
        scaled_v = logits_v.astype(jnp.float32) / jnp.where(temp > 0, temp, 1.0)
        desc_v = jnp.sort(scaled_v)[::-1]
        k = jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
        keep_v = scaled_v >= desc_v[k - 1]
        in_k_v = jnp.arange(vocab) < k
        probs_v = jax.nn.softmax(jnp.where(in_k_v, desc_v, -jnp.inf))
        before_v = jnp.cumsum(probs_v) - probs_v  # mass strictly above each sorted entry
        nucleus = jnp.sum((before_v < top_p) & in_k_v)
        n_keep = jnp.where((top_p > 0) & (top_p < 1), jnp.maximum(nucleus, 1), k)
        keep_v &= scaled_v >= desc_v[n_keep - 1]
        key = jax.random.fold_in(jax.random.wrap_key_data(seed, impl="threefry2x32"), count)
        drawn = jax.random.categorical(key, jnp.where(keep_v, scaled_v, -jnp.inf))
        return jnp.where(temp > 0, drawn.astype(jnp.int32), greedy)

    def sampled(_):
        return jax.vmap(row)(logits_bv, temperature_b, top_k_b, top_p_b, seed_b2, count_b)

    def greedy(_):
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)

    # An all-greedy batch skips the sort over the vocabulary (the common serving case).
    return jax.lax.cond(jnp.any(temperature_b > 0), sampled, greedy, None)


def _prefill_core(model, tokens_np, lengths_n, slots_n, cache: KVCache):
    """The prompts (N, P) from position 0; K/V into rows `slots_n` (out of range: dropped).
    Returns the logits at each prompt's last position (N, V) and the cache."""
    n, p = tokens_np.shape
    positions_np = jnp.broadcast_to(jnp.arange(p), (n, p))
    x_npd = model.embed(tokens_np)
    rows_n1, cols_1p = slots_n[:, None], jnp.arange(p)[None, :]
    layers = []
    for block, lc in zip(model.blocks, cache.layers, strict=True):
        h_npd = block.norm(x_npd)
        attn = block.attention
        q, k, v = attn.project(h_npd, positions_np)
        out = causal_attention(q, k, v, positions_np)
        x_npd = x_npd + attn.output(out) + block.mlp(h_npd)
        dt = lc.k_btkq.dtype
        layers.append(
            LayerCache(
                k_btkq=lc.k_btkq.at[rows_n1, cols_1p].set(k.astype(dt), mode="drop"),
                v_btkq=lc.v_btkq.at[rows_n1, cols_1p].set(v.astype(dt), mode="drop"),
            )
        )
    last_n1d = jnp.take_along_axis(x_npd, (lengths_n - 1)[:, None, None], axis=1)
    logits_nv = model.embed.attend(model.final_norm(last_n1d))[:, 0]
    return logits_nv, KVCache(layers=tuple(layers))


def _decode_core(model, tokens_b, pos_b, cache: KVCache, chunk: int):
    """One token for each of the cache's first B slots (B = len(tokens_b), at most its rows)
    at its own position; returns (B, V) logits and the whole cache."""
    b = tokens_b.shape[0]
    positions_b1 = pos_b[:, None]
    rows_b = jnp.arange(b)
    x_b1d = model.embed(tokens_b[:, None])
    layers = []
    for block, lc in zip(model.blocks, cache.layers, strict=True):
        h_b1d = block.norm(x_b1d)
        attn = block.attention
        q, k, v = attn.project(h_b1d, positions_b1)
        dt = lc.k_btkq.dtype
        k_btkq = lc.k_btkq.at[rows_b, pos_b].set(k[:, 0].astype(dt))
        v_btkq = lc.v_btkq.at[rows_b, pos_b].set(v[:, 0].astype(dt))
        out = cached_attention(q, k_btkq[:b], v_btkq[:b], pos_b, chunk)
        x_b1d = x_b1d + attn.output(out) + block.mlp(h_b1d)
        layers.append(LayerCache(k_btkq=k_btkq, v_btkq=v_btkq))
    logits_bv = model.embed.attend(model.final_norm(x_b1d))[:, 0]
    return logits_bv, KVCache(layers=tuple(layers))


@dataclasses.dataclass
class Sampling:
    """Per-row sampling settings as arrays (B,); `seed` is (B, 2): each 64-bit seed's high
    and low uint32 words."""

    temperature: np.ndarray
    top_k: np.ndarray
    top_p: np.ndarray
    seed: np.ndarray
    count: np.ndarray

    @classmethod
    def zeros(cls, n: int) -> Sampling:
        return cls(
            temperature=np.zeros(n, np.float32),
            top_k=np.zeros(n, np.int32),
            top_p=np.zeros(n, np.float32),
            seed=np.zeros((n, 2), np.uint32),
            count=np.zeros(n, np.int32),
        )

    def arrays(self) -> tuple[np.ndarray, ...]:
        return (self.temperature, self.top_k, self.top_p, self.seed, self.count)


class SlotDecoder:
    """The slot cache of one served model and its compiled prefill and decode programs.

    Args:
        model: a `Palm` model (its parameters are captured; call `set_model` for new ones).
        max_batch: slots in the cache.
        max_seq_len: positions per slot (<= the model's max_seq_len).
        vocab_size: the tokenizer's vocabulary (<= the model's): no id at or above it is
            ever chosen. None: the model's.
        chunk: cache positions a decode step's attention reads at a time (`cached_attention`).
    """

    def __init__(
        self,
        model,
        max_batch: int,
        max_seq_len: int,
        *,
        vocab_size: int | None = None,
        chunk: int = DECODE_CHUNK,
    ) -> None:
        cfg = model.cfg
        if not 1 <= max_batch:
            raise ValueError(f"max_batch={max_batch} must be >= 1.")
        if not 2 <= max_seq_len <= cfg.max_seq_len:
            raise ValueError(
                f"max_seq_len={max_seq_len} must be in [2, the model's {cfg.max_seq_len}]."
            )
        if vocab_size is not None and not 1 <= vocab_size <= cfg.vocab_size:
            raise ValueError(
                f"the tokenizer's vocab_size={vocab_size} must be in [1, the model's "
                f"{cfg.vocab_size}]."
            )
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.length_buckets = length_buckets(max_seq_len)
        self.row_buckets = row_buckets(max_batch)
        self.decode_buckets = decode_buckets(max_batch)
        self.traces = 0  # programs compiled (each trace is one compile)
        self.compiled: list[tuple[str, tuple[int, ...]]] = []  # (program, token shape)
        self.set_model(model)
        # Each program donates the cache it is given: the new cache is written in place of
        # the old, where a copy of the whole cache per decode step cost palm-small on a CPU
        # 1.9 -> 1.2 ms a step at 128 positions, 7.4 -> 1.8 ms at 1024. Every leaf is its
        # own buffer (XLA refuses to donate one buffer twice; the empty K and V may share).
        self.cache = jax.tree.map(lambda a: a.copy(), model.init_cache(max_batch, max_seq_len))

        def prefill(state, tokens_np, lengths_n, slots_n, cache, samp):
            self.traces += 1
            self.compiled.append(("prefill", tuple(tokens_np.shape)))
            m = nnx.merge(self._graphdef, state)
            logits_nv, cache = _prefill_core(m, tokens_np, lengths_n, slots_n, cache)
            return logits_nv, sample_rows(logits_nv, *samp, vocab_size=vocab_size), cache

        def decode(state, tokens_b, pos_b, cache, samp):
            self.traces += 1
            self.compiled.append(("decode", tuple(tokens_b.shape)))
            m = nnx.merge(self._graphdef, state)
            logits_bv, cache = _decode_core(m, tokens_b, pos_b, cache, chunk)
            return logits_bv, sample_rows(logits_bv, *samp, vocab_size=vocab_size), cache

        self._prefill = jax.jit(prefill, donate_argnums=(4,))
        self._decode = jax.jit(decode, donate_argnums=(3,))

    def set_model(self, model) -> None:
        """Decode with these parameters from now on (same graph)."""
        self._graphdef, self._state = nnx.split(model)

    def prefill(
        self, prompts: Sequence[Sequence[int]], slots: Sequence[int], samp: Sampling
    ) -> tuple[np.ndarray, np.ndarray]:
        """Run newcomers' prompts into their slots; returns (N, V) last-position logits and
        (N,) first tokens. `samp` rows match `prompts`."""
        n = len(prompts)
        longest = max(len(p) for p in prompts)
        if n == 0 or min(len(p) for p in prompts) == 0:
            raise ValueError("prefill needs at least one non-empty prompt.")
        if longest > self.max_seq_len:
            raise ValueError(
                f"a prompt of {longest} tokens exceeds max_seq_len={self.max_seq_len}."
            )
        rows = bucket_for(n, self.row_buckets)
        plen = bucket_for(longest, self.length_buckets)
        tokens = np.zeros((rows, plen), np.int32)
        lengths = np.ones(rows, np.int32)
        slot_ids = np.full(rows, self.max_batch, np.int32)  # padding rows: dropped writes
        for i, (p, s) in enumerate(zip(prompts, slots, strict=True)):
            tokens[i, : len(p)] = p
            lengths[i] = len(p)
            slot_ids[i] = s
        padded = Sampling.zeros(rows)
        for name in ("temperature", "top_k", "top_p", "seed", "count"):
            getattr(padded, name)[:n] = getattr(samp, name)[:n]
        logits, first, self.cache = self._prefill(
            self._state, tokens, lengths, slot_ids, self.cache, padded.arrays()
        )
        return np.asarray(logits)[:n], np.asarray(first)[:n]

    def step(
        self, tokens_b: np.ndarray, pos_b: np.ndarray, samp: Sampling, rows: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """One decode step of the first `rows` slots (None: every slot), rounded up to a
        decode bucket R: (B,) input tokens at (B,) positions, B >= R, and `samp` of B rows;
        returns (R, V) logits and (R,) next tokens (a slot's row is its index)."""
        r = bucket_for(self.max_batch if rows is None else max(rows, 1), self.decode_buckets)
        if len(tokens_b) < r or len(pos_b) < r:
            raise ValueError(f"a decode of {r} rows needs {r} tokens and positions.")
        logits, nxt, self.cache = self._decode(
            self._state,
            np.asarray(tokens_b[:r], np.int32),
            np.asarray(pos_b[:r], np.int32),
            self.cache,
            tuple(a[:r] for a in samp.arrays()),
        )
        return np.asarray(logits), np.asarray(nxt)

    def warm(self) -> None:
        """Compile the programs a service needs before its first request: every decode
        bucket and the one-row prefill (other prefill buckets compile when first used)."""
        self.prefill([[1]], [0], Sampling.zeros(1))
        for r in self.decode_buckets:
            self.step(np.zeros(r, np.int32), np.zeros(r, np.int32), Sampling.zeros(r), rows=r)

    def close(self) -> None:
        """Free the slot cache's device memory now. The compiled programs' closures keep
        this object in a reference cycle, so dropping it frees the cache only at the next
        garbage collection: a preempted service's cache would hold the memory the scheduler
        has given to the job that preempted it. The decoder cannot be used afterwards (the
        parameters it read are not freed: they are the job's)."""
        for leaf in jax.tree.leaves(self.cache):
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self.cache = None
        self._state = None

    @staticmethod
    def kv_bytes(cfg, max_batch: int, max_seq_len: int) -> int:
        """Bytes of the slot cache: K and V per layer, (B, T, 1, head_dim) each."""
        itemsize = jnp.dtype(cfg.compute_dtype).itemsize
        return 2 * cfg.n_layers * max_batch * max_seq_len * cfg.head_dim * itemsize
