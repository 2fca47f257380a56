"""Asynchronous dispatch of a job's per-step program to the hosts of its islands (grpc.aio).

For every step the controller sends `RunStep(job, generation, step, island_seq, epoch)` to every
host of the job's islands, keeps a bounded window of steps in flight (default 2: step k + 1 is
on the wire before step k has finished) and consumes the replies as futures, in step order. The
controller sends step numbers, never data: each island reads its own slice of the step's global
batch, and the islands exchange gradients among themselves (workers/exchange.py): at load the
controller tells host i of every island the addresses of host i of the others (`peers`).

Jobs sharing islands take turns through a `StepGate` (controller/scheduler.py's Scheduler):
every step waits for a slot on all of the job's islands and frees it when its hosts finish.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import grpc

from pathways_lite.v1 import worker_pb2

from .islands import INFO_TIMEOUT_S, Island, call_all
from .program import HostLoad, StepProgram

logger = logging.getLogger(__name__)

DEFAULT_WINDOW = 2
# Deadlines of worker RPCs: a step may wait behind a compile of another job on the island.
STEP_TIMEOUT_S = 600.0
LOAD_TIMEOUT_S = 900.0
ABORT_TIMEOUT_S = 10.0
# After one host of a step failed, how long the others get to answer before the step is
# given up (they may be waiting on the failed one).
FAIL_FAST_GRACE_S = 2.0
_NOT_ANSWERED = object()


class DispatchError(RuntimeError):
    """A job's step program could not continue.

    Attributes:
        reason: short machine-readable cause (`load_failed`, `step_failed`, `nan_loss`...).
        code: the gRPC status of the failed call, if one failed.
    """

    def __init__(self, reason: str, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.code = code


@dataclasses.dataclass(frozen=True)
class HostStep:
    """One host's reply to one step, with the host's own timestamps."""

    island: str
    host_index: int
    reply: worker_pb2.RunStepReply


@dataclasses.dataclass(frozen=True)
class StepReport:
    """A completed step of a job over all its islands.

    Attributes:
        step: the step number.
        loss: the global batch's mean loss (the mean of the islands' equal-sized slices).
        tokens_per_s: tokens of the global batch over `step_time_s`.
        step_time_s: from the first host starting the step to the last one finishing it.
        hosts: every host's reply, island by island, host by host.
        checkpoints_committed: steps of the checkpoints island 0's host 0 has committed.
        loss_stats: a mixture step's global (sum, count) stats (island 0's host 0).
    """

    step: int
    loss: float
    tokens_per_s: float
    step_time_s: float
    hosts: tuple[HostStep, ...]
    checkpoints_committed: tuple[int, ...] = ()
    loss_stats: tuple[float, ...] = ()


OnStep = Callable[[StepReport], Awaitable[None] | None]


class StepGate(Protocol):
    """Who may step next on shared islands (controller/scheduler.py's Scheduler)."""

    async def acquire(self, job_id: str) -> bool:
        """Wait for a step slot on all of the job's islands; False: the job must stop."""
        ...

    def done(self, job_id: str, islands: list[str], step_s: float | None) -> None:
        """The granted step has finished on every host, in `step_s` host-measured seconds
        (None when it failed)."""
        ...


class Dispatcher:
    """Drives step programs on islands with a bounded window of steps in flight.

    Args:
        epoch: this controller run's epoch, carried in every worker RPC.
        window: steps in flight per job (1 = synchronous dispatch).
        step_timeout_s: deadline of one RunStep.
    """

    def __init__(
        self, epoch: int, *, window: int = DEFAULT_WINDOW, step_timeout_s: float = STEP_TIMEOUT_S
    ) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be at least 1.")
        self.epoch = epoch
        self.window = window
        self.step_timeout_s = step_timeout_s

    async def load(
        self, program: StepProgram, islands: Sequence[Island], *, dry_run: bool = False
    ) -> list[worker_pb2.LoadJobReply]:
        """LoadJob on every host of every island at once (a multi-host island compiles
        together); replies island by island, host by host.

        Raises:
            DispatchError: a host refused or failed the load (reason `load_failed`).
        """
        hosts_per_island = {len(island.hosts) for island in islands}
        if len(islands) > 1 and len(hosts_per_island) != 1:
            raise DispatchError(
                "load_failed",
                f"job {program.job_id!r} spans islands with different host counts "
                f"{sorted(hosts_per_island)}: host i of every island exchanges with host i.",
            )
        hosts = len(islands[0].hosts) if islands else 0
        peers = [[i.hosts[h].address for i in islands] for h in range(hosts)]

        def request(island_index: int, host_index: int, _host) -> worker_pb2.LoadJobRequest:
            return program.load(
                HostLoad(
                    job_id=program.job_id,
                    generation=program.generation,
                    epoch=self.epoch,
                    island_index=island_index,
                    num_islands=len(islands),
                    # Host i's counterparts: host i of every island, island order.
                    peers=tuple(peers[host_index]) if len(islands) > 1 else (),
                    checkpoint_dir=program.checkpoint_dir,
                    restore_from=program.restore_from,
                    dry_run=dry_run,
                )
            )

        results = await call_all(
            islands, "LoadJob", request, timeout=LOAD_TIMEOUT_S, return_exceptions=True
        )
        for result in results:
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "load_failed",
                    f"loading job {program.job_id!r} failed: {result.details()}",
                    result.code(),
                )
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def abort(
        self, job_id: str, generation: int, islands: Sequence[Island], reason: str
    ) -> None:
        """Abort(job, generation) on every host: releases exchanges waiting on a peer that
        will not send (best effort; errors are logged)."""
        request = worker_pb2.AbortRequest(job_id=job_id, generation=generation, reason=reason)
        results = await call_all(
            islands, "Abort", request, timeout=ABORT_TIMEOUT_S, return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("aborting job %s: %r", job_id, result)

    async def unload(self, job_id: str, islands: Sequence[Island]) -> None:
        """UnloadJob on every host; errors are logged, not raised (best effort cleanup)."""
        request = worker_pb2.UnloadJobRequest(job_id=job_id, epoch=self.epoch)
        results = await call_all(islands, "UnloadJob", request, timeout=60, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("unloading job %s: %r", job_id, result)

    async def fill_gaps(self, islands: Sequence[Island]) -> None:
        """SkipSeq every island_seq a host has not received (a step whose RunStep never
        arrived), so the island's next step is not held up by the hole."""
        for island in islands:
            infos = await island.call(
                "Info", worker_pb2.InfoRequest(), timeout=INFO_TIMEOUT_S, return_exceptions=True
            )
            for index, (host, info) in enumerate(zip(island.hosts, infos, strict=True)):
                try:
                    if isinstance(info, BaseException):
                        raise info
                    if info.newest_epoch != self.epoch:
                        continue
                    for seq in range(info.next_island_seq, island.next_seq):
                        await island.call_host(
                            index,
                            "SkipSeq",
                            worker_pb2.SkipSeqRequest(
                                island_seq=seq, epoch=self.epoch, reason="step not delivered"
                            ),
                            timeout=INFO_TIMEOUT_S,
                        )
                except grpc.aio.AioRpcError as e:
                    logger.warning("filling island_seq gaps on %s: %s", host.address, e.details())

    def _send(
        self, program: StepProgram, step: int, islands: Sequence[Island], checkpoint: bool
    ) -> list[tuple[str, int, asyncio.Task]]:
        calls = []
        for island in islands:
            seq = island.take_seq()
            request = worker_pb2.RunStepRequest(
                job_id=program.job_id,
                generation=program.generation,
                step=step,
                island_seq=seq,
                epoch=self.epoch,
                checkpoint=checkpoint,
            )
            if program.mixture is not None:
                request.mixture_weights.extend(program.mixture.weights_for(step))
            futures = island.call_async("RunStep", request, timeout=self.step_timeout_s)
            for host, future in zip(island.hosts, futures, strict=True):
                calls.append((island.id, host.info.host_index, future))
        return calls

    async def run(
        self,
        program: StepProgram,
        islands: Sequence[Island],
        *,
        on_step: OnStep | None = None,
        should_stop: Callable[[], bool] = lambda: False,
        gate: StepGate | None = None,
    ) -> int:
        """Run the program's steps with up to `window` steps in flight; returns the number of
        steps completed (less than the program's when `should_stop` turned true).

        With a `gate` (controller/scheduler.py's Scheduler), every step first waits for a
        step slot on all of the job's islands (`gate.acquire(job_id)`; False stops the
        program) and frees it when its hosts have finished (`gate.done`), so jobs sharing
        islands take turns in the order the scheduler grants.

        Raises:
            DispatchError: a step failed on a host (reason `step_failed`) or gave a
                non-finite loss (reason `nan_loss`); steps already in flight are drained.
        """
        pending: collections.deque = collections.deque()
        next_step = program.start_step
        completed = 0
        last_checkpoint = time.monotonic()  # a run starts from a checkpoint or the seed
        try:
            while True:
                while next_step < program.steps and len(pending) < self.window:
                    if should_stop():
                        break
                    mixture = program.mixture
                    if pending and mixture is not None and not mixture.ready(next_step):
                        break  # its weights need the losses of a step still in flight
                    if gate is not None:
                        if not await gate.acquire(program.job_id):
                            break
                        if should_stop():
                            gate.done(program.job_id, [i.id for i in islands], None)
                            break
                    checkpoint = program.checkpoint_after(
                        next_step, time.monotonic() - last_checkpoint
                    )
                    if checkpoint:
                        last_checkpoint = time.monotonic()
                    calls = self._send(program, next_step, islands, checkpoint)
                    if gate is not None:
                        _release_when_done(gate, program.job_id, islands, calls)
                    pending.append((next_step, calls))
                    next_step += 1
                if not pending:
                    return completed
                step, calls = pending.popleft()
                report = await self._collect(program, step, calls)
                if program.mixture is not None:
                    program.mixture.observe(step, report.loss_stats)
                completed += 1
                if on_step is not None:
                    result = on_step(report)
                    if inspect.isawaitable(result):
                        await result
        except BaseException as e:
            # Release hosts waiting in an exchange on a peer whose step will not come.
            if len(islands) > 1:
                await self.abort(
                    program.job_id,
                    program.generation,
                    islands,
                    f"the controller stopped the step program: {e!r}"[:200],
                )
            # Let the steps already sent settle (the hosts run them anyway), then clean up.
            for _, calls in pending:
                for *_, task in calls:
                    task.cancel()
            await asyncio.gather(
                *(task for _, calls in pending for *_, task in calls), return_exceptions=True
            )
            await self.fill_gaps(islands)
            raise

    async def _collect(
        self, program: StepProgram, step: int, calls: list[tuple[str, int, asyncio.Task]]
    ) -> StepReport:
        tasks = [task for *_, task in calls]
        _, waiting = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        if waiting:
            # A host failed: the others may wait on it (an exchange, a multi-host island's
            # collective). Give them a moment, then stop waiting: `run` aborts the exchanges.
            _, waiting = await asyncio.wait(waiting, timeout=FAIL_FAST_GRACE_S)
            for task in waiting:
                task.cancel()
            await asyncio.gather(*waiting, return_exceptions=True)
        results = [
            _NOT_ANSWERED if task.cancelled() else (task.exception() or task.result())
            for task in tasks
        ]
        hosts = []
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if (
                isinstance(result, grpc.aio.AioRpcError)
                and result.code() == grpc.StatusCode.DATA_LOSS
            ):
                raise DispatchError(
                    "silent_data_corruption",
                    f"step {step} of job {program.job_id!r} on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
        for (island, host_index, _), result in zip(calls, results, strict=True):
            if isinstance(result, grpc.aio.AioRpcError):
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} failed on island {island} host "
                    f"{host_index}: {result.details()}",
                    result.code(),
                )
            if result is _NOT_ANSWERED:
                raise DispatchError(
                    "step_failed",
                    f"step {step} of job {program.job_id!r} got no answer from island {island} "
                    f"host {host_index} after another host failed.",
                    grpc.StatusCode.UNAVAILABLE,
                )
            if isinstance(result, BaseException):
                raise result
            hosts.append(HostStep(island, host_index, result))
        # Host 0 of each island reports its island's mean loss; the islands' slices are equal.
        island_losses = [h.reply.loss for h in hosts if h.host_index == 0]
        loss = sum(island_losses) / len(island_losses)
        if loss != loss or loss in (float("inf"), float("-inf")):
            raise DispatchError(
                "nan_loss", f"step {step} of job {program.job_id!r} gave loss {loss}."
            )
        start_ns = min(h.reply.timings.start_unix_ns for h in hosts)
        end_ns = max(h.reply.timings.end_unix_ns for h in hosts)
        step_time_s = max(end_ns - start_ns, 1) / 1e9
        return StepReport(
            step=step,
            loss=loss,
            tokens_per_s=program.tokens_per_step / step_time_s,
            step_time_s=step_time_s,
            hosts=tuple(hosts),
            checkpoints_committed=tuple(hosts[0].reply.checkpoints_committed),
            loss_stats=tuple(hosts[0].reply.loss_stats),
        )


def _release_when_done(
    gate: StepGate,
    job_id: str,
    islands: Sequence[Island],
    calls: list[tuple[str, int, asyncio.Task]],
) -> None:
    """Call `gate.done` once every host has answered the step (whether or not the
    controller has read the replies yet), with the step's host-measured seconds."""
    left = [len(calls)]

    def finished(_: asyncio.Task) -> None:
        left[0] -= 1
        if left[0]:
            return
        step_s = None
        for *_, task in calls:
            if not task.cancelled() and task.exception() is None:
                t = task.result().timings
                step_s = max(step_s or 0.0, (t.end_unix_ns - t.start_unix_ns) / 1e9)
        gate.done(job_id, [i.id for i in islands], step_s)

    for *_, task in calls:
        task.add_done_callback(finished)
