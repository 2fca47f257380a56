"""Autoregressive sampling from a Palm model with its KV cache: greedy, temperature, top-k."""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .attention import KVCache

logger = logging.getLogger(__name__)


def sample_logits(
    logits_bv: jax.Array, key: jax.Array, *, temperature: float = 0.0, top_k: int | None = None
) -> jax.Array:
    """Pick one token per row: argmax at temperature 0, else softmax(logits / T) over the top k.

    Returns:
        (B,) int32 tokens.
    """
    if isinstance(temperature, (int, float)) and temperature == 0.0:  # (else maybe traced)
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    logits_bv = logits_bv.astype(jnp.float32) / temperature
    if top_k is not None:
        kth_b1 = jax.lax.top_k(logits_bv, top_k)[0][:, -1:]  # (B, 1): the k-th largest
        logits_bv = jnp.where(logits_bv >= kth_b1, logits_bv, -jnp.inf)
    return jax.random.categorical(key, logits_bv, axis=-1).astype(jnp.int32)


# The temperature is traced (a value of its own for each call would compile the step again:
# on a host, on its runtime thread, holding the job's lock); greedy or not, and top_k, are
# static (lax.top_k needs k).
@functools.partial(jax.jit, static_argnames=("graphdef", "greedy", "top_k"))
def _decode_and_sample(
    graphdef,
    state,
    tokens_bs: jax.Array,
    cache: KVCache,
    pos: jax.Array,
    key: jax.Array,
    temperature: jax.Array,
    greedy: bool,
    top_k: int | None,
) -> tuple[jax.Array, KVCache]:
    """Run S tokens at positions pos.. through the cached model; sample the next token."""
    model = nnx.merge(graphdef, state)
    logits_bsv, cache = model.decode_step(tokens_bs, cache, pos)
    token_b = sample_logits(
        logits_bsv[:, -1], key, temperature=0.0 if greedy else temperature, top_k=top_k
    )
    return token_b, cache


def generate(
    model,
    prompt_tokens: Sequence[int] | np.ndarray | jax.Array,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    rng: jax.Array | None = None,
) -> list[int] | jax.Array:
    """Continue a prompt by `max_new_tokens` tokens, one decode step (B, 1) at a time.

    The prompt is run once through the model to fill the KV cache; each new token then costs
    one cached step.

    Args:
        model: a `Palm` model.
        prompt_tokens: a 1-D sequence of token ids, or a (B, P) array of B prompts.
        max_new_tokens: how many tokens to generate (>= 0).
        temperature: 0 for greedy decoding; > 0 samples from softmax(logits / temperature).
        top_k: sample only among the k most likely tokens (needs temperature > 0 to matter).
        rng: a PRNG key for sampling (default: key 0, so sampling is reproducible).

    Returns:
        The generated tokens only (not the prompt): a list of ints for a 1-D prompt, or a
        (B, max_new_tokens) int32 array for a (B, P) prompt.

    Raises:
        ValueError: an empty prompt, a token outside the vocabulary, a negative count or
            temperature, a bad top_k, or a total length beyond the model's max_seq_len.
    """
    cfg = model.cfg
    prompt = np.asarray(prompt_tokens)
    one_d = prompt.ndim == 1
    prompt_bp = prompt[None, :] if one_d else prompt
    if prompt_bp.ndim != 2 or prompt_bp.shape[1] == 0:
        raise ValueError(
            f"The prompt must be a non-empty 1-D sequence or (B, P) array; got shape "
            f"{prompt.shape}."
        )
    if not np.issubdtype(prompt_bp.dtype, np.integer):
        raise ValueError(f"Prompt tokens must be integers; got dtype {prompt_bp.dtype}.")
    if prompt_bp.min() < 0 or prompt_bp.max() >= cfg.vocab_size:
        bad = int(prompt_bp.max() if prompt_bp.max() >= cfg.vocab_size else prompt_bp.min())
        raise ValueError(f"Prompt token {bad} is outside the vocabulary [0, {cfg.vocab_size}).")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0.")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0.")
    if top_k is not None and not 1 <= top_k <= cfg.vocab_size:
        raise ValueError(f"top_k={top_k} must be between 1 and vocab_size={cfg.vocab_size}.")
    batch, plen = prompt_bp.shape
    total = plen + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"prompt length {plen} + max_new_tokens {max_new_tokens} = {total} exceeds "
            f"max_seq_len={cfg.max_seq_len}."
        )
    key = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    cache = model.init_cache(batch, total)
    temperature = float(temperature)
    tokens_bs = jnp.asarray(prompt_bp, jnp.int32)  # the prompt first, then one token a step
    pos = 0
    out = []
    for _ in range(max_new_tokens):
        key, sub = jax.random.split(key)
        token_b, cache = _decode_and_sample(
            graphdef,
            state,
            tokens_bs,
            cache,
            jnp.asarray(pos, jnp.int32),
            sub,
            jnp.asarray(temperature, jnp.float32),
            temperature == 0.0,
            None if temperature == 0.0 else top_k,
        )
        out.append(token_b)
        pos += tokens_bs.shape[1]
        tokens_bs = token_b[:, None]
    tokens_bn = jnp.stack(out, axis=1) if out else jnp.zeros((batch, 0), jnp.int32)
    return [int(t) for t in np.asarray(tokens_bn[0])] if one_d else tokens_bn
