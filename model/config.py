"""PaLM model configuration: one frozen dataclass, its presets, and rebuilding it from a dict."""

from __future__ import annotations

import dataclasses
import functools
import logging
import typing
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp

logger = logging.getLogger(__name__)

NORMS = ("rms", "layernorm")
DTYPES = ("float32", "bfloat16", "float16")
# "auto" compute dtype: bfloat16 on accelerators (GPU/TPU matmul units), float32 on CPU, where
# bfloat16 is slower and the reference comparisons at 1e-5 need float32.
AUTO_DTYPE = "auto"
ACCELERATOR_BACKENDS = ("gpu", "cuda", "rocm", "tpu")


@functools.cache
def field_hints(cls: type) -> dict[str, Any]:
    """A config dataclass's resolved field types (`typing.get_type_hints`, resolved once per
    class: every submitted spec is checked against them)."""
    return typing.get_type_hints(cls)


def config_from_dict(cls: type, values: Mapping[str, Any], path: str) -> Any:
    """A config dataclass from its field dict (as decoded from JSON or a protobuf Struct).

    JSON and Struct numbers may arrive as floats: a whole number becomes an int where the
    field is an int. Absent fields take their defaults.

    Args:
        cls: the config class (PalmConfig, OptimConfig).
        values: field name -> value.
        path: the dotted name of `values` in error messages ("model.config").

    Raises:
        ValueError: an unknown key, a value of the wrong kind, or the class's own checks; the
            message names the field (`model.config.d_modle: unknown key ...`).
    """
    hints = field_hints(cls)
    known = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in sorted(values.items()):
        where = f"{path}.{key}"
        if key not in known:
            raise ValueError(
                f"{where}: unknown key {key!r}; {cls.__name__} fields are: {', '.join(known)}."
            )
        allowed = set(typing.get_args(hints[key])) or {hints[key]}
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if value is None and type(None) in allowed:
            kwargs[key] = None
        elif isinstance(value, bool) and bool in allowed:
            kwargs[key] = value
        elif number and int in allowed and float(value).is_integer():
            kwargs[key] = int(value)
        elif number and float in allowed:
            kwargs[key] = float(value)
        elif isinstance(value, str) and str in allowed:
            kwargs[key] = value
        else:
            raise ValueError(f"{where}={value!r} has the wrong kind for {hints[key]}.")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{path}: {e}") from None


@dataclasses.dataclass(frozen=True, kw_only=True)
class PalmConfig:
    """Shapes and numerics of a PaLM decoder (Chowdhery et al. 2022, section 2).

    The defaults are PaLM 8B (Table 1), so `PalmConfig()` is a real model; use a preset
    (`PalmConfig.palm_tiny()`) or `dataclasses.replace` / `with_overrides` for variants.

    Attributes:
        vocab_size: SentencePiece vocabulary size; the paper's is exactly 256,000.
        d_model: Width of the residual stream.
        n_layers: Number of parallel blocks.
        n_heads: Number of query heads (keys and values have one shared head).
        head_dim: Size of each attention head; 256 in every paper preset, independent of
            d_model / n_heads.
        d_ff: Hidden width of the SwiGLU MLP; None means 4 * d_model (no 2/3 reduction).
        norm: "rms" (scale-only RMS norm, T5X/PaLM) or "layernorm" (mean-centred, no bias).
        norm_eps: Epsilon added to the variance in the norm.
        rope_base: Base of the rotary position embedding frequencies.
        max_seq_len: Longest sequence the model is meant for (training length, cache bound).
        dtype: Compute dtype of activations and matmuls; "auto" (the default) is bfloat16 on
            GPU/TPU and float32 on CPU, decided by the backend of the process that runs it.
        param_dtype: Storage dtype of the parameters.
        z_loss: Weight of the z-loss term `z_loss * logsumexp(logits)**2`.
    """

    vocab_size: int = 256_000
    d_model: int = 4096
    n_layers: int = 32
    n_heads: int = 16
    head_dim: int = 256
    d_ff: int | None = None
    norm: str = "rms"
    norm_eps: float = 1e-6
    rope_base: float = 10_000.0
    max_seq_len: int = 2048
    dtype: str = AUTO_DTYPE
    param_dtype: str = "float32"
    z_loss: float = 1e-4

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "head_dim", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive integer.")
        if self.d_ff is not None and (
            not isinstance(self.d_ff, int) or isinstance(self.d_ff, bool) or self.d_ff <= 0
        ):
            raise ValueError(
                f"d_ff={self.d_ff!r} must be a positive integer, or None for 4 * d_model."
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim={self.head_dim} must be even: rotary embeddings rotate pairs "
                "of the two halves of each head."
            )
        if self.norm not in NORMS:
            raise ValueError(f"norm={self.norm!r} is not one of {', '.join(NORMS)}.")
        if self.dtype not in (AUTO_DTYPE, *DTYPES):
            raise ValueError(
                f"dtype={self.dtype!r} is not one of {AUTO_DTYPE}, {', '.join(DTYPES)}."
            )
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype={self.param_dtype!r} is not one of {', '.join(DTYPES)}.")
        for name in ("norm_eps", "rope_base"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"{name}={value!r} must be a positive number.")
        if not isinstance(self.z_loss, int | float) or self.z_loss < 0:
            raise ValueError(f"z_loss={self.z_loss!r} must be a non-negative number.")

    # ----------------------------------------------------------------- derived values

    @property
    def mlp_dim(self) -> int:
        """The SwiGLU hidden width: d_ff, or 4 * d_model when d_ff is None."""
        return self.d_ff if self.d_ff is not None else 4 * self.d_model

    @property
    def compute_dtype(self) -> jnp.dtype:
        if self.dtype == AUTO_DTYPE:
            import jax

            on_accelerator = jax.default_backend() in ACCELERATOR_BACKENDS
            return jnp.dtype("bfloat16" if on_accelerator else "float32")
        return jnp.dtype(self.dtype)

    @property
    def storage_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.param_dtype)

    # ----------------------------------------------------------------- presets

    @classmethod
    def palm_8b(cls, **overrides: Any) -> PalmConfig:
        """PaLM 8B (Table 1): 32 layers, 16 heads, d_model 4096, 8.63B parameters."""
        base = dict(vocab_size=256_000, d_model=4096, n_layers=32, n_heads=16, head_dim=256)
        return cls(**{**base, **overrides})

    @classmethod
    def palm_62b(cls, **overrides: Any) -> PalmConfig:
        """PaLM 62B (Table 1): 64 layers, 32 heads, d_model 8192, 62.50B parameters."""
        base = dict(vocab_size=256_000, d_model=8192, n_layers=64, n_heads=32, head_dim=256)
        return cls(**{**base, **overrides})

    @classmethod
    def palm_540b(cls, **overrides: Any) -> PalmConfig:
        """PaLM 540B (Table 1): 118 layers, 48 heads, d_model 18432, 540.35B parameters."""
        base = dict(vocab_size=256_000, d_model=18432, n_layers=118, n_heads=48, head_dim=256)
        return cls(**{**base, **overrides})

    @classmethod
    def palm_tiny(cls, **overrides: Any) -> PalmConfig:
        """A model for tests: trains on one CPU core in milliseconds per step."""
        # vocab 512 is a placeholder: the trained tokenizer's size comes in via overrides.
        base = dict(vocab_size=512, d_model=64, n_layers=2, n_heads=4, head_dim=16, max_seq_len=256)
        return cls(**{**base, **overrides})

    @classmethod
    def palm_small(cls, **overrides: Any) -> PalmConfig:
        """A benchmark model: a step at batch 8 x 256 takes well under a second on 2 cores."""
        base = dict(
            vocab_size=8192, d_model=256, n_layers=4, n_heads=4, head_dim=64, max_seq_len=1024
        )
        return cls(**{**base, **overrides})

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PalmConfig:
        """Build a preset by its name ("palm-8b", "palm-tiny", ...) with optional overrides.

        Raises:
            ValueError: the name is not a preset, or an override is invalid.
        """
        factory = PRESETS.get(name)
        if factory is None:
            raise ValueError(f"Unknown model preset {name!r}; known presets: {', '.join(PRESETS)}.")
        cfg = factory()
        return cfg.with_overrides(overrides) if overrides else cfg

    def with_overrides(self, overrides: Mapping[str, Any]) -> PalmConfig:
        """Return a copy with some fields replaced; the result is validated again.

        Raises:
            ValueError: a key is not a field of PalmConfig, or a value is invalid.
        """
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            raise ValueError(
                f"Unknown PalmConfig field {unknown[0]!r}; fields are: {', '.join(fields)}."
            )
        return dataclasses.replace(self, **dict(overrides))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, path: str = "PalmConfig") -> PalmConfig:
        """The config whose `to_dict` is `values` (absent fields take the defaults).

        Raises:
            ValueError: an unknown key, a value of the wrong kind, or a failed check; the
                message names the field as `<path>.<field>`.
        """
        return config_from_dict(cls, values, path)


PRESETS: dict[str, Callable[..., PalmConfig]] = {
    "palm-8b": PalmConfig.palm_8b,
    "palm-62b": PalmConfig.palm_62b,
    "palm-540b": PalmConfig.palm_540b,
    "palm-tiny": PalmConfig.palm_tiny,
    "palm-small": PalmConfig.palm_small,
}
