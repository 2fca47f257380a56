"""The single-process reference trainer: the step functions every distributed run must match.

The training step is split in two so that the island runtime can exchange gradients between
islands in the middle (PaLM's two-pod data parallelism): `grad_fn` computes the loss and the
gradients of one slice of the global batch, `apply_fn` clips and applies the optimizer update.
The reference trainer composes both on the whole global batch, optionally on a mesh of local
devices with the model's logical-axis rules; the island runtime uses the very same functions.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from .config import PalmConfig
from .loss import lm_loss
from .optim import OptimConfig, make_optimizer
from .palm import Palm
from .sharding import (
    logical_to_spec,
    make_mesh,
    state_shardings,
    tree_shardings_like_params,
)

logger = logging.getLogger(__name__)

__all__ = [
    "CompiledStep",
    "ReferenceTrainer",
    "StepFunctions",
    "StepRecord",
    "TrainConfig",
    "TrainState",
    "make_mesh",
]

# float32 matmuls everywhere: distributed runs are compared with the reference at 1e-5.
MATMUL_PRECISION = "highest"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """What to train for how long, on which batches.

    Attributes:
        steps: number of optimizer steps.
        global_batch: sequences per step, summed over all islands.
        seq_len: tokens per sequence (inputs; each example holds seq_len + 1 tokens).
        seed: seeds both the parameter initialisation and the data order.
    """

    steps: int = 100
    global_batch: int = 8
    seq_len: int = 64
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("steps", "global_batch", "seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"train.{name}={value!r} must be a positive integer.")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"train.seed={self.seed!r} must be a non-negative integer.")


@dataclasses.dataclass(frozen=True)
class CompiledStep:
    """Both halves of a step compiled for one batch shape: `grad(params, batch)` returns
    (loss, metrics, grads); `apply(params, opt_state, grads)` returns (params, opt_state) and
    donates its first two arguments."""

    grad: Any
    apply: Any

    def memory_analyses(self) -> tuple[Any, Any]:
        """XLA's memory analysis of the grad and the apply program."""
        return self.grad.memory_analysis(), self.apply.memory_analysis()


@dataclasses.dataclass
class TrainState:
    """Parameters and optimizer state, resident on the mesh; `step` counts applied updates."""

    params: Any
    opt_state: Any
    step: int = 0


class StepFunctions:
    """The compiled pieces of one training step for a model, optimizer and mesh.

    Args:
        model_cfg: the model.
        optim_cfg: the optimizer.
        mesh: the devices; None means one device, no sharding.
    """

    def __init__(self, model_cfg: PalmConfig, optim_cfg: OptimConfig, mesh: Mesh | None = None):
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.mesh = mesh if mesh is not None else make_mesh(1, 1)
        self.tx = make_optimizer(optim_cfg)

        abstract = nnx.eval_shape(lambda: Palm(model_cfg, rngs=nnx.Rngs(0)))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.param_shardings = state_shardings(abstract_params, self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        self.opt_shardings = tree_shardings_like_params(abstract_opt, abstract_params, self.mesh)
        self.batch_sharding = NamedSharding(self.mesh, logical_to_spec(("batch", None)))
        self.replicated = NamedSharding(self.mesh, PartitionSpec())

        self._init = jax.jit(
            self._init_impl,
            static_argnums=0,
            out_shardings=(self.param_shardings, self.opt_shardings),
        )
        self._grad = jax.jit(
            self._grad_impl,
            in_shardings=(self.param_shardings, self.batch_sharding),
            out_shardings=(self.replicated, self.replicated, self.param_shardings),
        )
        self._apply = jax.jit(
            self._apply_impl,
            in_shardings=(self.param_shardings, self.opt_shardings, self.param_shardings),
            out_shardings=(self.param_shardings, self.opt_shardings),
            donate_argnums=(0, 1),
        )

    # -- pure functions (traced under jit) ---------------------------------------------------

    def _init_impl(self, seed: int):
        model = Palm(self.model_cfg, rngs=nnx.Rngs(seed))
        _, params = nnx.split(model, nnx.Param)
        return params, self.tx.init(params)

    def _loss(self, params, tokens_bt1):
        model = nnx.merge(self.graphdef, params)
        inputs_bt, targets_bt = tokens_bt1[:, :-1], tokens_bt1[:, 1:]
        logits_btv = model(inputs_bt)
        loss, metrics = lm_loss(logits_btv, targets_bt, z_loss=self.model_cfg.z_loss)
        return loss, metrics

    def _grad_impl(self, params, tokens_bt1):
        with jax.default_matmul_precision(MATMUL_PRECISION):
            (loss, metrics), grads = jax.value_and_grad(self._loss, has_aux=True)(
                params, tokens_bt1
            )
        return loss, metrics, grads

    def _apply_impl(self, params, opt_state, grads):
        with jax.default_matmul_precision(MATMUL_PRECISION):
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    # -- the public step API -----------------------------------------------------------------

    def init(self, seed: int) -> TrainState:
        """Fresh parameters and optimizer state, placed on the mesh by the logical rules."""
        with jax.set_mesh(self.mesh):
            params, opt_state = self._init(seed)
        return TrainState(params=params, opt_state=opt_state, step=0)

    def compile(self, batch_size: int, seq_len: int) -> CompiledStep:
        """Lower and compile both halves ahead of time for (batch_size, seq_len + 1) batches.

        Works on abstract shapes only: nothing is allocated, so a dry run can read the
        compiled programs' memory analysis before any parameter exists.
        """
        params_abs, opt_abs = jax.eval_shape(lambda: self._init_impl(0))
        batch_abs = jax.ShapeDtypeStruct((batch_size, seq_len + 1), np.int32)
        with jax.set_mesh(self.mesh):
            grad = self._grad.lower(params_abs, batch_abs).compile()
            _, _, grads_abs = jax.eval_shape(self._grad_impl, params_abs, batch_abs)
            apply = self._apply.lower(params_abs, opt_abs, grads_abs).compile()
        return CompiledStep(grad=grad, apply=apply)

    def state_bytes_per_device(self) -> tuple[int, int]:
        """(parameter bytes, optimizer-state bytes) one device of the mesh holds, from the
        abstract state and its shardings (the largest shard of each array)."""
        params_abs, opt_abs = jax.eval_shape(lambda: self._init_impl(0))

        def per_device(tree: Any, shardings: Any) -> int:
            total = 0
            for leaf, sharding in zip(
                jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True
            ):
                shard = sharding.shard_shape(leaf.shape)
                total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
            return total

        return (
            per_device(params_abs, self.param_shardings),
            per_device(opt_abs, self.opt_shardings),
        )

    def place_batch(self, tokens_bt1: np.ndarray) -> jax.Array:
        """Put a (B, T + 1) int32 batch on the mesh, split over `data`."""
        return jax.device_put(np.asarray(tokens_bt1, dtype=np.int32), self.batch_sharding)

    def grad_fn(self, state: TrainState, tokens_bt1) -> tuple[jax.Array, dict, Any]:
        """Loss, metrics and gradients of the mean loss over the given slice of the batch."""
        with jax.set_mesh(self.mesh):  # activates the model's logical activation constraints
            return self._grad(state.params, tokens_bt1)

    def apply_fn(self, state: TrainState, grads) -> TrainState:
        """Clip and apply one optimizer update; returns the new state (the old is donated)."""
        with jax.set_mesh(self.mesh):
            params, opt_state = self._apply(state.params, state.opt_state, grads)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1)

    def train_step(self, state: TrainState, tokens_bt1) -> tuple[TrainState, float]:
        """One whole step on the whole batch: gradients then the update."""
        loss, _, grads = self.grad_fn(state, self.place_batch(tokens_bt1))
        return self.apply_fn(state, grads), float(loss)

    def model(self, state: TrainState) -> Palm:
        """The model object over the current parameters (for sampling)."""
        return nnx.merge(self.graphdef, state.params)


@dataclasses.dataclass
class StepRecord:
    """What one reference step produced."""

    step: int
    loss: float
    seconds: float
    tokens: int


class ReferenceTrainer:
    """The reference run: one process, the whole global batch per step, optionally on a mesh.

    Example:
        trainer = ReferenceTrainer(PalmConfig.palm_tiny(), OptimConfig(), TrainConfig(steps=5))
        for record in trainer.run(lambda step: dataset.global_batch(step, 8, 0)[0]):
            print(record.step, record.loss)
    """

    def __init__(
        self,
        model_cfg: PalmConfig,
        optim_cfg: OptimConfig,
        train_cfg: TrainConfig,
        *,
        mesh: Mesh | None = None,
    ):
        self.train_cfg = train_cfg
        self.fns = StepFunctions(model_cfg, optim_cfg, mesh)
        self.state = self.fns.init(train_cfg.seed)

    def run(self, batches: Callable[[int], np.ndarray]) -> Iterator[StepRecord]:
        """Train up to `train_cfg.steps`, yielding one record per step (progress is live).

        Args:
            batches: maps a step number to that step's global batch, (B, T + 1) int32.

        Raises:
            FloatingPointError: the loss became NaN or infinite.
        """
        cfg = self.train_cfg
        expected = (cfg.global_batch, cfg.seq_len + 1)
        for step in range(self.state.step, cfg.steps):
            tokens = batches(step)
            if tokens.shape != expected:
                raise ValueError(
                    f"batch for step {step} has shape {tokens.shape}, expected {expected}."
                )
            start = time.perf_counter()
            self.state, loss = self.fns.train_step(self.state, tokens)
            elapsed = time.perf_counter() - start
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}.")
            yield StepRecord(
                step=step, loss=loss, seconds=elapsed, tokens=cfg.global_batch * cfg.seq_len
            )

    def losses(self, batches: Callable[[int], np.ndarray]) -> list[float]:
        """Run to the end and return the per-step losses."""
        return [record.loss for record in self.run(batches)]
