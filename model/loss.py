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
