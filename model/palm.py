"""The PaLM decoder: the parallel block and the assembled model, with KV-cache decoding.

    y = x + MLP(norm(x)) + Attention(norm(x))        (one norm per layer, PaLM section 2)

Token embeddings (N(0, 1), no norm) feed a stack of parallel blocks; a final norm and the same
embedding matrix, scaled by 1/sqrt(d_model), give the vocabulary logits.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
from flax import nnx

from .attention import KVCache, LayerCache, MultiQueryAttention
from .config import PalmConfig
from .layers import Embed, Norm
from .mlp import SwiGLU
from .sharding import check_mesh, constrain

logger = logging.getLogger(__name__)


class ParallelBlock(nnx.Module):
    """One PaLM layer: attention and MLP read the same normed input, in parallel."""

    def __init__(self, cfg: PalmConfig, *, rngs: nnx.Rngs):
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        self.norm = Norm(cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt)
        self.attention = MultiQueryAttention(
            cfg.d_model,
            cfg.n_heads,
            cfg.head_dim,
            rope_base=cfg.rope_base,
            rngs=rngs,
            dtype=dt,
            param_dtype=pdt,
        )
        self.mlp = SwiGLU(cfg.d_model, cfg.mlp_dim, rngs=rngs, dtype=dt, param_dtype=pdt)

    def branches(
        self, x_btd: jax.Array, segments_bt: jax.Array | None = None
    ) -> tuple[jax.Array, jax.Array]:
        """The attention branch and the MLP branch of this block, each (B, T, D)."""
        h_btd = self.norm(x_btd)
        return self.attention(h_btd, segments_bt), self.mlp(h_btd)

    def __call__(self, x_btd: jax.Array, segments_bt: jax.Array | None = None) -> jax.Array:
        attn_btd, mlp_btd = self.branches(x_btd, segments_bt)
        return constrain(x_btd + attn_btd + mlp_btd, ("batch", "length", "act_embed"))

    def decode(
        self, x_bsd: jax.Array, cache: LayerCache, pos: jax.Array
    ) -> tuple[jax.Array, LayerCache]:
        """The block on S new tokens at positions pos.., reading and extending the cache."""
        h_bsd = self.norm(x_bsd)
        attn_bsd, cache = self.attention.decode(h_bsd, cache, pos)
        return x_bsd + attn_bsd + self.mlp(h_bsd), cache


class Palm(nnx.Module):
    """The PaLM decoder-only language model."""

    def __init__(self, cfg: PalmConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dt, pdt = cfg.compute_dtype, cfg.storage_dtype
        self.embed = Embed(cfg.vocab_size, cfg.d_model, rngs=rngs, dtype=dt, param_dtype=pdt)
        self.blocks = nnx.List([ParallelBlock(cfg, rngs=rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(
            cfg.d_model, kind=cfg.norm, eps=cfg.norm_eps, dtype=dt, param_dtype=pdt
        )

    def __call__(self, tokens_bt: jax.Array, segments_bt: jax.Array | None = None) -> jax.Array:
        """Next-token logits for every position: (B, T) int32 -> (B, T, V) float32.

        `segments_bt` (B, T): packed text-to-text examples' ids; a token attends only to
        tokens of its own example. None (language modelling): plain causal attention.
        """
        check_mesh()
        x_btd = self.embed(tokens_bt)
        for block in self.blocks:
            x_btd = block(x_btd, segments_bt)
        return self.embed.attend(self.final_norm(x_btd))

    def init_cache(self, batch: int, max_len: int) -> KVCache:
        """An empty cache for `batch` sequences of up to `max_len` tokens.

        Each layer holds one K and one V head of shape (B, max_len, 1, head_dim).
        """
        if batch <= 0 or max_len <= 0:
            raise ValueError(
                f"A KV cache needs a positive batch and length; got batch={batch}, "
                f"max_len={max_len}."
            )
        layers = tuple(
            block.attention.init_cache(batch, max_len, self.cfg.head_dim) for block in self.blocks
        )
        return KVCache(layers=layers)

    def decode_step(
        self, tokens_bs: jax.Array, cache: KVCache, pos: jax.Array | int
    ) -> tuple[jax.Array, KVCache]:
        """Logits of new tokens given the cached prefix [0, pos); the tokens' K/V are stored.

        Args:
            tokens_bs: (B, 1) tokens at position `pos` (or (B, S) for a prefill of S tokens
                at positions pos..pos+S-1).
            cache: the KV cache from `init_cache` or a previous step.
            pos: scalar int, the position of the first token; pos + S <= cache.max_len.

        Returns:
            (B, S, V) float32 logits, equal to the full forward pass at those positions, and
            the updated cache.
        """
        if tokens_bs.ndim != 2:
            raise ValueError(
                f"decode_step takes tokens of shape (B, S); got shape {tokens_bs.shape}."
            )
        check_mesh()
        pos = jnp.asarray(pos, jnp.int32)
        x_bsd = self.embed(tokens_bs)
        new_layers = []
        for block, layer_cache in zip(self.blocks, cache.layers, strict=True):
            x_bsd, layer_cache = block.decode(x_bsd, layer_cache, pos)
            new_layers.append(layer_cache)
        logits_bsv = self.embed.attend(self.final_norm(x_bsd))
        return logits_bsv, KVCache(layers=tuple(new_layers))
