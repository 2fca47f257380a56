"""Simulated island hosts: worker.proto over real gRPC, no JAX (the scale harness).

A `SimHost` answers every WorkerService rpc the controller makes the way a real host does
(island_seq order, generations, epochs, suspend/resume, execution log, checkpoints "committed"
on request, slices cut short for serving by CutSlice) but a step is a sleep of the island's
configured step time, a job's memory is the configured figure, and failures are injected
(`fail_step`: a step of a job that fails once on this host; `kill`: the server stops
answering). `SimCluster` serves many such islands, one
host each, each on its own loopback port, in the calling event loop; `serve_main` runs a
cluster in a process of its own (`python -m pathways_lite.workers.sim_host --islands 64`)
and writes the hosts' addresses to a file, so the controller process runs alone.

The controller cannot tell a simulated host from a real one: it connects with `connect_host`
(wire version checked) and drives it with the same dispatcher, recovery and admission.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import grpc

from pathways_lite.v1 import common_pb2, worker_pb2, worker_pb2_grpc

from .auth import Credential, host_auth
from .checkpoint import MISSING
from .host import WORKER_WIRE_VERSION
from .ordering import (
    SKIP_WAIT_S,
    SLICE_END,
    StepNotRun,
    coalesced_replies,
    same_load,
    slice_steps,
)
from .rpc import RpcRejection
from .serve_rpc import SliceCut

logger = logging.getLogger(__name__)

# What a simulated island holds per device unless told otherwise (1 GiB).
DEFAULT_BUDGET = 1 << 30
# How many execution log entries a host keeps (as the real host).
LOG_KEEP = 8192


@dataclasses.dataclass
class SimIsland:
    """One simulated island's behaviour.

    Attributes:
        name: the island's name.
        step_s: seconds one step takes on it (0: as fast as the rpc).
        budget: memory budget per device (bytes).
        job_bytes: what a loaded job measures per device (0: half the budget).
        devices: devices on the island (one host owns them all).
        fail_steps: steps that fail once on this host (an injected fault, per job id "*" or
            the job's id), mapped to the gRPC code they fail with.
        suspend_s: seconds a Suspend takes (moving a job's state to host memory).
        load_s: seconds a LoadJob takes (compiling).
        save_s: seconds a SaveCheckpoint that saves takes.
        unreadable: checkpoint steps this host cannot restore (DATA_LOSS: a corrupt part).
        unseen: checkpoint steps this host cannot find (DATA_LOSS, as a real host that does
            not see the folder: a state directory not shared with its node).
        keep_state_fails: a load that asks to keep the state held (a restarted controller's
            adoption) is refused, as by a host whose state could not be kept.
        fail_skips: how many SkipSeq calls fail UNAVAILABLE before one is answered (an
            injected fault: a flaky network; nothing is skipped by a failed call).
        hold_ahead: steps a CutSlice HOLD answers past the first step not started here, as
            a host whose earlier hold lapsed answers: it ran on past that cut, and the
            controller sends it those steps again (replayed there).
        hold_delay_s: seconds a CutSlice HOLD waits before it applies and answers (a busy
            host; its steps run on meanwhile).
    """

    name: str
    step_s: float = 0.0
    budget: int = DEFAULT_BUDGET
    job_bytes: int = 0
    devices: int = 1
    fail_steps: dict[tuple[str, int], grpc.StatusCode] = dataclasses.field(default_factory=dict)
    suspend_s: float = 0.0
    load_s: float = 0.0
    keep_state_fails: bool = False
    save_s: float = 0.0
    unreadable: frozenset[int] = frozenset()
    unseen: frozenset[int] = frozenset()
    fail_skips: int = 0
    hold_ahead: int = 0
    hold_delay_s: float = 0.0


@dataclasses.dataclass
class _Loaded:
    generation: int
    suspended: bool = False
    steps_applied: int = 0
    committed: list[int] = dataclasses.field(default_factory=list)
    checkpoint_dir: str = ""
    request: worker_pb2.LoadJobRequest | None = None


def _step_reply(
    request: worker_pb2.RunStepRequest, job: _Loaded, **fields: object
) -> worker_pb2.RunStepReply:
    """A simulated step's reply: its loss is 1 / (1 + step), its committed checkpoints the
    job's."""
    return worker_pb2.RunStepReply(
        job_id=request.job_id,
        generation=request.generation,
        step=request.step,
        island_seq=request.island_seq,
        loss=1.0 / (1.0 + request.step),
        checkpoints_committed=job.committed,
        **fields,
    )


class SimHost(worker_pb2_grpc.WorkerServiceServicer):
    """One simulated island host (the island's only host)."""

    def __init__(self, island: SimIsland) -> None:
        self.island = island
        self.address = ""
        self.port = 0
        self.jobs: dict[str, _Loaded] = {}
        self.newest_epoch = 0
        self.next_seq = 0
        self.running = ""
        self.log: list[worker_pb2.ExecutionEntry] = []
        self.steps_run = 0
        self._seq_changed = asyncio.Condition()
        self._device = asyncio.Lock()
        # Tasks running RunSlice streams' steps, and skipping the numbers of steps not run.
        self._tasks: set[asyncio.Future] = set()
        # Each job's CutSlice state (the real host's `SliceCut`, workers/serve_rpc.py).
        self._cuts: dict[str, SliceCut] = {}

    # -- helpers -------------------------------------------------------------------------

    def _epoch(self, epoch: int) -> None:
        """A newer controller epoch restarts the island_seq numbering at 0."""
        if epoch > self.newest_epoch:
            self.newest_epoch = epoch
            self.next_seq = 0

    async def _take_seq(self, seq: int) -> None:
        """Wait until `seq` is the next island_seq, as the real host orders steps."""
        async with self._seq_changed:
            await self._seq_changed.wait_for(lambda: self.next_seq >= seq)
            if self.next_seq > seq:
                raise RpcRejection(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"island_seq={seq} was already used (next is {self.next_seq}).",
                )
            self.next_seq = seq + 1
            self._seq_changed.notify_all()

    def _skip_when_due(self, island_seqs: list[int], epoch: int) -> None:
        """Skip `island_seqs` (ascending) as their turns come, as the real host does for a
        slice's steps not run: numbers already used are left alone; a newer epoch (or
        SKIP_WAIT_S without their turn) drops the rest."""

        async def skip_all() -> None:
            for seq in island_seqs:
                async with self._seq_changed:
                    try:
                        await asyncio.wait_for(
                            self._seq_changed.wait_for(
                                lambda s=seq: self.next_seq >= s or self.newest_epoch != epoch
                            ),
                            SKIP_WAIT_S,
                        )
                    except TimeoutError:
                        return
                    if self.newest_epoch != epoch:
                        return
                    if self.next_seq == seq:
                        self.next_seq = seq + 1
                        self._seq_changed.notify_all()

        self._keep(asyncio.ensure_future(skip_all()))

    def _keep(self, task: asyncio.Future) -> None:
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _job_bytes(self) -> int:
        return self.island.job_bytes or self.island.budget // 2

    # -- rpcs ----------------------------------------------------------------------------

    async def Info(self, request, context):
        return worker_pb2.InfoReply(
            island=self.island.name,
            host_index=0,
            num_hosts=1,
            node_ip="127.0.0.1",
            node_id="sim",
            address=self.address,
            port=self.port,
            pid=os.getpid(),
            devices=[
                worker_pb2.DeviceInfo(id=d, platform="cpu", kind="sim", process_index=0)
                for d in range(self.island.devices)
            ],
            island_device_count=self.island.devices,
            memory_budget_bytes_per_device=self.island.budget,
            wire_version=common_pb2.WireVersion(version=WORKER_WIRE_VERSION),
            loaded_jobs=sorted(self.jobs),
            newest_epoch=self.newest_epoch,
            next_island_seq=self.next_seq,
            running_job=self.running,
        )

    async def LoadJob(self, request, context):
        self._epoch(request.epoch)
        nbytes = self._job_bytes()
        if nbytes > self.island.budget:
            await context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"job {request.job_id!r} needs {nbytes} bytes per device; the budget is "
                f"{self.island.budget}.",
            )
        if self.island.load_s > 0:
            await asyncio.sleep(self.island.load_s)
        if not request.dry_run:
            start = 0
            if request.restore_from:
                start = int(request.restore_from.rsplit("step", 1)[-1] or 0)
                if start in self.island.unreadable:
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"checkpoint {request.restore_from} is unreadable here (simulated).",
                    )
                if start in self.island.unseen:
                    await context.abort(
                        grpc.StatusCode.DATA_LOSS,
                        f"checkpoint {request.restore_from!r} {MISSING} (simulated).",
                    )
            held = self.jobs.get(request.job_id)
            if held is not None and held.generation == request.generation:
                # As the real host: a retried load is answered again, another is refused.
                if held.request is None or not same_load(held.request, request):
                    await context.abort(
                        grpc.StatusCode.FAILED_PRECONDITION,
                        f"job {request.job_id!r} generation {request.generation} is already "
                        "loaded with a different spec; bump the generation to replace it.",
                    )
            elif request.keep_state and self.island.keep_state_fails:
                await context.abort(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"the state of job {request.job_id!r} could not be kept (simulated).",
                )
            elif request.keep_state and held is not None:
                start = held.steps_applied  # a new generation of the state it holds
            if held is None or held.generation != request.generation:
                self.jobs[request.job_id] = _Loaded(
                    request.generation,
                    steps_applied=start,
                    checkpoint_dir=request.checkpoint_dir,
                    request=request,
                )
        return worker_pb2.LoadJobReply(
            job_id=request.job_id,
            loaded=not request.dry_run,
            memory=common_pb2.MemoryAnalysis(argument_bytes=nbytes, total_bytes=nbytes),
            estimate_bytes_per_device=nbytes,
            budget_bytes_per_device=self.island.budget,
            compile_s=0.0,
        )

    async def RunStep(self, request, context):
        try:
            return await self._run_step(request, time.time_ns())
        except RpcRejection as e:
            await context.abort(e.code, e.message)
        except StepNotRun as e:
            await context.abort(grpc.StatusCode.ABORTED, str(e))

    async def CutSlice(self, request, context):
        """A phase of a cut of the job's slices at a step boundary, as the real host."""
        if request.epoch < self.newest_epoch:
            await context.abort(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"epoch={request.epoch} is older than the newest controller epoch "
                f"{self.newest_epoch}.",
            )
        self._epoch(request.epoch)
        if request.job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        hold = request.phase == worker_pb2.CutSliceRequest.HOLD
        if hold and self.island.hold_delay_s > 0:
            await asyncio.sleep(self.island.hold_delay_s)
        next_step = self._cuts.setdefault(request.job_id, SliceCut()).apply(request)
        if hold:
            next_step += self.island.hold_ahead
        return worker_pb2.CutSliceReply(job_id=request.job_id, next_step=next_step)

    async def RunSlice(self, request, context):
        """The slice's steps through RunStep's path, back to back, streaming their replies in
        step order (coalesced); as the real host (workers/service.py): the stream ends at the
        first failed step with its status, the step in progress when the stream goes
        completes, and the island_seq numbers of the steps not run are skipped when their
        turn comes."""
        received = time.time_ns()
        try:
            steps = slice_steps(request)
        except RpcRejection as e:
            await context.abort(e.code, e.message)
        self._epoch(request.epoch)
        replies: asyncio.Queue = asyncio.Queue()
        stop = asyncio.Event()

        async def produce() -> None:
            for index, step in enumerate(steps):
                if stop.is_set():
                    self._skip_when_due([s.island_seq for s in steps[index:]], request.epoch)
                    return
                try:
                    reply = await self._run_step(step, received)
                except StepNotRun:
                    # Cut for serving: the slice ends before this step (its number used).
                    self._skip_when_due([s.island_seq for s in steps[index + 1 :]], request.epoch)
                    replies.put_nowait(SLICE_END)
                    return
                except BaseException as e:  # noqa: BLE001 - handed to the stream
                    replies.put_nowait(e)
                    self._skip_when_due([s.island_seq for s in steps[index:]], request.epoch)
                    return
                if reply.replayed:
                    # Held before (its reply again) and did not take its number: skipped when
                    # due, as the real host does (workers/slices.py).
                    self._skip_when_due([step.island_seq], request.epoch)
                replies.put_nowait(reply)

        self._keep(asyncio.ensure_future(produce()))
        try:
            async for message in coalesced_replies(replies, len(steps)):
                yield message
        except RpcRejection as e:
            await context.abort(e.code, e.message)
        finally:
            stop.set()

    async def _run_step(self, request, received: int) -> worker_pb2.RunStepReply:
        """One step (RunStep and each step of RunSlice).

        Raises:
            RpcRejection: the step was refused or failed (an injected failure).
            StepNotRun: a cut for serving ends its slice before it (CutSlice).
        """
        self._epoch(request.epoch)
        job = self.jobs.get(request.job_id)
        if job is not None and job.generation == request.generation:
            if request.step < job.steps_applied:
                # A step this host holds (ran, or was loaded past): its reply again, marked
                # replayed, as a real host's step records answer a retry or a new
                # controller's replay (workers/ordering.py); nothing runs, no number taken.
                return _step_reply(request, job, replayed=True)
        await self._take_seq(request.island_seq)
        job = self.jobs.get(request.job_id)
        if job is None:
            raise RpcRejection(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        if job.generation != request.generation:
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"generation={request.generation} but {job.generation} is loaded.",
            )
        async with self._device:
            # Held or ended here by a cut; marks the step started (what a HOLD answers):
            # as on a real host, once the step before it ended, not when it took its
            # number and queued behind the step running.
            await self._cuts.setdefault(request.job_id, SliceCut()).admit(
                request.generation, request.step, request.island_seq, request.epoch
            )
            for key in ((request.job_id, request.step), ("*", request.step)):
                code = self.island.fail_steps.pop(key, None)
                if code is not None:
                    raise RpcRejection(code, f"injected failure at step {request.step}.")
            self.running = request.job_id
            start = time.time_ns()
            if self.island.step_s > 0:
                await asyncio.sleep(self.island.step_s)
            end = time.time_ns()
            self.running = ""
        job.steps_applied = request.step + 1
        self.steps_run += 1
        if request.checkpoint and job.checkpoint_dir:
            job.committed.append(request.step + 1)
        self.log.append(
            worker_pb2.ExecutionEntry(
                job_id=request.job_id,
                generation=request.generation,
                step=request.step,
                island_seq=request.island_seq,
                start_unix_ns=start,
                end_unix_ns=end,
                epoch=request.epoch,
            )
        )
        del self.log[:-LOG_KEEP]
        return _step_reply(
            request,
            job,
            timings=worker_pb2.StepTimings(
                received_unix_ns=received, start_unix_ns=start, end_unix_ns=end
            ),
            step_s=(end - start) / 1e9,
        )

    async def SkipSeq(self, request, context):
        if self.island.fail_skips > 0:
            self.island.fail_skips -= 1
            await context.abort(grpc.StatusCode.UNAVAILABLE, "SkipSeq lost (injected fault).")
        self._epoch(request.epoch)
        if request.when_due:
            seqs = range(request.island_seq, request.island_seq + max(1, request.count))
            self._skip_when_due(list(seqs), request.epoch)
            return worker_pb2.SkipSeqReply(next_island_seq=self.next_seq)
        async with self._seq_changed:
            already = request.island_seq < self.next_seq
            if not already:
                self.next_seq = request.island_seq + 1
                self._seq_changed.notify_all()
        return worker_pb2.SkipSeqReply(next_island_seq=self.next_seq, already_filled=already)

    async def ParamDigest(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        return worker_pb2.ParamDigestReply(
            job_id=request.job_id, sha256=b"\0" * 32, steps_applied=job.steps_applied
        )

    async def UnloadJob(self, request, context):
        loaded = self.jobs.get(request.job_id)
        newer = request.HasField("generation") and loaded is not None
        if newer and loaded.generation > request.generation:
            return worker_pb2.UnloadJobReply(unloaded=False)  # a newer load: it stays
        self._cuts.pop(request.job_id, None)
        return worker_pb2.UnloadJobReply(unloaded=self.jobs.pop(request.job_id, None) is not None)

    async def Abort(self, request, context):
        return worker_pb2.AbortReply()

    async def ExchangeStats(self, request, context):
        return worker_pb2.ExchangeStatsReply()

    async def Suspend(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        if self.island.suspend_s > 0:
            await asyncio.sleep(self.island.suspend_s)
        was = job.suspended
        job.suspended = True
        return worker_pb2.SuspendReply(suspended=not was, host_bytes=self._job_bytes())

    async def Resume(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        was = job.suspended
        job.suspended = False
        return worker_pb2.ResumeReply(resumed=was, device_bytes_per_device=self._job_bytes())

    async def ExecutionLog(self, request, context):
        return worker_pb2.ExecutionLogReply(
            entries=[e for e in self.log if e.island_seq >= request.from_island_seq],
            jobs=[
                worker_pb2.JobMemory(
                    job_id=j,
                    live_bytes_per_device=0 if s.suspended else self._job_bytes(),
                    suspended=s.suspended,
                )
                for j, s in self.jobs.items()
            ],
        )

    async def SaveCheckpoint(self, request, context):
        job = self.jobs.get(request.job_id)
        if job is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        if request.save and job.checkpoint_dir:
            if self.island.save_s > 0:
                await asyncio.sleep(self.island.save_s)
            job.committed.append(job.steps_applied)
        return worker_pb2.SaveCheckpointReply(
            job_id=request.job_id,
            writer=True,
            step=job.steps_applied,
            path=f"{job.checkpoint_dir}/g{job.generation}-step{job.steps_applied}",
            checkpoints_committed=job.committed,
        )

    async def StartServe(self, request, context):
        """A simulated service: nothing decodes (Generate is not served); its KV cache is a
        tenth of a loaded job's bytes."""
        if request.job_id not in self.jobs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"job {request.job_id!r} not loaded.")
        return worker_pb2.StartServeReply(
            job_id=request.job_id, kv_cache_bytes=self._job_bytes() // 10
        )

    async def StopServe(self, request, context):
        return worker_pb2.StopServeReply(job_id=request.job_id)

    async def Sample(self, request, context):
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "a simulated host does not sample.")


class SimCluster:
    """Simulated islands served in the running event loop, one gRPC server per host.

    Args:
        islands: the islands' behaviours.
    """

    def __init__(self, islands: Sequence[SimIsland], credential: Credential | None = None) -> None:
        self.specs = list(islands)
        self.credential = credential
        self.hosts: dict[str, SimHost] = {}
        self._servers: dict[str, grpc.aio.Server] = {}

    @classmethod
    def uniform(cls, n: int, *, credential: Credential | None = None, **kwargs) -> SimCluster:
        """`n` alike islands named island-0 .. island-(n-1)."""
        return cls([SimIsland(f"island-{i}", **kwargs) for i in range(n)], credential)

    async def start(self) -> dict[str, str]:
        """Serve every host; returns island name -> address."""
        for spec in self.specs:
            await self._serve(spec)
        return self.addresses()

    async def _serve(self, spec: SimIsland) -> None:
        host = SimHost(spec)
        # With a credential, closed as a real host is (`pathways-lite up --simulate-islands`):
        # a call without it is refused before it reaches the host.
        interceptors = [] if self.credential is None else [host_auth(self.credential)]
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        worker_pb2_grpc.add_WorkerServiceServicer_to_server(host, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        host.port, host.address = port, f"127.0.0.1:{port}"
        self.hosts[spec.name] = host
        self._servers[spec.name] = server

    def addresses(self) -> dict[str, str]:
        return {name: host.address for name, host in self.hosts.items()}

    async def kill(self, name: str) -> None:
        """The island's host dies: its server stops at once (calls in flight fail)."""
        server = self._servers.pop(name, None)
        if server is not None:
            await server.stop(grace=None)

    async def stop(self) -> None:
        await asyncio.gather(*(s.stop(grace=None) for s in self._servers.values()))
        self._servers.clear()
        # Their waits for a turn (a cut's steps to skip) end with them: left pending, they
        # were destroyed with the loop, and their `finally` called the closed loop.
        tasks = [task for host in self.hosts.values() for task in host._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class SimHostActor:
    """One simulated island host as a Ray actor (wrap it with `ray.remote(max_concurrency=4)`):
    its gRPC server runs on a loop of its own thread; `watch` never returns, as the real
    host's (controller/islands.py's DeathWatch keeps it pending to learn of a death)."""

    def __init__(
        self, name: str, step_s: float = 0.0, budget: int = DEFAULT_BUDGET, job_bytes: int = 0
    ) -> None:
        import threading

        self._loop = asyncio.new_event_loop()
        self._cluster = SimCluster(
            [SimIsland(name, step_s=step_s, budget=budget, job_bytes=job_bytes)]
        )
        threading.Thread(target=self._loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._cluster.start(), self._loop).result(60)

    def address(self) -> str:
        return next(iter(self._cluster.addresses().values()))

    def pid(self) -> int:
        return os.getpid()

    def watch(self) -> None:
        import threading

        threading.Event().wait()


async def connect_islands(addresses: dict[str, str], credential: Credential | None = None) -> list:
    """Controller-side `Island`s for simulated hosts (no Ray group: not restartable), whose
    calls carry `credential` (the hosts' own)."""
    from pathways_lite.controller.islands import Island, connect_host

    hosts = await asyncio.gather(
        *(connect_host(a, credential=credential) for a in addresses.values())
    )
    return [
        Island(name, [h], credential=credential) for name, h in zip(addresses, hosts, strict=True)
    ]


async def _serve_forever(args: argparse.Namespace) -> None:
    cluster = SimCluster.uniform(
        args.islands, step_s=args.step_s, budget=args.budget, job_bytes=args.job_bytes
    )
    addresses = await cluster.start()
    tmp = Path(args.address_file).with_suffix(".tmp")
    tmp.write_text(json.dumps(addresses))
    os.replace(tmp, args.address_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await cluster.stop()


def serve_main(argv: Sequence[str] | None = None) -> int:
    """`python -m pathways_lite.workers.sim_host --islands N --address-file F`: serve N
    simulated islands in this process until SIGTERM; F gets {island: address}."""
    parser = argparse.ArgumentParser(prog="sim_host", description=serve_main.__doc__)
    parser.add_argument("--islands", type=int, required=True)
    parser.add_argument("--step-s", type=float, default=0.0)
    parser.add_argument("--budget", type=int, default=DEFAULT_BUDGET)
    parser.add_argument("--job-bytes", type=int, default=0, help="0: half the budget")
    parser.add_argument("--address-file", required=True)
    args = parser.parse_args(argv)
    if args.islands < 1:
        parser.error(f"--islands={args.islands} must be at least 1.")
    logging.basicConfig(level=logging.WARNING)
    asyncio.run(_serve_forever(args))
    return 0


if __name__ == "__main__":
    raise SystemExit(serve_main())
