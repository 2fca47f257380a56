"""The gradient exchange overlapped with the backward pass: buckets leave as they are ready.

The gradient program is the step's own loss and `jax.value_and_grad`, with one change: the
parameters go into the loss through an identity (`jax.custom_vjp`) per bucket of leaves,
whose backward rule hands the bucket's finished gradients to the host (a host callback) and
returns them unchanged. Reverse-mode differentiation reaches that rule once every use of
the bucket's parameters has been differentiated, so the buckets leave in the order the
backward pass finishes them: the last layers first, the tied embedding (used first and
last) at the very end. The callback copies the bucket into its reused staging vector and
starts the bucket's reduce-scatter/all-gather on the service's loop (workers/exchange.py)
and returns: the exchange runs while XLA carries on with the earlier layers. The update
program waits for every bucket.

Why this mechanism and not one backward program per layer group dispatched asynchronously
(bench/overlap_mechanisms.py measures both on CPU, README has the figures): the callbacks
keep the step one compiled program, the very computation of the reference step (no split
forward with stored residuals, no per-layer dispatch), at no measurable cost, and their
first bucket reaches the host as early as a per-layer program's.

What stays bitwise identical: the same leaves in the same buckets on every island (the
plan depends only on the parameter tree and the bucket size, which the job's islands load
alike), and each element's mean is the island-order float32 sum of exchange.py, so the
bytes equal those of one whole-vector exchange. A failed bucket (a dead peer, an abort, a
deadline) fails the step before the update runs: nothing is half applied.

Used for single-process islands; a multi-host island (whose callback would run on one
process only) and a mixture step (whose loss statistics ride with the gradients) exchange
after the backward pass, as before.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import hashlib
import logging
import re
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .exchange import DEFAULT_TIMEOUT_S, RESULT_MARGIN_S, ExchangeError

logger = logging.getLogger(__name__)

_BLOCK = re.compile(r"\['blocks'\]\[(\d+)\]")

_TAP: Any = None

# Compiled tapped programs of this process, by (lowered program text, devices): XLA never
# writes a program with host callbacks to JAX's persistent compilation cache, so without this
# every load of an overlapped job compiles afresh (tens of seconds for palm-small on a loaded
# core); a second job of the same shapes on the same devices, or the same job loaded again,
# reuses the executable here. Each entry: (executable, its `_Router`).
_PROGRAMS_MAX = 8
_programs: collections.OrderedDict[tuple, tuple[Any, _Router]] = collections.OrderedDict()
_programs_lock = threading.Lock()
_compiling: dict[tuple, threading.Lock] = {}


class _Router:
    """Where a compiled tapped program's callbacks go: the `OverlappedGrad` whose step runs
    it. The jobs sharing one executable (one host's runtime thread steps one job at a time)
    take `lock` for a whole step."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.target: OverlappedGrad | None = None

    def sink(self, bucket: int, *grads: np.ndarray) -> None:
        target = self.target
        if target is not None:
            target._sink(bucket, *grads)


def _tap_primitive() -> Any:
    """`gradient_tap(*arrays, sink=f)`: calls f with the arrays as numpy views of XLA's buffers,
    from inside the compiled program.

    Like `io_callback` without its `device_put` of the operands: that copy waits for the CPU
    device, which is busy running the very program that waits for the callback -- a deadlock
    with one XLA CPU thread (seen in bench/dp_scaling.py's pinned hosts). The lowering is
    io_callback's (`emit_python_callback`, unordered IO effect, not DCE'd).
    """
    global _TAP
    if _TAP is not None:
        return _TAP
    from jax._src import callback as jcallback
    from jax._src.interpreters import mlir
    from jax.extend.core import Primitive

    tap = Primitive("gradient_tap")
    tap.multiple_results = True

    def abstract_eval(*avals, sink):
        del avals, sink
        return [], {jcallback._IOEffect}

    def lowering(ctx, *args, sink):
        def call(*flat):
            sink(*flat)
            return ()

        sharding = jcallback._callback_op_sharding(
            ctx.module_context.axis_context, None, ctx.avals_out
        )
        jcallback.emit_python_callback(
            ctx,
            call,
            None,
            list(args),
            ctx.avals_in,
            [],
            has_side_effect=True,
            returns_token=False,
            sharding=sharding,
        )
        return []

    tap.def_effectful_abstract_eval(abstract_eval)
    mlir.register_lowering(tap, lowering, cacheable=False)
    _TAP = tap
    return tap


def backward_rank(path: str, n_blocks: int) -> int:
    """When the backward pass finishes a parameter's gradient, as a rank (smaller = sooner):
    the output side (final norm) first, then the blocks from the last, the embedding (tied:
    used by the first and the last layer) last."""
    match = _BLOCK.search(path)
    if match:
        return 1 + (n_blocks - 1 - int(match.group(1)))
    if "embed" in path:
        return n_blocks + 1
    return 0


def bucket_plan(paths: Sequence[str], sizes: Sequence[int], bucket_bytes: int) -> list[list[int]]:
    """Leaf indices per bucket, in the order the backward pass finishes them: leaves sorted
    by `backward_rank` (then tree order), cut whenever a bucket reaches `bucket_bytes` of
    float32 values, and at the embedding, which is only ready at the end.

    Raises:
        ValueError: bucket_bytes is not positive.
    """
    if bucket_bytes <= 0:
        raise ValueError(f"exchange_bucket_bytes={bucket_bytes} must be positive.")
    blocks = {int(m.group(1)) for p in paths if (m := _BLOCK.search(p))}
    n_blocks = max(blocks) + 1 if blocks else 0
    order = sorted(range(len(paths)), key=lambda i: (backward_rank(paths[i], n_blocks), i))
    last = n_blocks + 1
    buckets: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i in order:
        if (
            current
            and backward_rank(paths[i], n_blocks) == last
            and not any(backward_rank(paths[j], n_blocks) == last for j in current)
        ):
            buckets.append(current)
            current, filled = [], 0
        current.append(i)
        filled += 4 * sizes[i]
        if filled >= bucket_bytes:
            buckets.append(current)
            current, filled = [], 0
    if current:
        buckets.append(current)
    return buckets


def param_bucket_sizes(model_cfg: Any, bucket_bytes: int) -> list[int]:
    """Values per bucket of a model's parameters (what each bucket's exchange carries)."""
    import jax
    from flax import nnx

    from pathways_lite.model.palm import Palm

    abstract = nnx.eval_shape(lambda: Palm(model_cfg, rngs=nnx.Rngs(0)))
    _, params = nnx.split(abstract, nnx.Param)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    sizes = [int(np.prod(leaf.shape, dtype=np.int64)) for _, leaf in flat]
    paths = [jax.tree_util.keystr(p) for p, _ in flat]
    return [sum(sizes[i] for i in b) for b in bucket_plan(paths, sizes, bucket_bytes)]


@dataclasses.dataclass
class OverlapTimes:
    """One overlapped step's host timings (perf_counter seconds)."""

    backward_s: float  # the gradient program, callbacks included
    exposed_s: float  # waiting for buckets after the backward pass (exchange not hidden)
    first_bucket_at_s: float  # when the first bucket left, from the program's start


class OverlappedGrad:
    """The tapped gradient program of a StepFunctions and the per-step bucket exchange.

    Args:
        fns: the job's `StepFunctions` (model, loss, shardings).
        batch_size, seq_len: the island's batch shape.
        bucket_bytes: the bucket size.
    """

    def __init__(self, fns: Any, batch_size: int, seq_len: int, bucket_bytes: int) -> None:
        import jax

        self.fns = fns
        params_abs, _ = jax.eval_shape(lambda: fns._init_impl(0))
        flat = jax.tree_util.tree_flatten_with_path(params_abs)[0]
        self.treedef = jax.tree_util.tree_structure(params_abs)
        paths = [jax.tree_util.keystr(p) for p, _ in flat]
        self.shapes = [tuple(leaf.shape) for _, leaf in flat]
        self.dtypes = [leaf.dtype for _, leaf in flat]
        self.shardings = jax.tree_util.tree_leaves(fns.param_shardings)
        sizes = [int(np.prod(s, dtype=np.int64)) for s in self.shapes]
        self.buckets = bucket_plan(paths, sizes, bucket_bytes)
        self.bucket_sizes = [sum(sizes[i] for i in b) for b in self.buckets]
        self.gradient_bytes = 4 * sum(sizes)
        # Reused staging vectors (one per bucket): the callback's one copy.
        self._staging = [np.empty(n, np.float32) for n in self.bucket_sizes]
        self._lock = threading.Lock()
        self._exchange: Any = None
        self._step = -1
        self._futures: list[concurrent.futures.Future | None] = []
        self._started = 0.0
        self._first_at = 0.0
        self.exec, self._router = self._compile(batch_size, seq_len)

    # ---- the program ---------------------------------------------------------------------

    def _tap(self, bucket: int, router: _Router) -> Any:
        import jax

        primitive = _tap_primitive()

        @jax.custom_vjp
        def ident(leaves):
            return leaves

        def fwd(leaves):
            return leaves, None

        def bwd(_, grads):
            primitive.bind(*grads, sink=functools.partial(router.sink, bucket))
            return (grads,)

        ident.defvjp(fwd, bwd)
        return ident

    def _compile(self, batch_size: int, seq_len: int) -> tuple[Any, _Router]:
        """The tapped program's executable and router: this process's compiled one when
        the lowered program and devices are the same (`_programs`), else compiled now."""
        import jax

        from pathways_lite.model.train import MATMUL_PRECISION

        fns = self.fns
        router = _Router()
        taps = [self._tap(b, router) for b in range(len(self.buckets))]

        def tapped_loss(params, batch):
            leaves = list(jax.tree_util.tree_leaves(params))
            for tap, bucket in zip(taps, self.buckets, strict=True):
                out = tap(tuple(leaves[i] for i in bucket))
                for i, leaf in zip(bucket, out, strict=True):
                    leaves[i] = leaf
            return fns._loss(jax.tree_util.tree_unflatten(self.treedef, leaves), batch)

        def grad_impl(params, batch):
            with jax.default_matmul_precision(MATMUL_PRECISION):
                (loss, _), _ = jax.value_and_grad(tapped_loss, has_aux=True)(params, batch)
            return loss

        program = jax.jit(
            grad_impl,
            in_shardings=(fns.param_shardings, fns.batch_sharding_tree),
            out_shardings=fns.replicated,
        )
        params_abs, _ = jax.eval_shape(lambda: fns._init_impl(0))
        with jax.set_mesh(fns.mesh):
            lowered = program.lower(params_abs, fns.batch_shape(batch_size, seq_len))
        # The callbacks are referred to by index in the program text: equal texts on equal
        # devices are the same program, whichever router their callbacks were bound to.
        devices = tuple(int(d.id) for d in np.asarray(fns.mesh.devices).reshape(-1))
        text = hashlib.sha256(lowered.as_text().encode()).hexdigest()
        key = (text, devices, tuple(fns.mesh.axis_names))
        with _programs_lock:
            gate = _compiling.setdefault(key, threading.Lock())
        with gate:  # one compile of a program at a time: a second load waits for it
            with _programs_lock:
                hit = _programs.get(key)
                if hit is not None:
                    _programs.move_to_end(key)
                    _compiling.pop(key, None)
                    logger.info("tapped gradient program reused (compiled in this process)")
                    return hit
            with jax.set_mesh(fns.mesh):
                executable = lowered.compile()
            with _programs_lock:
                _programs[key] = (executable, router)
                while len(_programs) > _PROGRAMS_MAX:
                    _programs.popitem(last=False)
                _compiling.pop(key, None)
        return executable, router

    def compiled_step(self) -> Any:
        """A `CompiledStep` of this gradient program (it returns the loss only: the
        gradients leave through the callbacks) and the step's compiled update."""
        import jax

        from pathways_lite.model.train import CompiledStep

        params_abs, opt_abs = jax.eval_shape(lambda: self.fns._init_impl(0))
        with jax.set_mesh(self.fns.mesh):
            apply = self.fns._apply.lower(params_abs, opt_abs, params_abs).compile()
        return CompiledStep(grad=self.exec, apply=apply)

    # ---- the callback (on XLA's thread) --------------------------------------------------

    def _sink(self, bucket: int, *grads: np.ndarray) -> None:
        now = time.perf_counter()
        staging = self._staging[bucket]
        offset = 0
        for g in grads:
            g = np.asarray(g)
            staging[offset : offset + g.size] = g.reshape(-1)
            offset += g.size
        with self._lock:
            exchange, step = self._exchange, self._step
            if not self._first_at:
                self._first_at = now
        future: concurrent.futures.Future
        try:
            exchange.count(copied=4 * offset)
            future = exchange.start_allreduce(step, bucket, staging)
        except Exception as e:  # never raise into XLA: the step fails when it waits
            future = concurrent.futures.Future()
            future.set_exception(e)
        self._futures[bucket] = future

    # ---- one step ------------------------------------------------------------------------

    def step(
        self, params: Any, batch: Any, step: int, exchange: Any
    ) -> tuple[Any, Any, OverlapTimes]:
        """Run the gradient program with its buckets exchanged as they come.

        Returns:
            (loss, the islands' mean gradients on the mesh, the step's timings).

        Raises:
            ExchangeError: a bucket failed; every other bucket of the step is cancelled and
                nothing is returned to update with.
        """
        with self._router.lock:
            self._router.target = self
            try:
                return self._step_routed(params, batch, step, exchange)
            finally:
                self._router.target = None

    def _step_routed(
        self, params: Any, batch: Any, step: int, exchange: Any
    ) -> tuple[Any, Any, OverlapTimes]:
        import jax

        with self._lock:
            self._exchange, self._step = exchange, step
            self._first_at = 0.0
        self._futures = [None] * len(self.buckets)
        exchange.reset_counters()
        started = time.perf_counter()
        loss = self.exec(params, batch)
        jax.block_until_ready(loss)
        t_backward = time.perf_counter()
        wait_s = getattr(exchange, "timeout_s", DEFAULT_TIMEOUT_S) + RESULT_MARGIN_S
        try:
            reduced = []
            for bucket, future in enumerate(self._futures):
                if future is None:
                    raise ExchangeError(
                        f"bucket {bucket} of step {step} never left the backward pass."
                    )
                # (the exchange's own deadline ends it; this one, if the loop died)
                reduced.append(future.result(wait_s))
        except BaseException:
            for future in self._futures:
                if future is not None:
                    future.cancel()
            raise
        t_done = time.perf_counter()
        leaves: list[Any] = [None] * len(self.shapes)
        for bucket, values in zip(self.buckets, reduced, strict=True):
            offset = 0
            for i in bucket:
                size = int(np.prod(self.shapes[i], dtype=np.int64))
                piece = values[offset : offset + size].reshape(self.shapes[i])
                leaves[i] = jax.device_put(
                    piece.astype(self.dtypes[i], copy=False), self.shardings[i]
                )
                offset += size
        exchange.count(copied=self.gradient_bytes)
        grads = jax.tree_util.tree_unflatten(self.treedef, leaves)
        return (
            loss,
            grads,
            OverlapTimes(
                backward_s=t_backward - started,
                exposed_s=t_done - t_backward,
                first_bucket_at_s=(self._first_at - started) if self._first_at else 0.0,
            ),
        )
