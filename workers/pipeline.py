"""The runtime of one pipeline stage on an island host: a microbatch schedule per step.

A pipeline job's island holds one stage (model/pipeline.py has the split and the math) of one
replica. One step (one step of the controller's slice, like any job's) on this island:

1. run the stage's schedule (`schedule_order`: GPipe or 1F1B) over the replica's batch cut
   into M microbatches: a forward takes its input from the previous stage (stage 0: the
   tokens), sends its output to the next; a backward takes the output's gradient from the
   next stage (the last stage computes its loss and gradients as soon as the activation
   arrives), runs from the residuals its forward stashed, and sends the input's gradient
   to the previous stage (workers/stage_link.py: host to host, never the controller);
2. sum the microbatch gradients in microbatch order and divide by M; the first and last
   stage swap their embedding gradients and both add `first + last` (bitwise the same);
3. the replicas of this stage average the gradients (workers/exchange.py, island order),
   the last stage's loss riding at the end of the vector;
4. every stage sends every other (sum of squares, loss); each adds the squares in stage
   order: the same global norm everywhere, by which `apply` clips as the reference does.

Parameters stay bitwise identical across the replicas of a stage (digest-checked as a data
parallel job's), and the embedding's two copies stay bitwise equal to each other.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from .palm_runtime import PalmRuntime, _Resident
from .runtime import (
    IslandJobSpec,
    JobSpecError,
    MemoryReport,
    StepResult,
    fetch_global,
    memory_report,
)
from .stage_link import PHASE_ACT, PHASE_EMBED, PHASE_GRAD, PHASE_SCALARS, StageLink

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PipelinePlacement:
    """The decoded LoadJobRequest.pipeline: where this island sits in the pipeline."""

    stages: int
    microbatches: int
    schedule: str
    stage: int
    stage_peers: tuple[str, ...]
    bounds: tuple[tuple[int, int], ...]
    recompute: bool = False


def decode_placement(request: Any) -> PipelinePlacement | None:
    """The StagePlacement of a LoadJobRequest, checked; None when the job is not pipelined.

    Raises:
        JobSpecError: a field out of range (the message names it).
    """
    if not request.HasField("pipeline"):
        return None
    p = request.pipeline
    from pathways_lite.model.pipeline import SCHEDULES

    if p.stages < 2:
        raise JobSpecError(f"pipeline.stages={p.stages} must be at least 2.")
    if p.stage >= p.stages:
        raise JobSpecError(f"pipeline.stage={p.stage} is out of range for stages={p.stages}.")
    if p.microbatches < 1:
        raise JobSpecError(f"pipeline.microbatches={p.microbatches} must be at least 1.")
    if p.schedule not in SCHEDULES:
        raise JobSpecError(f"pipeline.schedule={p.schedule!r} is not one of {SCHEDULES}.")
    if len(p.stage_peers) not in (0, p.stages):
        raise JobSpecError(
            f"pipeline.stage_peers has {len(p.stage_peers)} addresses for stages={p.stages}."
        )
    flat = list(p.block_bounds)
    if len(flat) != 2 * p.stages:
        raise JobSpecError(
            f"pipeline.block_bounds has {len(flat)} values; stages={p.stages} needs {2 * p.stages}."
        )
    # Contiguous non-empty ranges from block 0 (overlapping ones trained another model).
    bounds = decode_stage_bounds("pipeline.block_bounds", flat)
    return PipelinePlacement(
        p.stages, p.microbatches, p.schedule, p.stage, tuple(p.stage_peers), bounds, p.recompute
    )


def decode_stage_bounds(field: str, flat: Sequence[int]) -> tuple[tuple[int, int], ...]:
    """LoadJobRequest's restore_stage_bounds / init_stage_bounds as (lo, hi) pairs, checked:
    contiguous non-empty ranges from block 0, at least two.

    Raises:
        JobSpecError: a malformed list (the message names the field and its values).
    """
    flat = [int(b) for b in flat]
    if not flat:
        return ()
    pairs = tuple(zip(flat[0::2], flat[1::2], strict=False))
    ok = len(flat) % 2 == 0 and len(pairs) >= 2 and pairs[0][0] == 0
    ok = ok and all(lo < hi for lo, hi in pairs)
    ok = ok and all(a[1] == b[0] for a, b in zip(pairs, pairs[1:], strict=False))
    if not ok:
        raise JobSpecError(
            f"{field}={flat} must be (lo, hi) block ranges of at least 2 stages, contiguous "
            "from block 0."
        )
    return pairs


class PipelineRuntime(PalmRuntime):
    """One stage of a pipeline job on an island (`spec.pipeline` is set).

    `spec.num_islands`, `island_index` and `peers` count this stage's replicas: the data
    slice read and the gradient exchange are a data-parallel job's among them.
    """

    def __init__(self, spec: IslandJobSpec, devices: Sequence[Any]) -> None:
        super().__init__(spec, devices)
        p: PipelinePlacement = spec.pipeline
        self.placement = p
        if p.bounds[-1][1] != self.model_cfg.n_layers or p.bounds[0][0] != 0:
            raise JobSpecError(
                f"pipeline.block_bounds={list(p.bounds)} do not cover the model's "
                f"n_layers={self.model_cfg.n_layers} blocks."
            )
        if (spec.island_batch // spec.mesh.data) % p.microbatches or (
            spec.island_batch % (p.microbatches * spec.mesh.data)
        ):
            raise JobSpecError(
                f"global_batch={spec.global_batch} must be divisible by replicas "
                f"({spec.num_islands}) x microbatches ({p.microbatches}) x mesh.data "
                f"({spec.mesh.data})."
            )
        self.link: StageLink | None = None
        self._slices: list[tuple[str, int, int]] = []  # this step's (name, start, end) ns

    @property
    def microbatch(self) -> int:
        return self.spec.island_batch // self.placement.microbatches

    # ---- the worker service's hook -------------------------------------------------------

    def connect_stages(self, mailbox: Any, peers: Any, loop: Any) -> None:
        """Give this stage its links to the other stages (the worker service's LoadJob)."""
        p = self.placement
        if not p.stage_peers:
            raise JobSpecError("pipeline.stage_peers is empty: a stage needs its neighbours.")
        self.link = StageLink(
            loop,
            mailbox,
            peers,
            job_id=self.spec.job_id,
            generation=self.spec.generation,
            replica=self.spec.island_index,
            stage=p.stage,
            addresses=p.stage_peers,
            timeout_s=self.spec.exchange_timeout_s,
        )

    # ---- memory and compile --------------------------------------------------------------

    def _stash_bytes(self, per_microbatch: int | None = None) -> int:
        """Bytes per device of the forwards' residuals the schedule keeps for backward, at
        `per_microbatch` bytes each (default: the estimate, model/estimates.py)."""
        from pathways_lite.model.estimates import stash_bytes_per_microbatch
        from pathways_lite.model.pipeline import peak_stash

        p = self.placement
        if per_microbatch is None:
            lo, hi = p.bounds[p.stage]
            per_microbatch = stash_bytes_per_microbatch(
                self.model_cfg,
                {"data": self.spec.mesh.data, "model": self.spec.mesh.model},
                examples_per_device=self.microbatch // self.spec.mesh.data,
                seq_len=self.spec.seq_len,
                layers=hi - lo,
                recompute=p.recompute,
            )
        peak = peak_stash(p.schedule, p.stage, p.stages, p.microbatches)
        # One microbatch's residuals are the forward's output (bwd's argument): the compiled
        # programs' figures (and the estimate's own activations) already hold them.
        return (peak if p.recompute else max(peak - 1, 0)) * per_microbatch

    def estimate_bytes_per_device(self) -> int:
        """This stage's state (parameters, optimizer, gradients and their sum) plus the
        stashed activations; the compile replaces it by the programs' own figures."""
        from pathways_lite.model.pipeline import StageFunctions, StagePlan

        fns = StageFunctions(
            self.model_cfg,
            self.optim_cfg,
            StagePlan(
                self.placement.stage,
                self.placement.stages,
                self.placement.bounds,
                self.placement.recompute,
            ),
            self._mesh(),
        )
        params, opt = fns.state_bytes_per_device()
        return 3 * params + opt + self._stash_bytes()

    def _mesh(self) -> Any:
        from pathways_lite.model.train import make_mesh

        return make_mesh(self.spec.mesh.data, self.spec.mesh.model, devices=self.devices)

    def compile(self) -> MemoryReport:
        """Compile the stage's programs from abstract shapes; the report is the largest
        program's peak with the optimizer state, the gradient sum and the stash beside it."""
        import jax

        from pathways_lite.model.pipeline import LINK_DTYPE, StageFunctions, StagePlan

        if self._compiled is not None:
            return self._compiled[3]
        self._open_data()
        if self.masked:  # the controller refuses such specs at submit (controller/spec.py)
            raise JobSpecError(
                "a pipeline job trains on plain language-model data (data.objective='lm' on "
                "one text source); its dataset holds sources "
                f"{list(self.dataset.source_names)} (a mixture, a task or another objective)."
            )
        started = time.perf_counter()
        p = self.placement
        fns = StageFunctions(
            self.model_cfg,
            self.optim_cfg,
            StagePlan(p.stage, p.stages, p.bounds, p.recompute),
            self._mesh(),
        )
        params_abs, opt_abs = jax.eval_shape(lambda: fns._init_impl(0))
        b, t = self.microbatch, self.spec.seq_len
        tokens = jax.ShapeDtypeStruct((b, t + 1), np.int32)
        # A stage's output and its gradient are LINK_DTYPE whatever the compute dtype.
        act = jax.ShapeDtypeStruct((b, t, self.model_cfg.d_model), LINK_DTYPE)
        per_microbatch = 0  # the last stage stashes nothing (its forward and backward are one)
        with jax.set_mesh(fns.mesh):
            if p.stage == p.stages - 1:
                programs = [fns.fwdbwd.lower(params_abs, act, tokens).compile()]
            else:
                x_in = tokens if p.stage == 0 else act
                fwd = fns.fwd.lower(params_abs, x_in).compile()
                residuals = [
                    jax.ShapeDtypeStruct(r.shape, r.dtype, sharding=sharding)
                    for r, sharding in zip(
                        jax.tree.leaves(fwd.out_info[1]), fwd.output_shardings[1], strict=True
                    )
                ]
                placed = jax.tree.map(
                    lambda a, sharding: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                    params_abs,
                    fns.param_shardings,
                )
                g = jax.ShapeDtypeStruct(act.shape, act.dtype, sharding=fns.act_sharding)
                programs = [fwd, fns.bwd.lower(placed, residuals, g).compile()]
                per_microbatch = sum(
                    math.prod(r.sharding.shard_shape(r.shape)) * r.dtype.itemsize for r in residuals
                )
            g_norm = jax.ShapeDtypeStruct((), np.float32)
            apply = fns.apply.lower(params_abs, opt_abs, params_abs, g_norm).compile()
        param_bytes, opt_bytes = fns.state_bytes_per_device()
        # + the gradient sum and the residuals stashed
        beside = opt_bytes + param_bytes + self._stash_bytes(per_microbatch)
        report = max(
            [dataclasses.replace(memory_report(c), resident_bytes=beside) for c in programs]
            + [memory_report(apply)],
            key=lambda r: r.total_bytes,
        )
        logger.info(
            "job %s stage %d/%d (blocks %s) compiled in %.1f s: %d bytes per device",
            self.spec.job_id,
            p.stage,
            p.stages,
            p.bounds[p.stage],
            time.perf_counter() - started,
            report.total_bytes,
        )
        self._compiled = (fns, None, None, report)
        return report

    def load(self, *, dry_run: bool) -> MemoryReport:
        from pathways_lite.model.train import TrainState

        report = self.compile()
        if dry_run:
            return report
        fns = self._compiled[0]
        self.fns = fns
        params, opt_state = fns.init(self.spec.seed)
        self._resident = _Resident(TrainState(params=params, opt_state=opt_state), None, None)
        return report

    # ---- one step ------------------------------------------------------------------------

    def _place(self, array: np.ndarray, sharding: Any) -> Any:
        import jax

        array = np.ascontiguousarray(array)
        return jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])

    def _mark(self, name: str, start_ns: int) -> None:
        self._slices.append((name, start_ns, time.time_ns()))

    def run_step(self, step: int, weights: Sequence[float] | None = None) -> StepResult:
        link = self.link
        assert link is not None, "connect_stages was not called"
        link.begin(step)
        self._slices = []
        try:
            return self._run_pipeline_step(step, link)
        except BaseException:
            link.abandon()
            raise

    def _run_pipeline_step(self, step: int, link: StageLink) -> StepResult:
        import jax

        from pathways_lite.model.pipeline import schedule_order
        from pathways_lite.model.train import TrainState

        from .exchange import flat_shards, unflatten_shards

        resident = self._loaded()
        fns = self.fns
        p = self.placement
        s, last_stage = p.stage, p.stages - 1
        t0 = time.perf_counter()
        tokens_bt1, ids = self.read_batch(step)
        mbs = np.split(np.asarray(tokens_bt1, np.int32), p.microbatches)
        shape = fns.activation_shape(self.microbatch, self.spec.seq_len)
        params = resident.state.params
        stash: dict[int, Any] = {}
        acc = None
        losses: list[float] = []
        wait_s = 0.0
        stash_bytes = peak_stash_bytes = 0
        t1 = time.perf_counter()
        with jax.set_mesh(fns.mesh):
            for kind, m in schedule_order(p.schedule, s, p.stages, p.microbatches):
                started = time.time_ns()
                if kind in ("F", "FB"):
                    if s == 0:
                        x_in = self._place(mbs[m], fns.tokens_sharding)
                    else:
                        w = time.perf_counter()
                        values = link.receive(s - 1, PHASE_ACT, m, f"activations of microbatch {m}")
                        wait_s += time.perf_counter() - w
                        x_in = self._place(values.reshape(shape), fns.act_sharding)
                if kind == "F":
                    y, stash[m] = fns.fwd(params, x_in)
                    stash_bytes += sum(r.nbytes for r in stash[m])
                    peak_stash_bytes = max(peak_stash_bytes, stash_bytes)
                    link.send(
                        s + 1, PHASE_ACT, m, fetch_global(y), f"activations of microbatch {m}"
                    )
                    self._mark(f"F{m}", started)
                    continue
                if kind == "FB":
                    tokens = self._place(mbs[m], fns.tokens_sharding)
                    loss, grads, g_x = fns.fwdbwd(params, x_in, tokens)
                    losses.append(float(fetch_global(loss)))
                else:  # "B"
                    residuals = stash.pop(m)
                    stash_bytes -= sum(r.nbytes for r in residuals)
                    w = time.perf_counter()
                    values = link.receive(
                        s + 1, PHASE_GRAD, m, f"activation gradients of microbatch {m}"
                    )
                    wait_s += time.perf_counter() - w
                    grads, g_x = fns.bwd(
                        params, residuals, self._place(values.reshape(shape), fns.act_sharding)
                    )
                if s > 0:
                    link.send(
                        s - 1,
                        PHASE_GRAD,
                        m,
                        fetch_global(g_x),
                        f"activation gradients of microbatch {m}",
                    )
                acc = grads if acc is None else fns.add(acc, grads)
                self._mark(f"B{m}", started)
            acc = fns.scale(acc, np.float32(1.0 / p.microbatches))
            t2 = time.perf_counter()
            exchange_start = time.time_ns()
            # The embedding's two contributions: first + last on both (the same bytes).
            if s in (0, last_stage):
                other = last_stage if s == 0 else 0
                leaf = acc["embed"]["embedding"]
                mine = np.asarray(fetch_global(leaf[...]), np.float32)
                link.send(other, PHASE_EMBED, s, mine, "embedding gradients")
                theirs = link.receive(other, PHASE_EMBED, other, "embedding gradients")
                theirs = theirs.reshape(mine.shape)
                first, last = (mine, theirs) if s == 0 else (theirs, mine)
                total = np.add(first, last, dtype=np.float32)
                placed = self._place(total, leaf[...].sharding)
                acc["embed"]["embedding"] = (
                    leaf.replace(placed) if hasattr(leaf, "replace") else placed
                )
            loss_value = float(np.mean(np.asarray(losses, np.float64))) if losses else 0.0
            sent = 0
            if self.exchange is not None:
                flat, layout = flat_shards(acc)
                tail = np.asarray([loss_value], np.float32)
                reduced = self.exchange.allreduce_mean(step, np.concatenate([flat, tail]))
                sent += self.exchange.bytes_sent
                acc = unflatten_shards(reduced[: flat.size], layout, acc)
                loss_value = float(reduced[flat.size])
            # Every stage's (sum of squares, loss) to every other; added in stage order.
            scalars = np.asarray([fns.grads_sumsq(acc), loss_value], np.float32)
            for other in range(p.stages):
                if other != s:
                    link.send(other, PHASE_SCALARS, s, scalars, "step scalars")
            rows = [
                scalars if other == s else link.receive(other, PHASE_SCALARS, other, "step scalars")
                for other in range(p.stages)
            ]
            sumsq = np.float32(0.0)
            for row in rows:
                sumsq = np.float32(sumsq + np.float32(row[0]))
            g_norm = np.sqrt(sumsq, dtype=np.float32)
            loss_value = float(rows[last_stage][1])
            new_params, opt_state = fns.apply(params, resident.state.opt_state, acc, g_norm)
            resident.state = TrainState(
                params=new_params, opt_state=opt_state, step=resident.state.step + 1
            )
        stage_sent = link.finish()
        digest, compare_s = self._step_digest(step)
        self._mark("exchange", exchange_start)
        t3 = time.perf_counter()
        exchange_s = t3 - t2
        return StepResult(
            loss=loss_value,
            example_ids=[int(i) for i in ids],
            phase_s={
                "read": t1 - t0,
                "compute": t2 - t1 - wait_s,
                "pipeline_wait": wait_s,
                "exchange": exchange_s,
            },
            param_digest=digest,
            exchange_s=exchange_s,
            exchange_bytes_sent=sent + stage_sent,
            pipeline_wait_s=wait_s,
            stage_bytes_sent=link.activation_bytes_sent,
            peak_stash_bytes=peak_stash_bytes,
            pipeline_s=t2 - t1,
            slices=tuple(self._slices),
        )


def stage_part(path: str, stage: int) -> str:
    """Stage `stage`'s part of a pipeline job's checkpoint `<dir>/<name>`: its folder
    `<dir>/stage<stage>/<name>` (controller/pipeline.py's place_stage writes it there)."""
    from pathlib import Path

    p = Path(path)
    return str(p.parent / f"stage{stage}" / p.name)


def read_stage_parts(
    path: str,
    bounds: tuple[tuple[int, int], ...],
    model_cfg: Any,
    optim_cfg: Any,
    params_like: Any,
    opt_like: Any,
    param_shardings: Any,
    opt_shardings: Any,
    *,
    params_only: bool = False,
) -> tuple[Any, Any, int]:
    """The whole model's state read from a pipeline job's checkpoint split by stage.

    Each stage's part is read onto this island's mesh with the shardings of the whole-model
    leaves its leaves are (`model/pipeline.py`'s whole_from_stages), then every whole leaf is
    taken from the first stage that holds it. The parts must be of one step.

    Args:
        path: the job-level checkpoint `<dir>/g<g>-step<n>` (its parts in `<dir>/stage<s>/`).
        bounds: the block range of every stage.
        params_like, opt_like: the whole model's (abstract) parameters and optimizer state.
        param_shardings, opt_shardings: their shardings on this island's mesh.
        params_only: read only the parameters (init_from); the optimizer state is None.

    Returns:
        (params, opt_state or None, step), the trees of `params_like` and `opt_like`.

    Raises:
        CheckpointError: a part is missing, unreadable, of another model or split, or the
            parts are of different steps.
    """
    import jax

    from pathways_lite.model.pipeline import whole_from_stages

    from .checkpoint import CheckpointError, restore, restore_params

    try:
        plan, n_params, n_opt = whole_from_stages(
            model_cfg, optim_cfg, bounds, params_like, opt_like
        )
    except ValueError as e:
        raise CheckpointError(f"checkpoint {path!r} split by stage {list(bounds)}: {e}") from e
    p_like, p_def = jax.tree_util.tree_flatten(params_like)
    o_like, o_def = jax.tree_util.tree_flatten(opt_like)
    p_sh = jax.tree_util.tree_leaves(param_shardings)
    o_sh = jax.tree_util.tree_leaves(opt_shardings)
    params: list[Any] = [None] * n_params
    opt: list[Any] = [None] * n_opt
    steps = {}
    for stage, p_idx, o_idx in plan:
        part = stage_part(path, stage)
        p_abs = [p_like[j] for j in p_idx]
        p_shard = [p_sh[j] for j in p_idx]
        if params_only:
            got_p, steps[stage] = restore_params(part, p_abs, p_shard)
            got_o = []
        else:
            got_p, got_o, steps[stage] = restore(
                part, p_abs, [o_like[j] for j in o_idx], p_shard, [o_sh[j] for j in o_idx]
            )
        for target, idx, got in ((params, p_idx, got_p), (opt, o_idx, got_o)):
            for j, leaf in zip(idx, got, strict=False):
                if target[j] is None:
                    target[j] = leaf
                else:  # the last stage's copy of the embedding (and its optimizer state)
                    leaf.delete()
    if len(set(steps.values())) != 1:
        raise CheckpointError(f"checkpoint {path!r}: its stage parts are of steps {steps}.")
    whole_params = jax.tree_util.tree_unflatten(p_def, params)
    whole_opt = None if params_only else jax.tree_util.tree_unflatten(o_def, opt)
    return whole_params, whole_opt, next(iter(steps.values()))
