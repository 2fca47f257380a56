"""PaLM's Adafactor: the learning-rate schedule and updates checked against a hand computation."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathways_lite.model.optim import (
    OptimConfig,
    learning_rate,
    make_optimizer,
    weight_decay_rate,
)


def test_paper_defaults():
    cfg = OptimConfig()
    assert cfg.learning_rate == 1e-2 and cfg.warmup_steps == 10_000
    assert cfg.beta1 == 0.9 and cfg.decay_rate == 0.8 and cfg.clip_norm == 1.0
    assert cfg.weight_decay == "dynamic"


def test_schedule_is_constant_then_inverse_square_root():
    cfg = OptimConfig()
    # optax step s is PaLM's step k = s + 1
    assert float(learning_rate(cfg, 0)) == pytest.approx(1e-2)
    assert float(learning_rate(cfg, 9_999)) == pytest.approx(1e-2)  # k = 10,000
    assert float(learning_rate(cfg, 10_000)) == pytest.approx(1 / math.sqrt(10_001), rel=1e-6)
    assert float(learning_rate(cfg, 39_999)) == pytest.approx(1 / 200, rel=1e-6)
    assert float(learning_rate(cfg, 999_999)) == pytest.approx(1e-3, rel=1e-6)
    assert float(weight_decay_rate(cfg, 39_999)) == pytest.approx(1 / 200**2, rel=1e-5)
    custom = OptimConfig(learning_rate=0.1, warmup_steps=100)
    assert float(learning_rate(custom, 399)) == pytest.approx(0.1 * math.sqrt(100 / 400))
    assert float(weight_decay_rate(OptimConfig(weight_decay=0.5), 3)) == 0.5


def _reference_steps(params, grads_per_step, cfg: OptimConfig):
    """PaLM's update written out in numpy (float64), step by step."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    m = {k: np.zeros_like(x) for k, x in p.items()}
    for k_step, grads in enumerate(grads_per_step, start=1):
        g = {k: np.asarray(x, np.float64) for k, x in grads.items()}
        gnorm = math.sqrt(sum(float(np.sum(x**2)) for x in g.values()))
        if gnorm >= cfg.clip_norm:  # global-norm clipping
            g = {k: x * cfg.clip_norm / gnorm for k, x in g.items()}
        lr = cfg.learning_rate
        if k_step > cfg.warmup_steps:
            lr = cfg.learning_rate * math.sqrt(cfg.warmup_steps / k_step)
        beta2 = 1.0 - k_step ** (-cfg.decay_rate)  # 0 at k = 1: v is g^2 exactly
        for name in p:
            v[name] = beta2 * v[name] + (1 - beta2) * (g[name] ** 2 + cfg.eps)
            u = g[name] / np.sqrt(v[name])
            u = u / max(1.0, math.sqrt(np.mean(u**2)) / cfg.clipping_threshold)
            u = u * lr * max(1e-3, math.sqrt(np.mean(p[name] ** 2)))  # parameter scaling
            m[name] = cfg.beta1 * m[name] + (1 - cfg.beta1) * u  # momentum
            p[name] = p[name] - (m[name] + lr**2 * p[name])  # dynamic weight decay lr^2
    return p


@pytest.mark.parametrize("warmup_steps", [10_000, 1])
def test_two_updates_match_a_hand_computed_reference(warmup_steps):
    cfg = OptimConfig(warmup_steps=warmup_steps)
    rng = np.random.default_rng(0)
    params = {
        "w": rng.normal(size=(3, 4)).astype(np.float32) * 0.5,
        "b": rng.normal(size=(4,)).astype(np.float32) * 1e-4,  # tiny: the 1e-3 floor applies
    }
    grads = [
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32) * 2,  # global norm > 1: clipped
            "b": rng.normal(size=(4,)).astype(np.float32),
        },
        {
            "w": rng.normal(size=(3, 4)).astype(np.float32) * 0.01,  # not clipped
            "b": np.array([0.0, 1e-3, -2e-3, 0.0], np.float32),
        },
    ]
    opt = make_optimizer(cfg)
    state = opt.init(params)
    p = {k: jnp.asarray(x) for k, x in params.items()}
    for g in grads:
        updates, state = opt.update({k: jnp.asarray(x) for k, x in g.items()}, state, p)
        p = optax.apply_updates(p, updates)
    expected = _reference_steps(params, grads, cfg)
    for name in params:
        np.testing.assert_allclose(np.asarray(p[name]), expected[name], rtol=2e-5, atol=1e-9)
        assert not np.allclose(np.asarray(p[name]), params[name])  # it did move


def test_optimizer_state_is_unfactored():
    params = {"w": jnp.ones((256, 512))}  # big enough that factored Adafactor would factor it
    state = make_optimizer(OptimConfig()).init(params)
    full_size = [x.size for x in jax.tree.leaves(state) if x.shape == (256, 512)]
    assert len(full_size) == 2  # the second moment and the momentum, both full


@pytest.mark.parametrize(
    ("overrides", "quoted"),
    [
        ({"learning_rate": 0.0}, "learning_rate=0.0"),
        ({"beta1": 1.0}, "beta1=1.0"),
        ({"clip_norm": -1.0}, "clip_norm=-1.0"),
        ({"weight_decay": "static"}, "weight_decay='static'"),
        ({"warmup_steps": -5}, "warmup_steps=-5"),
    ],
)
def test_invalid_settings_raise_sentences_quoting_them(overrides, quoted):
    with pytest.raises(ValueError) as exc:
        OptimConfig(**overrides)
    assert quoted in str(exc.value)
    with pytest.raises(ValueError, match="'lr'"):
        OptimConfig().with_overrides({"lr": 1.0})
