"""The SwiGLU feed-forward layer of PaLM: `(Swish(x W) * x V) W_out`, three bias-free kernels."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from .layers import PRECISION, fan_in_init
from .sharding import constrain, param

logger = logging.getLogger(__name__)


class SwiGLU(nnx.Module):
    """SwiGLU MLP with hidden width d_ff (PaLM: 4 * d_model, with no 2/3 reduction)."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
    ):
        self.dtype = dtype
        # One draw from the stream per module (each draw costs a trace-time check in nnx).
        gate_key, up_key, down_key = jax.random.split(rngs.params(), 3)
        self.gate_kernel = param(
            fan_in_init(gate_key, (d_model, d_ff), d_model, param_dtype), ("embed", "mlp")
        )
        self.up_kernel = param(
            fan_in_init(up_key, (d_model, d_ff), d_model, param_dtype), ("embed", "mlp")
        )
        self.down_kernel = param(
            fan_in_init(down_key, (d_ff, d_model), d_ff, param_dtype), ("mlp", "embed")
        )

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        dt = self.dtype
        # (B, T, D) x (D, F) -> (B, T, F), twice: the gate and the linear path
        gate_btf = jnp.einsum(
            "btd,df->btf", x_btd, self.gate_kernel[...].astype(dt), precision=PRECISION
        )
        up_btf = jnp.einsum(
            "btd,df->btf", x_btd, self.up_kernel[...].astype(dt), precision=PRECISION
        )
        h_btf = constrain(jax.nn.silu(gate_btf) * up_btf, ("batch", "length", "act_mlp"))
        # (B, T, F) x (F, D) -> (B, T, D)
        y_btd = jnp.einsum(
            "btf,fd->btd", h_btf, self.down_kernel[...].astype(dt), precision=PRECISION
        )
        return constrain(y_btd, ("batch", "length", "act_embed"))
