"""The worker service's serving rpcs (issue 18): StartServe, StopServe, Generate, CutSlice.

A serving job keeps its parameters resident; StartServe builds a `SlotDecoder` over them and
starts a `ServeEngine` (workers/serve_engine.py).

Training beside it: the controller decides, once per step for a whole training job, when it
yields to serving. Before it forwards a request to an island whose service is idle, it cuts
the slices of the training jobs resident there at one step boundary on every host of all
their islands (CutSlice, two phases: `SliceCut`), and grants them no slice until the island's
service is idle again (controller/serve_router.py). The island's `IslandGate` (held by the
engine while requests are in flight) stays as the host's backstop for single-island jobs
only: a step of such a job that would start while a request decodes waits at its step
boundary (`ServingHost.training_step`). A step of a multi-island job never waits at one
host's gate: its peers would wait for it in the gradient exchange (review finding 4).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from typing import Any

import grpc

from pathways_lite.v1 import worker_pb2

from .ordering import StepNotRun
from .requests import check_job_id
from .rpc import RpcRejection
from .runtime import RuntimeUnavailableError
from .serve_engine import IslandGate, Request, ServeEngine, ServeError

logger = logging.getLogger(__name__)


class _Loading:
    """A job whose StartServe has not finished: one of its own per build (a build stopped
    and started again is not taken for the first one), with the build's task."""

    task: asyncio.Future


def _retrieved(task: asyncio.Future) -> None:
    """A build whose every caller went away: its error is not "never retrieved"."""
    if not task.cancelled():
        task.exception()


def _settle(runtime: Any) -> None:
    """Wait for a runtime's dispatched update (its parameters) to be computed."""
    loaded = getattr(runtime, "_loaded", None)
    if loaded is None:
        return
    import jax

    try:
        jax.block_until_ready(loaded().state.params)
    except Exception:  # noqa: BLE001 - unloaded or suspended meanwhile: nothing to wait for
        logger.debug("settling a step", exc_info=True)


class _Inbox:
    """The engine thread's tokens into the host's event loop: one loop wake-up carries every
    event put since the last one (a decode step of N streams wakes the loop once, not N
    times: per-token cost on the host at many concurrent clients)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a wake-up is already on its way
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop closed: the clients are gone
            pass

    def _deliver(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


class _ToLoop:
    """A thread-safe `put` into an asyncio queue (the engine's side of a stream)."""

    def __init__(self, inbox: _Inbox) -> None:
        self.inbox = inbox
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        self.inbox.put(self.queue, item)


class SliceCut:
    """One job's slices cut at a step boundary on this host (CutSlice).

    HOLD: the job's steps from the first one this host has not started wait (at most until
    `hold_until`); CUT(before): its steps before `before` run, the others do not
    (`StepNotRun`: the slice ends there). Only steps of `generation` under island_seq
    `seq_below` of the cut's controller epoch are concerned, so the slices sent after the cut
    (or by a later controller, whose island sequence starts again at 0) run normally.
    """

    def __init__(self) -> None:
        # The generation of the steps admitted so far and the first step not started.
        self.generation = -1
        self.next_step = 0
        self.cut_generation = -1
        self.cut_epoch = -1
        self.seq_below = 0
        self.hold_from: int | None = None
        self.hold_until = 0.0
        self.before: int | None = None
        self._changed = asyncio.Event()
        # A slice running back to back on the runtime thread checks the cut and marks its
        # steps started under this lock (`start_now`), so `apply` never misses a step.
        self._mutex = threading.Lock()

    def apply(self, request: worker_pb2.CutSliceRequest) -> int:
        """Apply a CutSlice phase; returns the first step of the job not started here."""
        with self._mutex:
            started = self._apply(request)
        self._changed.set()
        self._changed = asyncio.Event()
        return started

    def _apply(self, request: worker_pb2.CutSliceRequest) -> int:
        phase = worker_pb2.CutSliceRequest
        started = self.next_step if self.generation == request.generation else 0
        if request.phase in (phase.HOLD, phase.CUT) and (
            request.generation != self.cut_generation or request.epoch != self.cut_epoch
        ):
            self.seq_below = 0
        if request.phase == phase.HOLD:
            self.cut_generation = request.generation
            self.cut_epoch = request.epoch
            self.seq_below = request.seq_below
            self.before = None
            self.hold_from = started
            self.hold_until = time.monotonic() + max(0.0, request.hold_s or 5.0)
        elif request.phase == phase.CUT:
            self.cut_generation = request.generation
            self.cut_epoch = request.epoch
            self.seq_below = max(self.seq_below, request.seq_below)
            self.before = int(request.before_step)
            self.hold_from = None
        else:
            self.hold_from = None
        return started

    def _concerns(self, generation: int, island_seq: int, epoch: int) -> bool:
        return (
            generation == self.cut_generation
            and epoch == self.cut_epoch
            and island_seq < self.seq_below
        )

    def _started(self, generation: int, step: int) -> None:
        if generation != self.generation:
            self.generation, self.next_step = generation, 0
        self.next_step = max(self.next_step, step + 1)

    def start_now(self, generation: int, step: int, island_seq: int, epoch: int) -> bool:
        """Mark the step started unless a cut concerns it (then False: it goes through
        `admit` on the event loop). Thread-safe: the runtime thread's check."""
        with self._mutex:
            if self._concerns(generation, island_seq, epoch):
                return False
            self._started(generation, step)
            return True

    async def admit(self, generation: int, step: int, island_seq: int, epoch: int) -> None:
        """Wait while the step is held; mark it started.

        Raises:
            StepNotRun: the step is cut (its slice ends before it).
        """
        while self._concerns(generation, island_seq, epoch):
            if self.before is not None and step >= self.before:
                raise StepNotRun(f"step {step} was cut (serving); it runs in a later slice.")
            if self.hold_from is None or step < self.hold_from:
                break
            left = self.hold_until - time.monotonic()
            if left <= 0:  # the cut never came (the controller went away): go on
                logger.warning("a hold of step %d lapsed without its cut", step)
                self.hold_from = None
                break
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                pass
        with self._mutex:
            self._started(generation, step)


class ServingHost:
    """Mixed into WorkerServicer: the serving engines of this host's jobs."""

    def _serving_init(self) -> None:
        self.gate = IslandGate()
        self.device_thread_lock = threading.Lock()
        self._engines: dict[str, Any] = {}
        self._cuts: dict[str, SliceCut] = {}
        self._inbox: _Inbox | None = None

    def slice_cut(self, job_id: str) -> SliceCut:
        """The job's cut state on this host (created on first use)."""
        cut = self._cuts.get(job_id)
        if cut is None:
            cut = self._cuts[job_id] = SliceCut()
        return cut

    def forget_cut(self, job_id: str) -> None:
        self._cuts.pop(job_id, None)

    def training_step(self, fn: Any, runtime: Any = None, on_start: Any = None) -> Any:
        """Run one training step (on the runtime thread) under the device lock; `on_start()`
        is called when the step really starts (the step's start timestamp).

        A step of a single-island job waits at its step boundary while a request is being
        served (checked again under the device lock, so a step never starts after a request
        took the island). This is the backstop: the controller has cut the job's slices
        before it forwarded the request. A step of a multi-island job (gradient exchange,
        pipeline stage links) never waits here: it is a collective whose peers may already
        wait for it; the controller's cut stops it on all its islands at one step."""
        spec = getattr(runtime, "spec", None)
        collective = spec is not None and (
            getattr(spec, "num_islands", 1) > 1 or getattr(spec, "pipeline", None) is not None
        )
        while True:
            if not collective:
                self.gate.wait_for_training()
            with self.device_thread_lock:
                if collective or not self.gate.wants():
                    if on_start is not None:
                        on_start()
                    result = fn()
                    if self._engines and runtime is not None:
                        # With a service on the island the step ends on the devices before
                        # the lock goes: its update never delays the next decode step.
                        _settle(runtime)
                    return result

    def device_locked(self, fn: Any, *args: Any) -> Any:
        """`fn(*args)` under the device lock (on the runtime thread): a runtime's suspend or
        unload never frees buffers while a serve engine's prefill or decode reads them."""
        with self.device_thread_lock:
            return fn(*args)

    def _stop_engine(self, job_id: str, reason: str) -> ServeEngine | None:
        engine = self._engines.pop(job_id, None)
        if isinstance(engine, ServeEngine):
            engine.stop(reason)  # its loop has ended: nothing reads the cache any more
            engine.decoder.close()
            return engine
        return None

    def _drop_loading(self, job_id: str, loading: _Loading) -> None:
        """Forget a build that failed, unless it was stopped and another started since."""
        if self._engines.get(job_id) is loading:
            del self._engines[job_id]

    def _stop_all_engines(self, reason: str) -> None:
        for job_id in list(self._engines):
            self._stop_engine(job_id, reason)

    async def StartServe(self, request: worker_pb2.StartServeRequest, context) -> Any:
        from pathways_lite.model.decode import SlotDecoder

        job = self._job(request.job_id)
        engine = self._engines.get(request.job_id)
        compile_s = 0.0
        if isinstance(engine, _Loading):
            # Another StartServe builds it (the liveness probe's, say): this one waits for
            # that build (a second build made a second KV cache, and one of the two ended
            # ABORTED).
            engine, _ = await asyncio.shield(engine.task)
        elif isinstance(engine, ServeEngine) and not engine.running:
            # A loop that failed on its own (or ended) is dropped: never handed back as
            # serving. The caller learns why; the next StartServe builds a new one.
            await asyncio.to_thread(self._stop_engine, request.job_id, "the service had stopped")
            raise RpcRejection(
                grpc.StatusCode.UNAVAILABLE,
                f"job {request.job_id!r}: {engine.failure or 'the service had stopped'}",
            )
        elif engine is None:
            loading = self._engines[request.job_id] = _Loading()
            # Its own task: a caller cancelled (a deadline, a controller gone) neither stops
            # the build nor leaves the engine it makes running unowned.
            loading.task = asyncio.ensure_future(self._build(request, job, loading))
            loading.task.add_done_callback(_retrieved)
            engine, compile_s = await asyncio.shield(loading.task)
        return worker_pb2.StartServeReply(
            job_id=request.job_id,
            kv_cache_bytes=SlotDecoder.kv_bytes(
                engine.decoder.cfg, engine.max_batch, engine.max_seq_len
            ),
            compile_s=compile_s,
        )

    async def _build(
        self, request: worker_pb2.StartServeRequest, job: Any, loading: _Loading
    ) -> tuple[ServeEngine, float]:
        """Build job's serve engine (its decoder compiled, its KV cache allocated) and install
        it, unless the service was stopped meanwhile; returns it and its build's seconds."""
        from pathways_lite.model.decode import SlotDecoder

        runtime = job.runtime
        fns, dataset, loaded = (getattr(runtime, n, None) for n in ("fns", "dataset", "_loaded"))
        if fns is None or dataset is None or loaded is None:
            self._drop_loading(request.job_id, loading)
            raise RuntimeUnavailableError(
                f"job {request.job_id!r} (model {runtime.spec.preset!r}) has no language "
                "model to serve."
            )
        tokenizer = dataset.tokenizer

        def build() -> tuple[ServeEngine, float]:
            started = time.perf_counter()
            with self.device_thread_lock:
                decoder = SlotDecoder(
                    fns.model(loaded().state),
                    int(request.max_batch),
                    int(request.max_seq_len),
                    vocab_size=tokenizer.vocab_size,  # the model's may be larger
                )
                try:
                    decoder.warm()  # every decode bucket and the common prefill
                except BaseException:
                    # (Out of memory, say.) Its cache is freed now, not at the next garbage
                    # collection: the room is the job's again at once.
                    decoder.close()
                    raise
            engine = ServeEngine(
                decoder,
                tokenizer.decode,
                eos_id=getattr(tokenizer, "eos_id", None),
                gate=self.gate,
                lock=self.device_thread_lock,
            )
            return engine, time.perf_counter() - started

        try:
            engine, compile_s = await asyncio.to_thread(build)
        except ValueError as e:
            self._drop_loading(request.job_id, loading)
            raise RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, str(e)) from None
        except BaseException:
            self._drop_loading(request.job_id, loading)
            raise
        if self._engines.get(request.job_id) is not loading:  # stopped while loading
            await asyncio.to_thread(engine.stop, "the service was stopped while loading")
            engine.decoder.close()
            raise RpcRejection(grpc.StatusCode.ABORTED, "the service was stopped while loading")
        self._engines[request.job_id] = engine
        logger.info("job %s serving (compile %.1f s)", request.job_id, compile_s)
        return engine, compile_s

    async def CutSlice(self, request: worker_pb2.CutSliceRequest, context) -> Any:
        """One phase of a cut of the job's slices at a step boundary (see `SliceCut`)."""
        check_job_id(request.job_id)
        self.order.check_epoch(request.epoch)  # type: ignore[attr-defined]
        self._job(request.job_id)  # NOT_FOUND when not loaded here
        next_step = self.slice_cut(request.job_id).apply(request)
        return worker_pb2.CutSliceReply(job_id=request.job_id, next_step=next_step)

    async def StopServe(self, request: worker_pb2.StopServeRequest, context) -> Any:
        check_job_id(request.job_id)
        reason = request.reason or "the service stopped"
        engine = await asyncio.to_thread(self._stop_engine, request.job_id, reason)
        stats = engine.stats if engine is not None else None
        return worker_pb2.StopServeReply(
            job_id=request.job_id,
            requests=stats.requests if stats else 0,
            tokens=stats.tokens if stats else 0,
        )

    async def Generate(self, request: worker_pb2.GenerateRequest, context) -> Any:
        check_job_id(request.job_id)
        engine = self._engines.get(request.job_id)
        if isinstance(engine, _Loading):
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION, f"job {request.job_id!r} is loading."
            )
        if engine is None:
            self._job(request.job_id)  # NOT_FOUND when not loaded here
            raise RpcRejection(
                grpc.StatusCode.FAILED_PRECONDITION, f"job {request.job_id!r} is not serving."
            )
        tokenizer = self._job(request.job_id).runtime.dataset.tokenizer
        if not request.prompt:
            raise RpcRejection(
                grpc.StatusCode.INVALID_ARGUMENT, "prompt is empty; give some text to continue."
            )
        loop = asyncio.get_running_loop()
        if self._inbox is None or self._inbox.loop is not loop:
            self._inbox = _Inbox(loop)
        out = _ToLoop(self._inbox)
        req = Request(
            prompt_ids=tokenizer.encode(request.prompt),
            max_tokens=int(request.max_tokens),
            temperature=float(request.temperature),
            top_k=int(request.top_k),
            top_p=float(request.top_p),
            seed=int(request.seed),
            stop=tuple(request.stop),
            events=out,
        )
        try:  # the settings and the stop strings are checked here again (`check_sampling`)
            engine.submit(req)
        except ServeError as e:
            raise RpcRejection(getattr(grpc.StatusCode, e.code), str(e)) from None
        try:
            while True:
                ev = await out.queue.get()
                if ev[0] == "token":
                    yield worker_pb2.GenerateReply(text=ev[2], token=ev[1])
                elif ev[0] == "end":
                    n = len(req.tokens)
                    now = time.perf_counter()
                    ttft = (req.first_token_at - req.submitted) * 1e3
                    per = (now - req.first_token_at) * 1e3 / max(1, n - 1)
                    yield worker_pb2.GenerateReply(
                        done=True,
                        token=-1,
                        finish_reason=ev[1],
                        tokens=n,
                        prompt_tokens=len(req.prompt_ids),
                        ttft_ms=ttft,
                        ms_per_token=per,
                    )
                    return
                else:
                    raise RpcRejection(getattr(grpc.StatusCode, ev[1]), ev[2])
        finally:
            req.cancel()  # a client that went away frees its slot at the next step
