"""Estimates: parameter counts of the paper's presets (never allocated), FLOPs per token,
memory per device, MFU."""

from __future__ import annotations

import math

import jax
import numpy as np
import pytest
from flax import nnx

from pathways_lite.model import estimates, sharding
from pathways_lite.model.config import PalmConfig
from pathways_lite.model.optim import OptimConfig, make_optimizer
from pathways_lite.model.palm import Palm


def reference_count(cfg: PalmConfig) -> int:
    """REFERENCE.md: N = L(12d^2 + 2dHQ + 2dQ + d) + Vd + d (with d_ff = 4d)."""
    d, h, q = cfg.d_model, cfg.n_heads, cfg.head_dim
    return cfg.n_layers * (12 * d * d + 2 * d * h * q + 2 * d * q + d) + cfg.vocab_size * d + d


@pytest.mark.parametrize(
    ("preset", "paper"),
    [("palm-8b", 8.63e9), ("palm-62b", 62.50e9), ("palm-540b", 540.35e9)],
)
def test_paper_parameter_counts_within_0_1_percent(preset, paper):
    cfg = PalmConfig.from_preset(preset)
    # 540B float32 parameters are 2 TB: counting them at all proves nothing was allocated.
    n = estimates.param_count(cfg)
    assert abs(n - paper) / paper < 1e-3
    assert n == reference_count(cfg)


def test_param_count_matches_a_real_tiny_model():
    cfg = PalmConfig.palm_tiny()
    model = Palm(cfg, rngs=nnx.Rngs(0))
    real = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert estimates.param_count(cfg) == real == reference_count(cfg)


def test_flops_per_token_is_6n_plus_attention():
    cfg = PalmConfig.palm_tiny()
    n = estimates.param_count(cfg)
    expected = 6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 64
    assert estimates.flops_per_token(cfg, 64) == expected
    # PaLM 540B at 2048 tokens: 3.28 TFLOPs per token (section 4.1 / Appendix B).
    big = estimates.flops_per_token(PalmConfig.palm_540b(), 2048)
    assert big == pytest.approx(3.28e12, rel=2e-3)
    with pytest.raises(ValueError, match="seq_len=0"):
        estimates.flops_per_token(cfg, 0)


def test_memory_per_device_matches_real_placement_on_a_mesh():
    cfg = PalmConfig.palm_tiny()
    single = estimates.memory_per_device(cfg, {"data": 1, "model": 1})
    n = estimates.param_count(cfg)
    assert single["params_bytes"] == 4 * n
    # Unfactored Adafactor with momentum: a full second moment and momentum per parameter.
    opt_shapes = jax.eval_shape(
        make_optimizer(OptimConfig()).init,
        jax.tree.map(
            lambda v: v.get_value(),
            estimates.abstract_params(cfg),
            is_leaf=lambda x: isinstance(x, nnx.Variable),
        ),
    )
    opt_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(opt_shapes))
    assert single["opt_state_bytes"] == opt_bytes
    assert 2 * 4 * n <= opt_bytes < 2 * 4 * n + 4096

    mesh = sharding.make_mesh(data=2, model=2)
    model = Palm(cfg, rngs=nnx.Rngs(0))
    state = nnx.state(model)
    placed = jax.device_put(state, sharding.state_shardings(state, mesh))
    device0 = jax.devices()[0]
    on_device0 = sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(placed)
        for shard in leaf.addressable_shards
        if shard.device == device0
    )
    per_device = estimates.memory_per_device(cfg, {"data": 2, "model": 2})
    assert per_device["params_bytes"] == on_device0
    assert single["params_bytes"] / 4 <= per_device["params_bytes"] < single["params_bytes"] / 2
    assert per_device["opt_state_bytes"] < single["opt_state_bytes"] / 2
    with pytest.raises(ValueError, match="'pipeline'"):
        estimates.memory_per_device(cfg, {"pipeline": 2})


def test_training_bytes_are_the_larger_of_the_gradient_and_the_update_peaks():
    cfg = PalmConfig.palm_tiny()
    mesh = {"data": 2, "model": 2}
    optim = OptimConfig(beta1=None)
    mem = estimates.memory_per_device(cfg, mesh, optim)
    acts = estimates.activation_bytes_per_device(cfg, mesh, examples_per_device=3, seq_len=16)
    got = estimates.training_bytes_per_device(cfg, mesh, optim, examples_per_device=3, seq_len=16)
    state_and_grads = mem["total_bytes"] + mem["params_bytes"]
    assert got == int(
        max(
            state_and_grads + 4 * 17 * 3 + acts,
            state_and_grads + estimates.UPDATE_TEMP_PARAM_COPIES * mem["params_bytes"],
        )
    )
    # Activations grow with the batch; without one the update's peak is what remains.
    assert (
        estimates.activation_bytes_per_device(cfg, mesh, examples_per_device=6, seq_len=16)
        > acts
        > 0
    )
    assert estimates.training_bytes_per_device(cfg, mesh, optim) == int(
        state_and_grads + estimates.UPDATE_TEMP_PARAM_COPIES * mem["params_bytes"]
    )


# (preset, overrides, mesh (data, model), examples per island, seq_len): the palm-tiny
# job, palm-small data-parallel and fully sharded, palm-8b cut to 2 layers on a model axis.
MEASURED_CASES = [
    ("palm-tiny", {}, (1, 2), 8, 64),
    ("palm-tiny", {}, (2, 2), 8, 64),
    ("palm-small", {}, (2, 1), 8, 128),
    ("palm-8b", {"n_layers": 2}, (1, 4), 1, 64),
]


@pytest.mark.timeout(300)
def test_the_estimate_is_an_upper_bound_within_25_percent_of_the_compiled_step():
    """What admission places a job by before its first load (the estimate) against what its
    compiled step holds at its peak (XLA's memory analysis of both programs, plus the
    optimizer state beside the gradient program): never below, at most 25% above."""
    from pathways_lite.model.train import StepFunctions, make_mesh
    from pathways_lite.workers.palm_runtime import compiled_memory

    ratios = {}
    for preset, overrides, (data, model), batch, seq_len in MEASURED_CASES:
        cfg = PalmConfig.from_preset(preset, **overrides)
        mesh = make_mesh(data, model, devices=jax.devices()[: data * model])
        fns = StepFunctions(cfg, OptimConfig(), mesh)
        measured = compiled_memory(fns, fns.compile(batch, seq_len)).total_bytes
        estimate = estimates.training_bytes_per_device(
            cfg,
            {"data": data, "model": model},
            OptimConfig(),
            examples_per_device=batch // data,
            seq_len=seq_len,
        )
        ratios[(preset, data, model)] = estimate / measured
    assert all(1.0 <= r <= estimates.ESTIMATE_MAX_OVER for r in ratios.values()), ratios


def test_mfu_and_measured_peak():
    assert estimates.mfu(1000.0, 1e9, 2e12) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="peak_flops=0"):
        estimates.mfu(1.0, 1.0, 0)
    peak = estimates.measure_cpu_peak_flops(n=256, repeats=2)
    assert 1e7 < peak < 1e14
    assert estimates.measure_cpu_peak_flops(n=256, repeats=2) == peak  # measured once


def test_chained_matmul_peak_and_the_peak_a_jobs_mfu_uses():
    from pathways_lite.controller.views import job_peak_flops

    peak = estimates.measure_matmul_peak_flops(
        jax.devices()[0], n=128, dtype="float32", chain=4, repeats=2
    )
    assert 1e6 < peak < 1e15
    # Accelerator hosts report their per-device peak: the job's devices times the smallest.
    assert job_peak_flops(4, [7e14, 8e14], cpu_peak=2e11) == 4 * 7e14
    # Simulated CPU devices (peak 0) share the machine: its peak, whatever the device count.
    assert job_peak_flops(4, [0.0, 0.0], cpu_peak=2e11) == 2e11
    assert job_peak_flops(4, [7e14, 0.0], cpu_peak=2e11) == 2e11
    assert job_peak_flops(4, [0.0], cpu_peak=None) == 0.0


def test_model_info_and_formatting():
    info = estimates.model_info(PalmConfig.palm_tiny(), seq_len=128)
    assert isinstance(info["params"], int) and info["seq_len"] == 128
    assert info["flops_per_token"] == estimates.flops_per_token(PalmConfig.palm_tiny(), 128)
    assert {"params_bytes", "opt_state_bytes"} <= set(info)
    assert estimates.format_quantity("params", 8_632_012_800) == "8.63B"
    assert estimates.format_quantity("params", 151_744) == "151.74K"
    assert estimates.format_quantity("params_bytes", 2**30 * 32.16) == "32.16 GiB"
    assert "3.28 TFLOP" in estimates.format_quantity("flops_per_token", 3.2777e12)
    assert estimates.format_quantity("n_layers", 2) == "2"
    assert math.isfinite(np.float64(info["flops_per_token"]))


def test_the_peak_is_measured_once_per_machine_and_read_from_its_cache(tmp_path):
    """MFU's denominator: the first controller on a machine measures it and records it; every
    later one (after down/up) reads the very same figure; `--peak-flops` overrides it."""
    from pathways_lite.controller.options import build_parser
    from pathways_lite.controller.views import Views

    calls = []

    def measure() -> float:
        calls.append(1)
        return 1.234e11 + len(calls)  # a re-measurement would differ

    first = estimates.cached_peak_flops(tmp_path, measure)
    again = estimates.cached_peak_flops(tmp_path, measure)
    assert first == (1.234e11 + 1, "measured") and again == (first[0], "cached")
    assert len(calls) == 1
    views = Views(None, None, {}, {}, lambda r: None, peak_cache_dir=str(tmp_path))
    assert views.measure_peak() == first[0] and views.peak_source == "cached"
    args = ["--state-dir", "s", "--ray-address", "a:1", "--peak-flops", "2e11"]
    assert build_parser().parse_args(args).peak_flops == 2e11
    overridden = Views(None, None, {}, {}, lambda r: None, peak_flops=2e11)
    assert overridden.measure_peak() == 2e11 and overridden.peak_source == "--peak-flops"
    with pytest.raises(SystemExit):
        build_parser().parse_args([*args[:4], "--peak-flops", "-1"])
