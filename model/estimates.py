"""Model estimates used by workers, controller and CLI alike: parameters, memory, FLOPs, MFU.

Parameter counts and shapes come from `jax.eval_shape` over the real model (nothing is
allocated, so the 540B preset is counted on a laptop); FLOPs per token follow PaLM Appendix B.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from .config import PalmConfig
from .optim import OptimConfig, make_optimizer
from .sharding import (
    MESH_AXES,
    logical_names,
    mirrored_names,
    param_names_by_path,
    shard_divisor,
)

logger = logging.getLogger(__name__)


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


@functools.lru_cache(maxsize=32)
def abstract_params(cfg: PalmConfig) -> nnx.State:
    """The model's parameter state as ShapeDtypeStructs (via nnx.eval_shape; no allocation)."""
    from .palm import Palm

    model = nnx.eval_shape(lambda: Palm(cfg, rngs=nnx.Rngs(0)))
    return nnx.state(model, nnx.Param)


@functools.lru_cache(maxsize=256)
def param_count(cfg: PalmConfig) -> int:
    """Number of parameters of the model, counted from abstract shapes (cached: every
    submission asks, and a config is frozen)."""
    leaves = jax.tree.leaves(abstract_params(cfg))
    return int(sum(math.prod(x.shape) for x in leaves))


def flops_per_token(cfg: PalmConfig, seq_len: int) -> float:
    """Training FLOPs per token, 6N + 12 L H Q T (PaLM Appendix B; no rematerialisation)."""
    if seq_len <= 0:
        raise ValueError(f"seq_len={seq_len} must be a positive integer.")
    n = param_count(cfg)
    return float(6 * n + 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len)


def _check_mesh_shape(mesh_shape: Mapping[str, int]) -> dict[str, int]:
    out = {}
    for axis, size in mesh_shape.items():
        if axis not in MESH_AXES:
            raise ValueError(f"Mesh axis {axis!r} is not one of {', '.join(MESH_AXES)}.")
        if not isinstance(size, int) or size <= 0:
            raise ValueError(f"Mesh axis {axis}={size!r} must be a positive integer.")
        out[axis] = size
    return out


def memory_per_device(
    cfg: PalmConfig, mesh_shape: Mapping[str, int], optim: OptimConfig | None = None
) -> dict[str, Any]:
    """Bytes of parameters and optimizer state held by one device of a mesh.

    Each parameter is split as the logical rules place it on the mesh (an axis that does not
    divide a dimension replicates it); the optimizer state is shaped by optax's real `init`
    (via eval_shape) and each of its arrays is split like the parameter it mirrors.

    Args:
        cfg: the model.
        mesh_shape: mesh axis -> size, e.g. {"data": 4, "model": 2}; missing axes are 1.
        optim: optimizer settings (default: PaLM's).

    Returns:
        {"params_bytes", "opt_state_bytes", "total_bytes"} per device, and the unsharded
        totals "params_bytes_total", "opt_state_bytes_total".
    """
    sizes = _check_mesh_shape(mesh_shape)
    state = abstract_params(cfg)
    names_by_path = param_names_by_path(state)
    params_total = params_dev = 0.0
    for var in jax.tree.leaves(state, is_leaf=_is_variable):
        value = var.get_value()
        nbytes = math.prod(value.shape) * jnp.dtype(value.dtype).itemsize
        params_total += nbytes
        params_dev += nbytes / shard_divisor(value.shape, logical_names(var), sizes)

    pure = jax.tree.map(lambda v: v.get_value(), state, is_leaf=_is_variable)
    opt_shapes = jax.eval_shape(make_optimizer(optim or OptimConfig()).init, pure)
    opt_total = opt_dev = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(opt_shapes)[0]:
        nbytes = math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize
        opt_total += nbytes
        names = mirrored_names(tuple(path), names_by_path)
        if names is not None and len(names) == len(leaf.shape):
            nbytes /= shard_divisor(leaf.shape, names, sizes)
        opt_dev += nbytes
    return {
        "params_bytes": int(params_dev),
        "opt_state_bytes": int(opt_dev),
        "total_bytes": int(params_dev + opt_dev),
        "params_bytes_total": int(params_total),
        "opt_state_bytes_total": int(opt_total),
    }


# Bytes the compiled step keeps live per activation element, fitted to XLA's memory analysis
# of the real step (values saved for the backward pass plus the workspace at its peak; a
# linear program over 22 compiled models and meshes, no figure below the compiled one) and
# rounded up 5%, so that the estimate stays an upper bound: per layer, per element of the
# residual stream (B, T, D), of the MLP hidden (B, T, F), of the attention scores (B, H, T, T)
# and of the per-head values (B, T, H, Q); once, per element of the logits (B, T, V).
# tests/test_estimates.py holds the estimate within 25% above the compiled figure on
# palm-tiny, palm-small and palm-8b (2 layers) on several meshes.
# How far above the compiled figure the estimate may be (it is never below it).
ESTIMATE_MAX_OVER = 1.25
ACTIVATION_COPIES = {"stream": 4.9, "mlp": 5.8, "scores": 2.4, "heads": 1.5}
LOGITS_COPIES = 3.15
# With `data` > 1 (FSDP) the step gathers the embedding table whole over `data`: copies of
# one device's `model` slice of it.
GATHERED_EMBEDDING_COPIES = 3.75
# The update's workspace, in parameter copies (its outputs alias the donated state).
UPDATE_TEMP_PARAM_COPIES = 2.17


def _split(size: int, mesh_size: int) -> float:
    """A dimension's share on one device: split when the mesh axis divides it."""
    return size / mesh_size if size % mesh_size == 0 else float(size)


def activation_bytes_per_device(
    cfg: PalmConfig,
    mesh_shape: Mapping[str, int],
    *,
    examples_per_device: int,
    seq_len: int,
) -> int:
    """Bytes of activations and workspace one device holds at the peak of the backward pass
    (an upper bound; see ACTIVATION_COPIES), split as the logical rules split them: batch
    over `data`, heads, MLP hidden and vocabulary over `model`."""
    sizes = _check_mesh_shape(mesh_shape)
    m = sizes.get("model", 1)
    b, t = examples_per_device, seq_len
    per_layer = _layer_bytes(cfg, m, b, t, ACTIVATION_COPIES)
    vocab = _split(cfg.vocab_size, m)
    gathered = (
        GATHERED_EMBEDDING_COPIES * vocab * cfg.d_model * cfg.storage_dtype.itemsize
        if sizes.get("data", 1) > 1
        else 0.0
    )
    return int(cfg.n_layers * per_layer + 4 * LOGITS_COPIES * b * t * vocab + gathered)


def _layer_bytes(cfg: PalmConfig, model: int, b: int, t: int, copies: Mapping[str, float]) -> float:
    """One block's `copies` of its activations on one device, float32 (on the CPU; attention
    scores are float32 everywhere), split over `model` as the logical rules split them."""
    heads = _split(cfg.n_heads, model)
    return 4 * (
        copies["stream"] * b * t * cfg.d_model
        + copies["mlp"] * b * t * _split(cfg.mlp_dim, model)
        + copies["scores"] * b * heads * t * t
        + copies["heads"] * b * t * heads * cfg.head_dim
        + copies.get("kv", 0.0) * b * t * cfg.head_dim
    )


# The residuals of one block's forward that its backward takes (model/pipeline.py's stage
# forward returns them), counted on palm-tiny and palm-small stages: 4 copies of the residual
# stream (B, T, D), 6 of the MLP hidden, 3 of the attention scores plus their mask (a bool,
# counted as a float), 2 of the per-head values, 4 (B, T, head_dim) for the shared key and
# value and the rotary tables; the stream's 0.2 covers the per-token and per-head scalars.
RESIDUAL_COPIES = {"stream": 4.2, "mlp": 6.0, "scores": 4.0, "heads": 2.0, "kv": 4.0}


def stash_bytes_per_microbatch(
    cfg: PalmConfig,
    mesh_shape: Mapping[str, int],
    *,
    examples_per_device: int,
    seq_len: int,
    layers: int,
    recompute: bool = False,
) -> int:
    """Bytes one device keeps per microbatch a pipeline stage of `layers` blocks has run
    forward and not yet backward: the residuals its backward takes (RESIDUAL_COPIES, an
    upper bound; the stage's compile replaces it by the compiled programs' figure), or with
    `recompute` the stage input (B, T, D) only."""
    m = _check_mesh_shape(mesh_shape).get("model", 1)
    b, t = examples_per_device, seq_len
    if recompute:
        return 4 * b * t * cfg.d_model
    return int(layers * _layer_bytes(cfg, m, b, t, RESIDUAL_COPIES))


def training_bytes_per_device(
    cfg: PalmConfig,
    mesh_shape: Mapping[str, int],
    optim: OptimConfig | None = None,
    *,
    examples_per_device: int = 0,
    seq_len: int = 0,
) -> int:
    """Bytes one device holds at the peak of a training step: the one per-device memory
    formula of the project, an upper bound of what the compiled step reports.

    The step is two programs and the job holds the larger peak: the gradient program
    (parameters, optimizer state, the device's slice of the batch, the gradients it writes,
    and its activations and workspace, `activation_bytes_per_device`) or the update (state,
    gradients, and its workspace of UPDATE_TEMP_PARAM_COPIES parameter copies).

    Args:
        cfg: the model.
        mesh_shape: mesh axis -> size; missing axes are 1.
        optim: optimizer settings (default: PaLM's).
        examples_per_device: examples of one step on one device (the batch over `data`).
        seq_len: tokens per example.
    """
    mem = memory_per_device(cfg, mesh_shape, optim)
    params, state = mem["params_bytes"], mem["total_bytes"]
    batch_bytes = 4 * (seq_len + 1) * examples_per_device
    activations = (
        activation_bytes_per_device(
            cfg, mesh_shape, examples_per_device=examples_per_device, seq_len=seq_len
        )
        if examples_per_device and seq_len
        else 0
    )
    grad_peak = state + params + batch_bytes + activations
    update_peak = state + params + UPDATE_TEMP_PARAM_COPIES * params
    return int(max(grad_peak, update_peak))


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: tokens/s x FLOPs per token / peak FLOP/s."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops={peak_flops} must be positive.")
    return tokens_per_s * flops_per_token / peak_flops


_PEAK_CACHE: dict[tuple[int, str, int], float] = {}


def measure_cpu_peak_flops(n: int = 1024, dtype: str = "float32", repeats: int = 5) -> float:
    """FLOP/s of an n x n matmul on the default device, measured once per process.

    The best of `repeats` timed runs (after a compile and warm-up) of `2 n^3` FLOPs; the
    result is cached, so MFU figures within one process share one denominator.
    """
    key = (n, dtype, repeats)
    if key not in _PEAK_CACHE:
        _PEAK_CACHE[key] = measure_matmul_peak_flops(
            jax.devices()[0], n=n, dtype=dtype, chain=1, repeats=repeats
        )
    return _PEAK_CACHE[key]


# The file under the cache folder that records each machine's measured peak.
PEAK_CACHE_FILE = "peak_flops.json"


def machine_fingerprint() -> str:
    """What identifies this machine's compute for its cached peak: host name, CPU model and
    count, and JAX's default backend and device kind."""
    import platform

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if "model name" in line), cpu)
    except OSError:
        pass
    device = jax.devices()[0]
    return "|".join(
        [
            platform.node(),
            platform.machine(),
            cpu,
            str(os.cpu_count()),
            device.platform,
            getattr(device, "device_kind", ""),
        ]
    )


def cached_peak_flops(cache_dir: str | os.PathLike, measure=None) -> tuple[float, str]:
    """This machine's peak FLOP/s for MFU, measured once per machine and kept in
    `cache_dir/PEAK_CACHE_FILE` (keyed by `machine_fingerprint`): every later controller on
    the machine reads the same figure, so a job's MFU does not move between cluster starts.

    Args:
        cache_dir: the per-machine cache folder (model.tokenizer.default_cache_dir()).
        measure: measures the peak when the machine has no cached one (default: a 512 x 512
            float32 matmul, `measure_cpu_peak_flops`).

    Returns:
        (peak, "cached") or (peak, "measured") when it was measured now.
    """
    import json
    from pathlib import Path

    path = Path(cache_dir) / PEAK_CACHE_FILE
    key = machine_fingerprint()
    try:
        table = json.loads(path.read_text())
    except (OSError, ValueError):
        table = {}
    if not isinstance(table, dict):
        table = {}
    peak = table.get(key)
    if isinstance(peak, int | float) and peak > 0:
        return float(peak), "cached"
    peak = float((measure or (lambda: measure_cpu_peak_flops(n=512, repeats=3)))())
    table[key] = peak
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
    os.replace(tmp, path)  # atomic: two controllers starting at once both read a whole file
    logger.info("measured this machine's peak %.4g FLOP/s; cached in %s", peak, path)
    return peak, "measured"


def measure_matmul_peak_flops(
    device: Any, n: int = 8192, dtype: str = "bfloat16", chain: int = 20, repeats: int = 5
) -> float:
    """FLOP/s of (n x n) @ (n x n) matmuls on `device` (an accelerator's peak for MFU).

    The best of `repeats` timings of one jitted call that chains `chain` matmuls, so dispatch
    and timer costs are amortised; the right factor is scaled by 1/sqrt(n) so the values stay
    finite.
    """
    key_a, key_b = jax.random.split(jax.random.key(0))
    a_nn = jax.device_put(jax.random.normal(key_a, (n, n), jnp.dtype(dtype)), device)
    b_nn = jax.device_put(
        (jax.random.normal(key_b, (n, n), jnp.float32) / n**0.5).astype(jnp.dtype(dtype)), device
    )

    @jax.jit
    def chained(x_nn, y_nn):
        return jax.lax.fori_loop(0, chain, lambda _, x: x @ y_nn, x_nn)  # (n, n) @ (n, n)

    chained(a_nn, b_nn).block_until_ready()
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        chained(a_nn, b_nn).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    peak = 2.0 * n**3 * chain / best
    logger.info("measured peak %.3g FLOP/s on %s with %dx%d %s matmuls", peak, device, n, n, dtype)
    return peak


def model_info(cfg: PalmConfig, seq_len: int = 2048) -> dict[str, Any]:
    """Shapes, parameter count, FLOPs per token and single-device memory of a model."""
    mem = memory_per_device(cfg, {"data": 1, "model": 1})
    return {
        "params": param_count(cfg),
        "flops_per_token": flops_per_token(cfg, seq_len),
        "seq_len": seq_len,
        "vocab_size": cfg.vocab_size,
        "d_model": cfg.d_model,
        "n_layers": cfg.n_layers,
        "n_heads": cfg.n_heads,
        "head_dim": cfg.head_dim,
        "d_ff": cfg.mlp_dim,
        "params_bytes": mem["params_bytes"],
        "opt_state_bytes": mem["opt_state_bytes"],
    }


def _si(value: float, unit: str = "") -> str:
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= factor:
            return f"{value / factor:.2f} {prefix}{unit}".rstrip()
    return f"{value:g} {unit}".rstrip()


def _binary(nbytes: float) -> str:
    for factor, prefix in ((2**40, "TiB"), (2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if nbytes >= factor:
            return f"{nbytes / factor:.2f} {prefix}"
    return f"{int(nbytes)} B"


def format_quantity(key: str, value: Any) -> str:
    """A human form of one `model_info` value for the CLI table ("8.63B", "32.1 GiB")."""
    if key == "params":
        return _si(float(value)).replace(" ", "").replace("G", "B")
    if key.endswith("_bytes"):
        return _binary(float(value))
    if key.startswith("flops"):
        return f"{_si(float(value), 'FLOP')} ({float(value):.3e})"
    return str(value)
