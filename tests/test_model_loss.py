"""The LM loss: mean cross-entropy plus 1e-4 * log^2 Z over every token, no mask."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from pathways_lite.model.loss import lm_loss


def test_loss_is_cross_entropy_plus_z_loss_over_all_tokens():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)).astype(np.float32) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    log_z = np.log(np.sum(np.exp(logits.astype(np.float64)), axis=-1))
    ce = np.mean(log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0])
    z = 1e-4 * np.mean(log_z**2)
    loss, parts = lm_loss(logits, targets)
    assert float(parts["ce"]) == pytest.approx(ce, rel=1e-6)
    assert float(parts["z_loss"]) == pytest.approx(z, rel=1e-5)
    assert float(loss) == pytest.approx(ce + z, rel=1e-6)
    loss_big_z, parts_big_z = lm_loss(logits, targets, z_loss=0.5)
    assert float(parts_big_z["z_loss"]) == pytest.approx(0.5 * np.mean(log_z**2), rel=1e-5)
    assert float(lm_loss(logits, targets, z_loss=0.0)[0]) == pytest.approx(ce, rel=1e-6)


def test_z_loss_gradient_pulls_log_z_towards_zero():
    logits = np.full((1, 1, 4), 5.0, np.float32)  # log Z = 5 + log 4 > 0
    grad = jax.grad(lambda x: lm_loss(x, np.zeros((1, 1), int), z_loss=1.0)[0])(logits)
    ce_only = jax.grad(lambda x: lm_loss(x, np.zeros((1, 1), int), z_loss=0.0)[0])(logits)
    assert np.all(np.asarray(grad - ce_only) > 0)  # raising any logit raises log^2 Z


def test_shape_mismatch_is_reported():
    with pytest.raises(ValueError, match=r"\(2, 3, 5\).*\(2, 4\)"):
        lm_loss(np.zeros((2, 3, 5)), np.zeros((2, 4), int))
