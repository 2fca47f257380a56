"""Building blocks of PaLM: bias-free norms, rotary position embeddings, the shared embedding."""

from __future__ import annotations

import logging
import math

import jax
import jax.numpy as jnp
from flax import nnx

from .sharding import constrain, param

logger = logging.getLogger(__name__)

# float32 matmuls at full precision everywhere, so sharded and single-device runs agree to
# 1e-5 (on TPUs and GPUs the default would use bf16/tf32 passes).
PRECISION = jax.lax.Precision.HIGHEST


def fan_in_init(key: jax.Array, shape: tuple[int, ...], fan_in: int, dtype: jnp.dtype) -> jax.Array:
    """A kernel drawn from N(0, 1/fan_in): PaLM's fan-in initialisation."""
    return (jax.random.normal(key, shape, jnp.float32) / math.sqrt(fan_in)).astype(dtype)


class Norm(nnx.Module):
    """Scale-only RMS norm (default) or mean-centred LayerNorm; neither has a bias."""

    def __init__(
        self,
        d_model: int,
        *,
        kind: str = "rms",
        eps: float = 1e-6,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        if kind not in ("rms", "layernorm"):
            raise ValueError(f"norm kind={kind!r} is not one of rms, layernorm.")
        self.kind = kind
        self.eps = eps
        self.dtype = dtype
        self.scale = param(jnp.ones((d_model,), param_dtype), ("embed",))

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        x = x_btd.astype(jnp.float32)
        if self.kind == "layernorm":
            x = x - jnp.mean(x, axis=-1, keepdims=True)
        var_bt1 = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
        y_btd = x * jax.lax.rsqrt(var_bt1 + self.eps) * self.scale[...].astype(jnp.float32)
        return y_btd.astype(self.dtype)


def rotary_angles(positions: jax.Array, head_dim: int, base: float = 10_000.0) -> jax.Array:
    """Rotation angles `pos * base^(-2i/head_dim)` for i < head_dim/2: positions.shape + (D/2,)."""
    half = head_dim // 2
    inv_freq_f = base ** (-jnp.arange(half, dtype=jnp.float32) / half)  # (D/2,)
    return positions.astype(jnp.float32)[..., None] * inv_freq_f


def apply_rotary(x_bthd: jax.Array, positions_bt: jax.Array, base: float = 10_000.0):
    """Rotary position embedding, half-split, over the whole head dimension.

    The pair (x[i], x[i + D/2]) is rotated by the angle `pos * base^(-2i/D)`, so the dot
    product of a rotated query and key depends on their positions only through the offset.

    Args:
        x_bthd: (B, T, H, D) queries or keys (H may be 1).
        positions_bt: (B, T) integer positions (or (T,), broadcast over the batch).
        base: frequency base (10000 in PaLM).
    """
    head_dim = x_bthd.shape[-1]
    angles_btf = rotary_angles(positions_bt, head_dim, base)  # (B, T, D/2)
    cos_bt1f = jnp.cos(angles_btf)[..., None, :]  # (B, T, 1, D/2)
    sin_bt1f = jnp.sin(angles_btf)[..., None, :]
    x = x_bthd.astype(jnp.float32)
    x1_bthf, x2_bthf = jnp.split(x, 2, axis=-1)  # two (B, T, H, D/2) halves
    out_bthd = jnp.concatenate(
        [x1_bthf * cos_bt1f - x2_bthf * sin_bt1f, x2_bthf * cos_bt1f + x1_bthf * sin_bt1f],
        axis=-1,
    )
    return out_bthd.astype(x_bthd.dtype)


class Embed(nnx.Module):
    """The shared input/output embedding: tokens in, vocabulary logits out (tied weights)."""

    def __init__(
        self,
        vocab_size: int,
        d_model: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.d_model = d_model
        self.dtype = dtype
        # N(0, 1): PaLM applies no norm to embeddings and relies on the 1/sqrt(d) logit scale.
        emb_vd = jax.random.normal(rngs.params(), (vocab_size, d_model), jnp.float32)
        self.embedding = param(emb_vd.astype(param_dtype), ("vocab", "embed"))

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """Look tokens up: (B, T) int -> (B, T, D)."""
        x_btd = jnp.take(self.embedding[...], tokens_bt, axis=0).astype(self.dtype)
        return constrain(x_btd, ("batch", "length", "act_embed"))

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """Output logits with the same matrix, scaled by 1/sqrt(d_model): (B, T, V) float32."""
        emb_vd = self.embedding[...].astype(self.dtype)
        # (B, T, D) x (V, D) -> (B, T, V)
        logits_btv = jnp.einsum("btd,vd->btv", x_btd, emb_vd, precision=PRECISION)
        logits_btv = logits_btv.astype(jnp.float32) / math.sqrt(self.d_model)
        return constrain(logits_btv, ("batch", "length", "act_vocab"))
