"""Serving (issue 18): which serve jobs answer requests, on which islands, the Generate
stream routed to the least-loaded replica, and the island time serving takes from training.

A `kind: serve` job's runner (jobs.py) registers its replicas (one per island) as loading,
then as serving once every replica's StartServe has compiled; preemption, cancel or a drain
stop them: the router marks the job stopping with the reason first, so a new request, one
waiting for its island's cut, or one that reaches a host whose service has just stopped ends
UNAVAILABLE naming why; the hosts end the open streams the same way. A preempted job stays
stopping (requests answered UNAVAILABLE naming the preemption) while it waits suspended, until
it loads again on resume. Tokens come
from the island hosts (workers/serve_rpc.py); the controller only routes and relays.

Sharing an island with training (`ServeArbiter`). The router sees every request of an island
begin and end. When a request arrives at an island whose service is idle, the island is held
for serving (controller/scheduler.py grants no slice to a job on it) and the slices in flight
of every training job resident there are cut at one step boundary on all their islands
(controller/dispatch.py's `Dispatcher.cut`); the request goes to the host once the cut is in
place, so no training step starts while it decodes (the step in progress ends first: a
request's time to first token includes at most the rest of one step). When the island's last
request ends, training gets the island back after `holdoff_s`, the latency policy's one knob:

  - a request's per-token latency is its whole time over its tokens, its wait for the first
    token included (time to first token + ms_per_token x the later tokens, over the tokens):
    training costs a request at most the rest of one step, before its first token. The time
    to first token is the router's, from before the island's cut to the first reply from the
    host: the wait for training to yield is in it (the host's own count starts after);
  - at each end of a busy period, the p99 of that latency over the island's last
    POLICY_REQUESTS requests is compared with the smallest `serve.target_p99_ms` of the serve
    jobs there: above it, holdoff doubles (from HOLDOFF_MIN_S, at most HOLDOFF_MAX_S), so
    training yields more: requests that come soon after others find the island free, not a
    training step in progress; below half of it, holdoff halves (under HOLDOFF_MIN_S: 0, an
    idle service costs training nothing).

A request is checked before anything happens to an island (its settings and stop strings,
workers/serve_engine.py's `check_sampling`; max_tokens against the job's serve.max_seq_len once
it serves): a request the host would refuse never cuts training. Only the prompt's length in
tokens is left to the host (the controller has no tokenizer). The host's stream is read by its
own task, whether or not the client reads the replies: the island is left (`leave`) when the
host's last reply arrives, not when a slow client has read it.

Each busy period (from the moment training has yielded the island to the end of its last
request) is recorded on the island's timeline under the serve job's id, beside the training
steps the hosts timed, so the dashboard's shares show serving beside training.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import grpc

from pathways_lite.v1 import controller_pb2, worker_pb2
from pathways_lite.workers.rpc import RpcRejection
from pathways_lite.workers.serve_engine import DEFAULT_MAX_TOKENS, QUEUE_FACTOR, check_sampling

from .islands import Island
from .states import IllegalTransitionError
from .store import JobStore

logger = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 10_000
# Seconds a replica whose host answered UNAVAILABLE gets no request while another is live
# (about the health probe's period: by then the job's recovery has seen it).
AVOID_FAILED_S = 5.0
GENERATE_TIMEOUT_S = 600.0
# Latency samples kept per job (the dashboard's serve page and `why`).
WINDOW = 4096
# The latency policy (module docstring): requests it looks back over, and holdoff's range.
POLICY_REQUESTS = 200
HOLDOFF_MIN_S = 0.05
HOLDOFF_MAX_S = 1.0


def token_latency_p99(samples: Sequence[tuple[float, float, int]]) -> float:
    """The p99 over requests of (ttft ms, ms per later token, tokens) of their per-token
    latency: a request's whole time (its wait for the first token included) over its
    tokens."""
    if not samples:
        return 0.0
    values = sorted((ttft + max(0, n - 1) * per) / max(1, n) for ttft, per, n in samples)
    return values[min(len(values) - 1, int(0.99 * len(values)))]


@dataclasses.dataclass
class IslandService:
    """One island's serving as the controller sees it (ServeArbiter)."""

    busy: int = 0  # requests in flight to the island's serve replicas
    held: bool = False  # the scheduler grants its jobs no slice
    since_ns: int = 0  # when the current busy period began
    jobs: set[str] = dataclasses.field(default_factory=set)  # serve jobs in the period
    targets: dict[str, float] = dataclasses.field(default_factory=dict)
    holdoff_s: float = 0.0
    cut: asyncio.Future | None = None
    release: asyncio.TimerHandle | None = None
    served_s: float = 0.0
    periods: int = 0
    cuts: int = 0
    # (ttft ms, ms per token, tokens) of the island's recent requests.
    latency: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=POLICY_REQUESTS)
    )


class ServeArbiter:
    """Serving before training on shared islands (the module docstring's policy).

    Args:
        scheduler: holds an island's jobs back while it serves (`hold_for_serving`,
            `jobs_on`).
        dispatcher: cuts a training job's slices in flight (`running`, `cut`).
        record: called with (island, serve job, start ns, end ns, requests) for each busy
            period (the island timeline), or None.
    """

    def __init__(
        self,
        scheduler: Any,
        dispatcher: Any,
        record: Callable[[str, str, int, int, int], None] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.dispatcher = dispatcher
        self.record = record
        self.islands: dict[str, IslandService] = {}

    async def enter(self, island: str, job_id: str, target_ms: float) -> None:
        """A request of `job_id` is about to go to `island`: returns once no training step
        of a job resident there can start (their slices cut, the island held)."""
        st = self.islands.setdefault(island, IslandService())
        st.busy += 1
        if st.release is not None:
            st.release.cancel()
            st.release = None
        if st.busy == 1:
            st.since_ns, st.jobs = 0, set()
            if not st.held:
                st.held = True
                self.scheduler.hold_for_serving(island, True)
                st.cut = asyncio.ensure_future(self._cut_training(island, st))
        st.jobs.add(job_id)
        st.targets[job_id] = target_ms
        if st.cut is not None and not st.cut.done():
            await asyncio.shield(st.cut)
        if not st.since_ns:  # the island is serving's from now (training's steps ended)
            st.since_ns = time.time_ns()

    async def _cut_training(self, island: str, st: IslandService) -> None:
        """Cut the slices of the training jobs resident on `island` (never fails: a request
        is served even when a cut could not be made)."""
        try:
            jobs = [
                j
                for j in self.scheduler.jobs_on(island)
                if self.dispatcher.running(j) and j not in st.targets
            ]
        except KeyError:  # an island the scheduler does not know: nothing to cut
            return
        if not jobs:
            return
        results = await asyncio.gather(
            *(self.dispatcher.cut(j) for j in jobs), return_exceptions=True
        )
        for job_id, result in zip(jobs, results, strict=True):
            if isinstance(result, BaseException):
                logger.warning("cutting job %s for serving on %s: %r", job_id, island, result)
            elif result is not None:
                st.cuts += 1

    def leave(self, island: str, sample: tuple[float, float, int] | None) -> None:
        """A request on `island` ended (its latency `sample`, when it finished)."""
        st = self.islands.get(island)
        if st is None or st.busy <= 0:
            return
        if sample is not None:
            st.latency.append(sample)
        st.busy -= 1
        if st.busy:
            return
        end = time.time_ns()
        st.since_ns = st.since_ns or end  # left before its cut ended (a client gone)
        st.served_s += (end - st.since_ns) / 1e9
        st.periods += 1
        if self.record is not None:
            for job_id in sorted(st.jobs):
                self.record(island, job_id, st.since_ns, end, st.periods)
        self._adapt(st)
        if st.holdoff_s <= 0:
            self._release(island)
        else:
            st.release = asyncio.get_running_loop().call_later(st.holdoff_s, self._release, island)

    def _adapt(self, st: IslandService) -> None:
        targets = [t for j, t in st.targets.items() if t > 0]
        if not targets or not st.latency:
            return
        p99 = token_latency_p99(st.latency)
        target = min(targets)
        if p99 > target:
            st.holdoff_s = min(HOLDOFF_MAX_S, max(HOLDOFF_MIN_S, 2 * st.holdoff_s))
        elif p99 < target / 2 and st.holdoff_s > 0:
            st.holdoff_s = st.holdoff_s / 2 if st.holdoff_s / 2 >= HOLDOFF_MIN_S else 0.0

    def _release(self, island: str) -> None:
        st = self.islands.get(island)
        if st is None:
            return
        st.release = None
        if st.busy == 0 and st.held:
            st.held = False
            self.scheduler.hold_for_serving(island, False)

    def forget(self, job_id: str) -> None:
        """A serve job stopped: its target no longer counts."""
        for st in self.islands.values():
            st.targets.pop(job_id, None)

    def stats(self, island: str) -> dict:
        st = self.islands.get(island)
        if st is None:
            return {}
        return {
            "busy": st.busy,
            "held": st.held,
            "holdoff_ms": st.holdoff_s * 1e3,
            "served_s": st.served_s,
            "busy_periods": st.periods,
            "training_cuts": st.cuts,
            "token_latency_p99_ms": token_latency_p99(st.latency),
        }


@dataclasses.dataclass
class Replica:
    island: Island
    inflight: int = 0
    # When its host last answered a request UNAVAILABLE (its engine failed, or it is going):
    # requests go to the other replicas for AVOID_FAILED_S (it answers at once, so its
    # `inflight` stayed lowest and it drew nearly every request until the probe saw it).
    failed_at: float = -math.inf


@dataclasses.dataclass
class Served:
    """A serve job as the router sees it."""

    job_id: str
    replicas: list[Replica]
    status: str = "loading"  # loading | serving | stopping
    reason: str = ""  # why it is stopping
    kv_cache_bytes: int = 0
    slots: int = 0  # cache slots over all replicas
    max_seq_len: int = 0  # positions per slot (serve.max_seq_len); 0: not told
    target_p99_ms: float = 0.0
    requests: int = 0
    tokens: int = 0
    # (unix seconds, ttft ms, ms per token, tokens) per finished request.
    finished: collections.deque = dataclasses.field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )


class ServeRouter:
    """The controller's serving jobs and the Generate stream."""

    def __init__(self, store: JobStore, arbiter: ServeArbiter | None = None) -> None:
        self.store = store
        self.arbiter = arbiter
        self.jobs: dict[str, Served] = {}

    def loading(self, job_id: str, islands: Sequence[Island]) -> Served:
        served = Served(job_id, [Replica(i) for i in islands])
        self.jobs[job_id] = served
        return served

    def serving(
        self,
        job_id: str,
        kv_cache_bytes: int,
        max_batch: int = 0,
        target_p99_ms: float = 0.0,
        *,
        max_seq_len: int = 0,
    ) -> None:
        """The job's replicas serve (`max_seq_len`: serve.max_seq_len, which requests are
        checked against here; 0 leaves that check to the hosts)."""
        served = self.jobs.get(job_id)
        if served is not None:
            served.status = "serving"
            served.kv_cache_bytes = kv_cache_bytes
            served.slots = max_batch * len(served.replicas)
            served.target_p99_ms = target_p99_ms
            served.max_seq_len = max_seq_len

    def stopping(self, job_id: str, reason: str) -> None:
        """The job's service stops (`reason`: cancelled, preempted, the controller stopping):
        no request is routed to it any more; it is answered UNAVAILABLE naming the reason."""
        served = self.jobs.get(job_id)
        if served is not None:
            served.status, served.reason = "stopping", reason
        if self.arbiter is not None:
            self.arbiter.forget(job_id)

    def _stopped_error(self, served: Served) -> RpcRejection:
        return RpcRejection(
            grpc.StatusCode.UNAVAILABLE,
            f"job {served.job_id!r} is not serving: {served.reason}.",
        )

    def stopped(self, job_id: str) -> None:
        self.jobs.pop(job_id, None)
        if self.arbiter is not None:
            self.arbiter.forget(job_id)

    def stats(self, job_id: str, window_s: float = 60.0) -> dict:
        """Requests/s, tokens/s, occupancy and latency percentiles over the last window."""
        served = self.jobs.get(job_id)
        if served is None:
            return {}
        cut = time.time() - window_s
        recent = [f for f in served.finished if f[0] >= cut]

        def pct(values: list[float], q: float) -> float:
            if not values:
                return 0.0
            values = sorted(values)
            return values[min(len(values) - 1, int(q * len(values)))]

        ttft = [f[1] for f in recent]
        per = [f[2] for f in recent]
        return {
            "status": served.status,
            "replicas": [r.island.id for r in served.replicas],
            "inflight": sum(r.inflight for r in served.replicas),
            "slots": served.slots,
            "requests": served.requests,
            "tokens": served.tokens,
            "requests_per_s": len(recent) / window_s,
            "tokens_per_s": sum(f[3] for f in recent) / window_s,
            "ttft_p50_ms": pct(ttft, 0.5),
            "ttft_p99_ms": pct(ttft, 0.99),
            "token_p50_ms": pct(per, 0.5),
            "token_p99_ms": pct(per, 0.99),
            "kv_cache_bytes": served.kv_cache_bytes,
            "target_p99_ms": served.target_p99_ms,
            "islands": {
                r.island.id: self.arbiter.stats(r.island.id)
                for r in served.replicas
                if self.arbiter is not None
            },
        }

    async def generate(
        self, request: controller_pb2.GenerateJobRequest
    ) -> AsyncIterator[controller_pb2.GenerateJobReply]:
        """Stream a generation from the job's least-loaded replica.

        Raises:
            JobNotFoundError (unknown job), IllegalTransitionError (not serving, loading),
            ValueError (bad prompt or setting), RpcRejection (the host's own answer).
        """
        max_tokens = check_request(request)
        record = self.store.find_job(request.job_id)
        served = self.jobs.get(record.id)
        if served is None:
            kind = record.spec.kind if record.spec.HasField("kind") else "train"
            if kind == "serve" and record.state.value == "running":
                raise IllegalTransitionError(
                    f"job {record.id!r} is loading its parameters; try again shortly."
                )
            hint = (
                " (use `pathways-lite sample` for a job that is not serving)"
                if kind != "serve"
                else ""
            )
            raise IllegalTransitionError(
                f"job {record.id!r} ({kind}, {record.state.value}) is not serving{hint}."
            )
        if served.status == "loading":
            raise IllegalTransitionError(f"job {record.id!r} is loading; try again shortly.")
        if served.status == "stopping":
            raise self._stopped_error(served)
        if max_tokens and served.max_seq_len and max_tokens >= served.max_seq_len:
            raise ValueError(
                f"max_tokens={max_tokens} leaves no room for a prompt in serve.max_seq_len="
                f"{served.max_seq_len} (at most {served.max_seq_len - 1}, less the prompt's "
                "tokens)."
            )
        live = [r for r in served.replicas if r.island.dead is None]
        if not live:
            raise RpcRejection(
                grpc.StatusCode.UNAVAILABLE,
                f"every replica of job {record.id!r} is on a dead island "
                f"({served.replicas[0].island.dead}); the job recovers or fails shortly.",
            )
        now = time.monotonic()
        healthy = [r for r in live if now - r.failed_at >= AVOID_FAILED_S] or live
        replica = min(healthy, key=lambda r: r.inflight)
        per_replica = served.slots // len(served.replicas)
        if per_replica and replica.inflight >= (1 + QUEUE_FACTOR) * per_replica:
            # Its host would refuse it (its cache's slots and its queue are full): refused
            # here, before training on the island is cut for it.
            raise RpcRejection(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the serve queue is full: job {record.id!r}'s least busy replica (island "
                f"{replica.island.id}) holds {replica.inflight} requests ({per_replica} "
                f"served at once, {QUEUE_FACTOR * per_replica} waiting); retry later.",
            )
        wire = worker_pb2.GenerateRequest(
            job_id=record.id,
            prompt=request.prompt,
            max_tokens=max_tokens,
            temperature=request.temperature,
            top_k=request.top_k,
            top_p=request.top_p,
            seed=request.seed,
            stop=list(request.stop),
        )
        # Closed here, not by the generator's finalizer whenever that runs: its `finally`
        # gives the replica's in-flight count back (a count left up refuses requests).
        async with contextlib.aclosing(self._relay(served, replica, wire)) as replies:
            async for reply in replies:
                yield reply

    async def _relay(
        self, served: Served, replica: Replica, wire: worker_pb2.GenerateRequest
    ) -> AsyncIterator[controller_pb2.GenerateJobReply]:
        """The host's stream to the caller. A task reads it (`pump`), so the island is left
        and the replica's count drops when the host's part ends (`host_done`, once), however
        slowly the caller reads."""
        island = replica.island.id
        host = replica.island.hosts[0]
        replies: asyncio.Queue = asyncio.Queue()  # (reply, ttft ms), an error, None: the end
        entered = done = False
        started = time.perf_counter()  # before the cut: the wait for training counts

        def host_done(sample: tuple[float, float, int] | None) -> None:
            nonlocal done
            if done:
                return
            done = True
            replica.inflight -= 1
            if entered and self.arbiter is not None:
                self.arbiter.leave(island, sample)

        async def pump(call: Any) -> None:
            ttft_ms: float | None = None
            sample = None
            try:
                async for reply in call:
                    if ttft_ms is None:
                        ttft_ms = (time.perf_counter() - started) * 1e3
                    if reply.done:
                        sample = (ttft_ms, reply.ms_per_token, reply.tokens)
                        served.tokens += reply.tokens
                        served.finished.append((time.time(), *sample))
                        host_done(sample)
                    replies.put_nowait((reply, ttft_ms))
                    if reply.done:  # whole: an error after it (a channel closing) is not its
                        break
            except Exception as e:  # noqa: BLE001 - raised to the caller in order
                if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.UNAVAILABLE:
                    replica.failed_at = time.monotonic()
                replies.put_nowait(e)
            finally:
                host_done(sample)
                replies.put_nowait(None)

        call = pumping = None
        replica.inflight += 1
        served.requests += 1
        try:
            if self.arbiter is not None:
                # Training on the island yields first (its slices cut at a step boundary).
                entered = True
                await self.arbiter.enter(island, served.job_id, served.target_p99_ms)
            if served.status == "stopping":  # stopped while training yielded the island
                raise self._stopped_error(served)
            call = host.stub.Generate(wire, timeout=GENERATE_TIMEOUT_S, metadata=host.metadata())
            pumping = asyncio.ensure_future(pump(call))
            finished = False
            while (item := await replies.get()) is not None:
                if isinstance(item, BaseException):
                    raise item
                reply, ttft_ms = item
                finished = finished or reply.done
                yield controller_pb2.GenerateJobReply(
                    text=reply.text,
                    token=reply.token,
                    done=reply.done,
                    finish_reason=reply.finish_reason,
                    tokens=reply.tokens,
                    ttft_ms=ttft_ms if reply.done else 0.0,
                    ms_per_token=reply.ms_per_token,
                    island=island,
                    job_id=served.job_id,
                )
            if not finished:
                # The host's stream ended without its last reply: its channel was closed
                # under the read (the island died), never a generation that ended. Routed
                # around as one that failed UNAVAILABLE is.
                replica.failed_at = time.monotonic()
                raise RpcRejection(
                    grpc.StatusCode.UNAVAILABLE,
                    f"island {island} of job {served.job_id!r} stopped answering before the "
                    "generation ended (its host died?); try again.",
                )
        except grpc.aio.AioRpcError as e:
            code = e.code()
            if served.status == "stopping" and served.reason not in (e.details() or ""):
                # It reached the host as its service stopped: the reason, not the host's
                # "not serving" or "unloaded".
                raise self._stopped_error(served) from None
            if code == grpc.StatusCode.NOT_FOUND:  # unloaded under us: not serving any more
                code = grpc.StatusCode.UNAVAILABLE
            raise RpcRejection(code, e.details() or str(code)) from None
        except grpc.aio.UsageError as e:  # the host's channel closed (its island died)
            replica.failed_at = time.monotonic()
            raise RpcRejection(
                grpc.StatusCode.UNAVAILABLE,
                f"island {island} of job {served.job_id!r} is not reachable: {e}",
            ) from None
        finally:
            if pumping is not None:
                pumping.cancel()
            if call is not None:
                call.cancel()  # a client that went away frees its slot on the host
            host_done(None)


def check_request(request: controller_pb2.GenerateJobRequest) -> int:
    """A request's own fields, before its job is looked up or any island cut; returns its
    max_tokens (0: DEFAULT_MAX_TOKENS, or as many as the prompt leaves room for, decided by
    the host that tokenizes it).

    Raises:
        ValueError: naming the field and its value.
    """
    if not request.prompt:
        raise ValueError("prompt is empty; give some text to continue.")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"prompt is {len(request.prompt)} characters; at most {MAX_PROMPT_CHARS}.")
    max_tokens = request.max_tokens
    if max_tokens < 0:
        raise ValueError(f"max_tokens={request.max_tokens} must be >= 1 (0: {DEFAULT_MAX_TOKENS}).")
    check_sampling(
        temperature=request.temperature,
        top_k=request.top_k,
        top_p=request.top_p,
        seed=request.seed,
        stop=request.stop,
    )
    return max_tokens
