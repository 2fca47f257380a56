"""PaLM's optimizer: Adafactor without factorisation, through optax (PaLM section 5).

- learning rate `lr` for the first `warmup_steps` steps, then `lr * sqrt(warmup_steps / k)`
  (with the defaults: 1e-2 for 10k steps, then 1/sqrt(k)); k counts steps from 1;
- first moment beta1 = 0.9; second moment beta2 = 1 - k^(-0.8);
- global-norm gradient clipping at 1.0 (before anything else);
- update RMS clipping at 1.0 and parameter-scale multiplication (Adafactor's defaults: PaLM
  calls the optimizer "Adam with parameter scaling");
- "dynamic" weight decay lr(k)^2: each step subtracts lr(k)^2 * param.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import optax

from .config import config_from_dict

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimConfig:
    """Every knob of PaLM's Adafactor; the defaults are the paper's.

    Attributes:
        learning_rate: the constant rate of the first `warmup_steps` steps.
        warmup_steps: steps at the constant rate (no ramp), then inverse-square-root decay.
        beta1: momentum (exponential moving average of updates); None disables it.
        decay_rate: exponent c of the second-moment decay beta2 = 1 - k^(-c).
        clip_norm: global gradient norm clip; None disables it.
        clipping_threshold: Adafactor's per-array update RMS clip; None disables it.
        multiply_by_parameter_scale: scale each array's step by max(1e-3, RMS(param)).
        weight_decay: "dynamic" (lr(k)^2), a constant float, or None for none.
        eps: added to squared gradients in the second moment.
    """

    learning_rate: float = 1e-2
    warmup_steps: int = 10_000
    beta1: float | None = 0.9
    decay_rate: float = 0.8
    clip_norm: float | None = 1.0
    clipping_threshold: float | None = 1.0
    multiply_by_parameter_scale: bool = True
    weight_decay: str | float | None = "dynamic"
    eps: float = 1e-30

    def __post_init__(self) -> None:
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate={self.learning_rate!r} must be positive.")
        if not isinstance(self.warmup_steps, int) or self.warmup_steps < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps!r} must be an integer >= 0.")
        if self.beta1 is not None and not 0 <= self.beta1 < 1:
            raise ValueError(f"beta1={self.beta1!r} must be in [0, 1), or None.")
        if not self.decay_rate > 0:
            raise ValueError(f"decay_rate={self.decay_rate!r} must be positive.")
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm={self.clip_norm!r} must be positive, or None.")
        if self.clipping_threshold is not None and not self.clipping_threshold >= 1:
            raise ValueError(
                f"clipping_threshold={self.clipping_threshold!r} must be >= 1, or None."
            )
        wd = self.weight_decay
        if not (wd is None or wd == "dynamic" or (isinstance(wd, int | float) and wd >= 0)):
            raise ValueError(
                f"weight_decay={wd!r} must be 'dynamic' (lr^2), a number >= 0, or None."
            )

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, path: str = "OptimConfig") -> OptimConfig:
        """The config of a field dict; errors as `PalmConfig.from_dict` (`config_from_dict`)."""
        return config_from_dict(cls, values, path)

    def with_overrides(self, overrides: dict[str, Any]) -> OptimConfig:
        """A copy with some fields replaced; an unknown key raises ValueError naming it."""
        fields = [f.name for f in dataclasses.fields(self)]
        unknown = [k for k in overrides if k not in fields]
        if unknown:
            raise ValueError(
                f"Unknown OptimConfig field {unknown[0]!r}; fields are: {', '.join(fields)}."
            )
        return dataclasses.replace(self, **overrides)


def learning_rate(cfg: OptimConfig, step: jax.Array | int) -> jax.Array:
    """The learning rate at optax step `step` (0 for the first update; k = step + 1).

    lr for k <= warmup_steps, then lr * sqrt(warmup_steps / k) (1/sqrt(k) with the defaults).
    """
    k = jnp.asarray(step, jnp.float32) + 1.0
    if cfg.warmup_steps == 0:
        return cfg.learning_rate / jnp.sqrt(k)
    decayed = cfg.learning_rate * jnp.sqrt(cfg.warmup_steps / k)
    return jnp.where(k <= cfg.warmup_steps, cfg.learning_rate, decayed)


def weight_decay_rate(cfg: OptimConfig, step: jax.Array | int) -> jax.Array:
    """The decay subtracted as `rate * param` at optax step `step`: lr^2 when "dynamic"."""
    if cfg.weight_decay == "dynamic":
        return jnp.square(learning_rate(cfg, step))
    return jnp.asarray(cfg.weight_decay or 0.0, jnp.float32)


def make_optimizer(cfg: OptimConfig) -> optax.GradientTransformation:
    """The optax transformation: global-norm clip, then unfactored Adafactor."""
    wd = None
    if cfg.weight_decay is not None and cfg.weight_decay != 0:
        wd = lambda count: weight_decay_rate(cfg, count)  # noqa: E731
    adafactor = optax.adafactor(
        learning_rate=lambda count: learning_rate(cfg, count),
        decay_rate=cfg.decay_rate,
        multiply_by_parameter_scale=cfg.multiply_by_parameter_scale,
        clipping_threshold=cfg.clipping_threshold,
        momentum=cfg.beta1,
        weight_decay_rate=wd,
        eps=cfg.eps,
        factored=False,
    )
    if cfg.clip_norm is None:
        return adafactor
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), adafactor)
