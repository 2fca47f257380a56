"""The PaLM training loss: causal LM cross-entropy plus the z-loss `1e-4 * log^2 Z`."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp

logger = logging.getLogger(__name__)


def lm_loss(
    logits_btv: jax.Array, targets_bt: jax.Array, *, z_loss: float = 1e-4
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Mean over all tokens of cross-entropy + z_loss * logsumexp(logits)^2.

    Sequences are packed (documents separated by an end-of-document token), so every token
    counts: there is no padding and no mask.

    Args:
        logits_btv: (B, T, V) logits; computed in float32.
        targets_bt: (B, T) integer next tokens.
        z_loss: weight of the z-loss, which keeps the softmax normaliser log Z near 0.

    Returns:
        The scalar loss and {"ce": mean cross-entropy, "z_loss": mean weighted z-term}.
    """
    if logits_btv.shape[:-1] != targets_bt.shape:
        raise ValueError(
            f"logits of shape {logits_btv.shape} do not match targets of shape {targets_bt.shape}."
        )
    logits = logits_btv.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    ce = jnp.mean(log_z_bt - target_logit_bt)
    z_term = z_loss * jnp.mean(jnp.square(log_z_bt))
    return ce + z_term, {"ce": ce, "z_loss": z_term}


def masked_loss_sums(
    logits_btv: jax.Array,
    targets_bt: jax.Array,
    weights_bt: jax.Array,
    sources_b: jax.Array,
    num_sources: int,
    *,
    z_loss: float = 1e-4,
) -> tuple[jax.Array, jax.Array]:
    """Sums, not means, of the masked loss: what islands and microbatches exchange.

    A token's loss is its cross-entropy plus z_loss * logsumexp^2, counted where
    `weights_bt` is 1. The loss of a batch is `sum / count` over the global batch, so any
    split of the batch gives the same value once the (sum, count) pairs are added.

    Args:
        logits_btv: (B, T, V) logits; computed in float32.
        targets_bt: (B, T) integer next tokens.
        weights_bt: (B, T) float 0/1: which targets count.
        sources_b: (B,) int32: the mixture source each row came from.
        num_sources: how many sources the mixture has.

    Returns:
        The summed loss (scalar, what the gradient is taken of) and a float32 vector of
        `stats_size(num_sources)`: [loss sum, target count, cross-entropy sum, then per source
        the loss sums, then per source the target counts].
    """
    if logits_btv.shape[:-1] != targets_bt.shape or weights_bt.shape != targets_bt.shape:
        raise ValueError(
            f"logits of shape {logits_btv.shape}, targets {targets_bt.shape} and weights "
            f"{weights_bt.shape} do not match."
        )
    logits = logits_btv.astype(jnp.float32)
    w_bt = weights_bt.astype(jnp.float32)
    log_z_bt = jax.nn.logsumexp(logits, axis=-1)  # (B, T)
    target_logit_bt = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
    ce_bt = log_z_bt - target_logit_bt
    token_loss_bt = ce_bt + z_loss * jnp.square(log_z_bt)
    row_loss_b = jnp.sum(token_loss_bt * w_bt, axis=-1)  # (B,)
    row_count_b = jnp.sum(w_bt, axis=-1)
    onehot_bs = jax.nn.one_hot(sources_b, num_sources, dtype=jnp.float32)  # (B, S)
    loss_sum = jnp.sum(row_loss_b)
    stats = jnp.concatenate(
        [
            jnp.stack([loss_sum, jnp.sum(row_count_b), jnp.sum(ce_bt * w_bt)]),
            row_loss_b @ onehot_bs,
            row_count_b @ onehot_bs,
        ]
    )
    return loss_sum, stats


def stats_size(num_sources: int) -> int:
    """Length of `masked_loss_sums`'s stats vector."""
    return 3 + 2 * num_sources
