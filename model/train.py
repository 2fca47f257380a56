"""The single-process reference trainer: the step functions every distributed run must match.

The training step is split in two so that the island runtime can exchange gradients between
islands in the middle (PaLM's two-pod data parallelism): `grad_fn` computes the loss and the
gradients of one slice of the global batch, `apply_fn` clips and applies the optimizer update.
The reference trainer composes both on the whole global batch, optionally on a mesh of local
devices with the model's logical-axis rules; the island runtime uses the very same functions.

Masked steps (mixtures, span corruption, text-to-text; `num_sources > 0`): the batch is a dict
of tokens, loss weights, row sources and, for text-to-text packing, segment ids; `grad_fn`
returns the *summed* loss, a stats vector (`model.loss.masked_loss_sums`: loss sum, target
count, per-source sums and counts) and the gradients of the sum. Whoever holds the global
(sum, count) divides: `apply_fn(state, grads, 1 / count)`. Islands add their (sum, count)
pairs (never means), so any split of the batch gives the reference's loss.
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
from .loss import lm_loss, masked_loss_sums
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

    def __init__(
        self,
        model_cfg: PalmConfig,
        optim_cfg: OptimConfig,
        mesh: Mesh | None = None,
        *,
        num_sources: int = 0,
        segmented: bool = False,
    ):
        self.num_sources = num_sources
        self.segmented = segmented
        self.masked = num_sources > 0
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
        if self.masked:
            rows = NamedSharding(self.mesh, logical_to_spec(("batch",)))
            batch_in: Any = {
                "tokens": self.batch_sharding,
                "weights": self.batch_sharding,
                "sources": rows,
            }
            if segmented:
                batch_in["segments"] = self.batch_sharding
            self.batch_sharding_tree = batch_in
            apply_in = (
                self.param_shardings,
                self.opt_shardings,
                self.param_shardings,
                self.replicated,
            )
        else:
            self.batch_sharding_tree = self.batch_sharding
            apply_in = (self.param_shardings, self.opt_shardings, self.param_shardings)

        self._init = jax.jit(
            self._init_impl,
            static_argnums=0,
            out_shardings=(self.param_shardings, self.opt_shardings),
        )
        self._grad = jax.jit(
            self._grad_impl,
            in_shardings=(self.param_shardings, self.batch_sharding_tree),
            out_shardings=(self.replicated, self.replicated, self.param_shardings),
        )
        self._apply = jax.jit(
            self._apply_scaled_impl if self.masked else self._apply_impl,
            in_shardings=apply_in,
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
        if self.masked:
            batch = tokens_bt1
            tokens = batch["tokens"]
            logits_btv = model(tokens[:, :-1], batch.get("segments"))
            return masked_loss_sums(
                logits_btv,
                tokens[:, 1:],
                batch["weights"],
                batch["sources"],
                self.num_sources,
                z_loss=self.model_cfg.z_loss,
            )
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

    def _apply_scaled_impl(self, params, opt_state, grads, scale):
        # Gradients of the summed loss times 1 / (global target count): of the mean loss.
        grads = jax.tree.map(lambda g: g * scale.astype(g.dtype), grads)
        return self._apply_impl(params, opt_state, grads)

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
        batch_abs = self.batch_shape(batch_size, seq_len)
        with jax.set_mesh(self.mesh):
            grad = self._grad.lower(params_abs, batch_abs).compile()
            _, _, grads_abs = jax.eval_shape(self._grad_impl, params_abs, batch_abs)
            scale = (jax.ShapeDtypeStruct((), np.float32),) if self.masked else ()
            apply = self._apply.lower(params_abs, opt_abs, grads_abs, *scale).compile()
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

    def batch_shape(self, batch_size: int, seq_len: int) -> Any:
        """The abstract batch: (B, T + 1) int32 tokens, or the masked step's dict."""
        tokens = jax.ShapeDtypeStruct((batch_size, seq_len + 1), np.int32)
        if not self.masked:
            return tokens
        out = {
            "tokens": tokens,
            "weights": jax.ShapeDtypeStruct((batch_size, seq_len), np.float32),
            "sources": jax.ShapeDtypeStruct((batch_size,), np.int32),
        }
        if self.segmented:
            out["segments"] = jax.ShapeDtypeStruct((batch_size, seq_len), np.int32)
        return out

    def batch_arrays(self, batch: Any) -> Any:
        """A host batch as the arrays the step takes: tokens, or (masked) the dict of
        `model.mixture.Batch`'s tokens, weights, sources and segments."""
        if not self.masked:
            return np.asarray(batch, dtype=np.int32)
        out = {
            "tokens": np.asarray(batch.tokens, np.int32),
            "weights": np.asarray(batch.weights, np.float32),
            "sources": np.asarray(batch.sources, np.int32),
        }
        if self.segmented:
            out["segments"] = np.asarray(batch.segments, np.int32)
        return out

    def place_batch(self, tokens_bt1: Any) -> Any:
        """Put a batch on the mesh, split over `data`: (B, T + 1) int32 tokens, or a
        `model.mixture.Batch` for a masked step."""
        return jax.device_put(self.batch_arrays(tokens_bt1), self.batch_sharding_tree)

    def grad_fn(self, state: TrainState, tokens_bt1) -> tuple[jax.Array, Any, Any]:
        """Loss, metrics and gradients of the mean loss over the given slice of the batch
        (masked: the summed loss, the stats vector and the gradients of the sum)."""
        with jax.set_mesh(self.mesh):  # activates the model's logical activation constraints
            return self._grad(state.params, tokens_bt1)

    def apply_fn(self, state: TrainState, grads, scale: float | None = None) -> TrainState:
        """Clip and apply one optimizer update; returns the new state (the old is donated).
        A masked step's gradients are of the summed loss: `scale` is 1 / the global count."""
        with jax.set_mesh(self.mesh):
            extra = (np.float32(scale),) if self.masked else ()
            params, opt_state = self._apply(state.params, state.opt_state, grads, *extra)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1)

    def train_step(self, state: TrainState, tokens_bt1) -> tuple[TrainState, float]:
        """One whole step on the whole batch: gradients then the update."""
        state, loss, _ = self.train_step_stats(state, tokens_bt1)
        return state, loss

    def train_step_stats(
        self, state: TrainState, batch: Any
    ) -> tuple[TrainState, float, np.ndarray | None]:
        """`train_step`, also returning a masked step's global stats vector."""
        loss, stats, grads = self.grad_fn(state, self.place_batch(batch))
        if not self.masked:
            return self.apply_fn(state, grads), float(loss), None
        stats = np.asarray(stats)
        count = max(float(stats[1]), 1.0)
        return self.apply_fn(state, grads, 1.0 / count), float(stats[0]) / count, stats

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
    stats: np.ndarray | None = None


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
        num_sources: int = 0,
        segmented: bool = False,
    ):
        self.train_cfg = train_cfg
        self.fns = StepFunctions(
            model_cfg, optim_cfg, mesh, num_sources=num_sources, segmented=segmented
        )
        self.state = self.fns.init(train_cfg.seed)

    def run(self, batches: Callable[[int], np.ndarray]) -> Iterator[StepRecord]:
        """Train up to `train_cfg.steps`, yielding one record per step (progress is live).

        Args:
            batches: maps a step number to that step's global batch, (B, T + 1) int32, or
                a `model.mixture.Batch` for a masked trainer (`num_sources > 0`).

        Raises:
            FloatingPointError: the loss became NaN or infinite.
        """
        cfg = self.train_cfg
        expected = (cfg.global_batch, cfg.seq_len + 1)
        for step in range(self.state.step, cfg.steps):
            batch = batches(step)
            tokens = batch.tokens if self.fns.masked else batch
            if tokens.shape != expected:
                raise ValueError(
                    f"batch for step {step} has shape {tokens.shape}, expected {expected}."
                )
            start = time.perf_counter()
            self.state, loss, stats = self.fns.train_step_stats(self.state, batch)
            elapsed = time.perf_counter() - start
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss became {loss} at step {step}.")
            yield StepRecord(
                step=step,
                loss=loss,
                seconds=elapsed,
                tokens=cfg.global_batch * cfg.seq_len,
                stats=stats,
            )

    def losses(self, batches: Callable[[int], np.ndarray]) -> list[float]:
        """Run to the end and return the per-step losses."""
        return [record.loss for record in self.run(batches)]
