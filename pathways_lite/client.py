"""The wire client of the controller: one method per ControllerService rpc, wire records out.

`ControllerClient(state_dir=...)` finds the controller through `<state_dir>/controller.json`
and its access token in `<state_dir>/token`; `ControllerClient(address="127.0.0.1:port",
token=...)` talks to a given address. Every call carries the token (`authorization: Bearer
...`). The controller's wire version is checked at connect. Errors are `ClientError`s whose
message is the controller's sentence (a deadline that passed names the rpc, its limit and
the address). A submission carries an idempotency key (`request_id`), so the retry of one
whose answer was lost (UNAVAILABLE, DEADLINE_EXCEEDED) returns the first job, never a second.
Streams (`watch`, `logs`) do not reconnect: after a standby takeover the new controller serves
at another address, and a caller starts a new client there. The CLI uses it directly; the
public `pathways_lite.Client` (sdk.py) wraps it with job handles and plain dicts. It imports
only the wire and the small shared modules of the controller (states, wire versions, the
token file), never the server.
"""

from __future__ import annotations

import collections
import json
import logging
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grpc

from pathways_lite.controller import auth
from pathways_lite.controller.options import ADDRESS_FILE
from pathways_lite.controller.states import JobState
from pathways_lite.controller.wire import CONTROLLER_WIRE_VERSION
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

from .local import default_state_dir, read_address

logger = logging.getLogger(__name__)

TERMINAL = {"succeeded", "failed", "cancelled"}
# A submission whose answer did not come may have created its job: retried with its key.
SUBMIT_RETRIED = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
SUBMIT_ATTEMPTS = 3
SUBMIT_RETRY_DELAY_S = 1.0
# How long a broken stream (watch, wait, logs --follow) waits for the state dir to name a
# controller that answers: a standby's takeover, a restarted controller.
RECONNECT_S = 60.0
# A job's full record carries every step's loss (8 bytes a step): past gRPC's default 4 MiB
# reply limit after 524,288 steps, which failed GetJob (and `wait`, `--follow`) on any long job.
MAX_REPLY_BYTES = 1 << 30
# A follower (watch, wait, logs --follow, generate) of a controller whose machine vanished (no
# FIN, no RST reaches it) waited for ever on a quiet stream: while a call is open, the channel
# pings the controller every KEEPALIVE_S and fails the call UNAVAILABLE when a ping goes
# unanswered for KEEPALIVE_TIMEOUT_S (then a follower of the state dir looks for the next
# controller, `_reconnect`). The controller accepts pings at any rate.
KEEPALIVE_S = 30.0
KEEPALIVE_TIMEOUT_S = 10.0


def channel_options(keepalive_s: float = KEEPALIVE_S) -> tuple[tuple[str, int], ...]:
    """The options of a channel to the controller (replies up to 1 GiB, keepalive pings
    every `keepalive_s` while a call is open)."""
    return (
        ("grpc.max_receive_message_length", MAX_REPLY_BYTES),
        ("grpc.keepalive_time_ms", int(keepalive_s * 1000)),
        ("grpc.keepalive_timeout_ms", int(min(KEEPALIVE_TIMEOUT_S, keepalive_s) * 1000)),
        # (gRPC core >= 1.6x times a ping out by this one, one minute by default.)
        ("grpc.http2.ping_timeout_ms", int(min(KEEPALIVE_TIMEOUT_S, keepalive_s) * 1000)),
        # Pings go on while a stream is quiet (the default stops after two without data).
        ("grpc.http2.max_pings_without_data", 0),
    )


RECONNECT_POLL_S = 0.5
# The log records a followed stream asks again for after a reconnect (those it printed are
# skipped): the new controller's buffer may hold lines the old one had not sent yet.
LOGS_RESUME_TAIL = 1000


class ClientError(Exception):
    """A failed controller call; `code` is its gRPC status (None when not a call)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class SubmitUnanswered(ClientError):
    """No try of a submission got an answer: its job may exist. `reason` is the last try's
    error alone (the message adds the request id to submit again with)."""

    def __init__(self, message: str, code: grpc.StatusCode | None, reason: str) -> None:
        super().__init__(message, code)
        self.reason = reason


class ChainError(ClientError):
    """A chain refused part way (`submit_chain`); `submitted` holds the jobs created before
    the refusal, in the order they were submitted (they stay queued)."""

    def __init__(
        self, message: str, code: grpc.StatusCode | None, submitted: list[controller_pb2.Job]
    ) -> None:
        super().__init__(message, code)
        self.submitted = submitted


def check_seed(seed: int) -> int:
    """A sampling seed as the controller takes it (uint64).

    Raises:
        ValueError: outside [0, 2**64), naming it.
    """
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed={seed} must be in [0, 2**64).")
    return seed


def check_int32(field: str, value: int | None) -> int | None:
    """An int32 field of a request, checked here: protobuf's own error ("Value out of range:
    3000000000") names no field. None (the field unset) passes.

    Raises:
        ValueError: outside int32, naming the field.
    """
    if value is not None and not -(2**31) <= value < 2**31:
        raise ValueError(f"{field}={value} is out of range (at most {2**31 - 1}).")
    return value


def state_name(value: int) -> str:
    """`queued`, `running`... for a wire JobState."""
    return JobState.from_proto(value).value


def job_to_dict(job: controller_pb2.Job) -> dict[str, Any]:
    """A job record as plain JSON-able data (what `--json` prints)."""
    out: dict[str, Any] = {
        "id": job.id,
        "name": job.name,
        "state": state_name(job.state) if job.state else "unspecified",
        "losses": list(job.losses),
        "steps_completed": job.steps_completed,
        "steps": job.spec.train.steps,
        "reason": job.reason,
        "message": job.message,
        "islands": list(job.islands),
        "queue_position": job.queue_position,
        "jobs_ahead": list(job.jobs_ahead),
        "pending_reason": job.pending_reason,
        "generation": job.generation,
        "priority": job.spec.priority if job.spec.HasField("priority") else 0,
        "weight": job.spec.weight if job.spec.HasField("weight") else 1.0,
        "mfu": job.mfu,
        "phase": job.phase,
        "events": [
            {"time": e.time.ToJsonString(), "kind": e.kind, "message": e.message}
            for e in job.events
        ],
        "resumed_from_step": (job.resumed_from_step if job.HasField("resumed_from_step") else None),
        "kind": job.spec.kind or "train",
        "depends_on": list(job.depends_on),
        "init_checkpoint": job.init_checkpoint,
        "evals": [eval_to_dict(e) for e in job.evals],
    }
    if job.HasField("last_metrics"):
        out["last_metrics"] = metrics_to_dict(job.last_metrics)
    for name in ("created_at", "started_at", "finished_at"):
        if job.HasField(name):
            out[name] = getattr(job, name).ToJsonString()
    return out


def eval_to_dict(result: controller_pb2.EvalResult) -> dict[str, Any]:
    """One evaluation as `pathways-lite eval --json` prints it: {"step", "shots", "sources":
    {name: {"loss", "perplexity", "examples"[, "exact_match", "token_f1"]}}} (exact match
    and token F1 only for text-to-text sources)."""
    sources: dict[str, Any] = {}
    for name, e in sorted(result.sources.items()):
        entry: dict[str, Any] = {
            "loss": e.loss,
            "perplexity": e.perplexity,
            "examples": e.examples,
        }
        if e.HasField("exact_match"):
            entry["exact_match"] = e.exact_match
        if e.HasField("token_f1"):
            entry["token_f1"] = e.token_f1
        sources[name] = entry
    return {"step": result.step, "shots": result.shots, "sources": sources}


def metrics_to_dict(m: controller_pb2.StepMetrics) -> dict[str, Any]:
    """One step's metrics as plain JSON-able data."""
    return {
        "step": m.step,
        "loss": m.loss,
        "tokens_per_s": m.tokens_per_s,
        "step_time_s": m.step_time_s,
        "mfu": m.mfu,
        "time": m.time.ToJsonString() if m.HasField("time") else None,
    }


def log_to_dict(record: controller_pb2.LogRecord) -> dict[str, Any]:
    """One log record as plain JSON-able data."""
    return {
        "time": record.time.ToJsonString(),
        "source": record.source,
        "level": record.level,
        "logger": record.logger,
        "message": record.message,
    }


def island_to_dict(island: controller_pb2.Island) -> dict[str, Any]:
    """An island as plain JSON-able data: numbers as numbers (bytes as an integer)."""
    return {
        "id": island.id,
        "devices": island.devices,
        "job_ids": list(island.job_ids),
        "down": island.down,
        "peak_flops": island.peak_flops,
        "peak_flops_source": island.peak_flops_source,
        "hosts": [
            {
                "node": h.node,
                "address": h.address,
                "port": h.port,
                "pid": h.pid,
                "devices": h.devices,
                "device_kind": h.device_kind,
                "memory_bytes": h.memory_bytes,
                "wire_version": {"version": h.wire_version.version},
                "state": h.state,
            }
            for h in island.hosts
        ],
    }


def unbatched(
    replies: Iterable[controller_pb2.WatchJobReply],
) -> Iterator[controller_pb2.WatchJobReply]:
    """WatchJob's replies with every step of a batched one (`more_metrics`) as a reply of its
    own, numbered on from the batch's `seq` (0 stays 0: replayed)."""
    for reply in replies:
        if not reply.more_metrics:
            yield reply
            continue
        yield controller_pb2.WatchJobReply(time=reply.time, metrics=reply.metrics, seq=reply.seq)
        for i, m in enumerate(reply.more_metrics, 1):
            yield controller_pb2.WatchJobReply(
                time=m.time, metrics=m, seq=reply.seq + i if reply.seq else 0
            )


class ControllerClient:
    """A connection to one controller, speaking its wire records.

    Args:
        state_dir: the cluster's state directory (default: $PATHWAYS_LITE_STATE or
            ~/.pathways_lite); its controller.json gives the address unless `address` is
            given, and its token file the token unless `token` is given.
        address: the controller's `host:port`.
        token: the controller's access token.
        timeout_s: deadline of unary calls.

    Raises:
        ClientError: no controller found, no token, it does not answer, or its wire version
            differs.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        address: str | None = None,
        token: str | None = None,
        timeout_s: float = 30.0,
        keepalive_s: float = KEEPALIVE_S,
    ) -> None:
        self.state_dir = Path(state_dir or default_state_dir())
        # A client given its address keeps to it; one that read it follows the state dir
        # to the controller that serves it now (`_reconnect`).
        self.follows_state_dir = address is None
        if address is None:
            try:
                address = read_address(self.state_dir)
            except RuntimeError as e:
                raise ClientError(str(e)) from None
        if token is None:
            try:
                token = auth.read_token(auth.token_path(self.state_dir))
            except auth.TokenError as e:
                raise ClientError(f"{e} Pass token=... or the state dir of the cluster.") from None
        self.address = address
        self.timeout_s = timeout_s
        self._options = channel_options(keepalive_s)
        self._metadata = ((auth.METADATA_KEY, auth.bearer(token)),)
        self._channel = grpc.insecure_channel(address, options=self._options)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        self._check_wire(self.info())

    def _check_wire(self, info: controller_pb2.ControllerInfoReply) -> None:
        if info.wire_version.version != CONTROLLER_WIRE_VERSION:
            self.close()
            raise ClientError(
                f"the controller at {self.address} speaks wire version "
                f"{info.wire_version.version}, this client speaks {CONTROLLER_WIRE_VERSION}; "
                "use matching pathways_lite versions."
            )

    def close(self) -> None:
        self._channel.close()

    def _moved(self) -> bool:
        """Whether this client follows its state dir and that names another controller now
        (a reconnect to the same one would only close the channel other calls share)."""
        if not self.follows_state_dir:
            return False
        try:
            return read_address(self.state_dir) != self.address
        except RuntimeError:  # between two controllers
            return True

    def _reconnect(self, error: grpc.RpcError, until: float) -> bool:
        """After a stream ended UNAVAILABLE (its controller went away): connect to the
        controller the state dir names once one answers, until `until` (monotonic; a
        standby takes over in seconds). False when this client was given its address, the
        error is another, or none answered in time.

        Raises:
            ClientError: the controller found speaks another wire version.
        """
        if not self.follows_state_dir or error.code() != grpc.StatusCode.UNAVAILABLE:
            return False
        logger.warning(
            "the controller at %s went away (%s); waiting up to %.0f s for the one %s names",
            self.address,
            error.details(),
            max(0.0, until - time.monotonic()),
            self.state_dir,
        )
        while True:
            # Never at once: a controller that answers Info but fails the stream again is
            # not called in a tight loop.
            time.sleep(max(0.0, min(RECONNECT_POLL_S, until - time.monotonic())))
            if time.monotonic() >= until:
                return False
            try:
                address = read_address(self.state_dir)
            except RuntimeError:  # between two controllers: the record names a dead one
                continue
            channel = grpc.insecure_channel(address, options=self._options)
            stub = controller_pb2_grpc.ControllerServiceStub(channel)
            try:
                info = stub.Info(
                    controller_pb2.ControllerInfoRequest(),
                    timeout=max(0.1, min(self.timeout_s, 5.0, until - time.monotonic())),
                    metadata=self._metadata,
                )
            except grpc.RpcError:
                channel.close()
                continue
            self._channel.close()
            self._channel, self._stub, self.address = channel, stub, address
            self._check_wire(info)
            logger.warning("reconnected to the controller at %s (epoch %d)", address, info.epoch)
            return True

    def __enter__(self) -> ControllerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, rpc: str, request: Any, timeout_s: float | None = None) -> Any:
        """Call unary `rpc` (its name in the ControllerService) with the token."""
        timeout_s = timeout_s or self.timeout_s
        try:
            return getattr(self._stub, rpc)(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, rpc, timeout_s) from None

    def _error(self, error: grpc.RpcError, rpc: str, timeout_s: float | None) -> ClientError:
        return ClientError(_details(error, rpc, self.address, timeout_s), error.code())

    def info(self) -> controller_pb2.ControllerInfoReply:
        return self._call("Info", controller_pb2.ControllerInfoRequest())

    def submit(
        self, spec: controller_pb2.JobSpec, *, validate_only: bool = False, request_id: str = ""
    ) -> controller_pb2.Job:
        """Submit a job spec (a JobSpec proto; see pathways_lite.spec to load YAML).

        A call that gets no answer (UNAVAILABLE, DEADLINE_EXCEEDED: the controller may have
        created the job) is retried with the same `request_id` (a fresh key when none is
        given), which the controller answers with the job it created first.
        """
        request = controller_pb2.SubmitJobRequest(
            spec=spec, validate_only=validate_only, request_id=request_id or uuid.uuid4().hex
        )
        attempt = 1
        while True:
            try:
                return self._stub.SubmitJob(
                    request, timeout=self.timeout_s, metadata=self._metadata
                ).job
            except grpc.RpcError as e:
                if e.code() not in SUBMIT_RETRIED:
                    raise self._error(e, "SubmitJob", self.timeout_s) from None
                if attempt == SUBMIT_ATTEMPTS:
                    # (Not `_details`' sentence: "nothing was changed" of a busy database is
                    # true of the last try only.)
                    reason = (
                        f"no try of SubmitJob got an answer from the controller at "
                        f"{self.address} ({e.code().name}: {e.details()})."
                    )
                    raise SubmitUnanswered(
                        f"{reason} The job may have been created: submit the same spec "
                        f"again with request id {request.request_id} (`--request-id`) to get "
                        "it, not a second one.",
                        e.code(),
                        reason,
                    ) from None
                logger.warning("submit attempt %d of %d: %s", attempt, SUBMIT_ATTEMPTS, e.code())
                until = time.monotonic() + SUBMIT_RETRY_DELAY_S * attempt
                if self._moved():
                    # To the controller the state dir names now (a standby that took over
                    # shares the first one's database: it answers the request id the same).
                    self._reconnect(e, until)
                time.sleep(max(0.0, until - time.monotonic()))
            attempt += 1

    def submit_chain(
        self, specs: list[controller_pb2.JobSpec], *, request_id: str = ""
    ) -> list[controller_pb2.Job]:
        """Submit the specs of one chain (`submit a.yaml b.yaml ...`): a spec whose `after`
        or `init_from.job` names another spec of the chain is submitted after it, with that
        reference replaced by its id. Returns the jobs in the order of `specs`.

        Raises:
            SpecError: two specs share a name, or their references close a cycle; nothing
                is submitted then.
            ChainError: the controller refused a spec after others were submitted (its
                `submitted`; the message names them too).
            ClientError: the controller refused the first spec; nothing is submitted.

        The spec of file i is submitted with request id `<request_id>-<i>` (a fresh chain
        key when none is given): the same files submitted again with the same key get the
        jobs the first submission created.
        """
        from pathways_lite.spec import chain_order, with_job_ids

        request_id = request_id or uuid.uuid4().hex
        jobs: dict[int, controller_pb2.Job] = {}  # in submission order
        ids: dict[str, str] = {}
        for i in chain_order(specs):
            try:
                key = f"{request_id}-{i}"
                job = self.submit(with_job_ids(specs[i], ids), request_id=key)
            except ClientError as e:
                message = e.message
                if isinstance(e, SubmitUnanswered):  # the chain's key, not the spec's
                    message = (
                        f"{e.reason} Its job may have been created: submit the same files "
                        f"again with request id {request_id} (`--request-id`) to get the "
                        "chain's jobs, not second ones."
                    )
                    if not jobs:
                        raise SubmitUnanswered(
                            f"{specs[i].name}: {message}", e.code, e.reason
                        ) from None
                if not jobs:
                    raise
                done = ", ".join(f"{j.id} ({j.name})" for j in jobs.values())
                raise ChainError(
                    f"{specs[i].name}: {message} Submitted before it (still queued): {done}.",
                    e.code,
                    list(jobs.values()),
                ) from None
            ids[specs[i].name] = job.id
            jobs[i] = job
        return [jobs[i] for i in range(len(specs))]

    def get(self, job_id: str, *, summary: bool = False) -> controller_pb2.Job:
        """The job's record; with `summary`, without its per-step losses and events (cheap
        to poll however many steps the job has)."""
        request = controller_pb2.GetJobRequest(job_id=job_id, summary=summary)
        return self._call("GetJob", request).job

    def list(
        self,
        *,
        states: tuple[str, ...] = (),
        include_losses: bool = False,
        page_size: int = 0,
        limit: int = 0,
    ) -> list[controller_pb2.Job]:
        """Every job (all pages; the newest `limit` when > 0), newest first; `states` filters
        by name (`running`...)."""
        wire_states = [JobState(s).to_proto() for s in states]
        if limit > 0:
            page_size = min(page_size or limit, limit)
        jobs, token = [], ""
        while True:
            reply = self._call(
                "ListJobs",
                controller_pb2.ListJobsRequest(
                    page_size=page_size,
                    page_token=token,
                    states=wire_states,
                    include_losses=include_losses,
                ),
            )
            jobs.extend(reply.jobs)
            token = reply.next_page_token
            if limit > 0 and len(jobs) >= limit:
                return jobs[:limit]
            if not token:
                return jobs

    def drain(self, timeout_s: float = 600.0) -> list[controller_pb2.DrainedJob]:
        """Checkpoint and requeue every running and suspended job before a stop (Drain)."""
        return list(self._call("Drain", controller_pb2.DrainRequest(), timeout_s).jobs)

    def trace(self, job_id: str, timeout_s: float = 120.0) -> controller_pb2.TraceReply:
        """The execution logs of the hosts of a job's islands (Trace)."""
        request = controller_pb2.TraceRequest(job_id=job_id)
        return self._call("Trace", request, timeout_s)

    def cancel(self, job_id: str, reason: str = "") -> controller_pb2.Job:
        request = controller_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self._call("CancelJob", request).job

    def update(self, job_id: str, *, priority: int) -> controller_pb2.Job:
        """Re-prioritise a queued, running or suspended job; returns its new record."""
        request = controller_pb2.UpdateJobRequest(job_id=job_id, priority=priority)
        return self._call("UpdateJob", request).job

    def watch(self, job_id: str, from_step: int = 0) -> Iterator[controller_pb2.WatchJobReply]:
        """The job's updates until it finishes (see WatchJob). A caller that stops early
        (Ctrl-C, `break`) cancels the stream: none is left open on the channel. When the
        controller goes away, the stream goes on from the next step with the controller the
        state dir names next (`_reconnect`); its first reply is the job's record again."""
        next_step = from_step
        until = None  # the reconnect's limit, from the first failure since the last reply
        while True:
            call = self._stub.WatchJob(
                controller_pb2.WatchJobRequest(
                    job_id=job_id, from_step=next_step, batch_steps=True
                ),
                metadata=self._metadata,
            )
            try:
                for reply in unbatched(call):
                    until = None
                    if reply.HasField("metrics"):
                        next_step = reply.metrics.step + 1
                    yield reply
                return
            except grpc.RpcError as e:
                until = until or time.monotonic() + RECONNECT_S
                if not self._reconnect(e, until):
                    raise self._error(e, "WatchJob", None) from None
            finally:
                call.cancel()

    def wait(self, job_id: str, timeout_s: float | None = None) -> controller_pb2.Job:
        """Follow the job until it finishes; returns its final record.

        Raises:
            ClientError: the stream broke, or `timeout_s` passed (DEADLINE_EXCEEDED).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        until = None  # the reconnect's limit, from the first failure since the last stream
        while True:
            try:
                kwargs = {} if deadline is None else {"timeout": deadline - time.monotonic()}
                for _ in self._stub.WatchJob(
                    controller_pb2.WatchJobRequest(job_id=job_id, batch_steps=True),
                    metadata=self._metadata,
                    **kwargs,
                ):
                    until = None
            except grpc.RpcError as e:
                until = until or time.monotonic() + RECONNECT_S
                if not self._reconnect(e, until if deadline is None else min(until, deadline)):
                    raise self._error(e, "WatchJob", timeout_s) from None
                continue
            if state_name(self.get(job_id, summary=True).state) in TERMINAL:
                return self.get(job_id)

    def islands(self, *, include_steps: bool = False) -> list[controller_pb2.Island]:
        """Every island and its hosts (and its recent steps, who ran when, with
        `include_steps`)."""
        request = controller_pb2.ListIslandsRequest(include_steps=include_steps)
        return list(self._call("ListIslands", request).islands)

    def logs(self, job_id: str, *, tail: int = 0, follow: bool = False) -> Iterator[Any]:
        """The job's log records (LogRecord), the newest `tail` of the buffer, then new ones.
        Followed, the stream goes on with the controller the state dir names next when its
        controller goes away (`_reconnect`): the newest LOGS_RESUME_TAIL records of the new
        one's buffer but those of the last LOGS_RESUME_TAIL already given; records neither
        controller kept are missing."""
        given: collections.deque[tuple[int, str, str]] = collections.deque(maxlen=LOGS_RESUME_TAIL)
        skip: set[tuple[int, str, str]] = set()  # after a reconnect: those given before it
        until = None
        while True:
            try:
                for reply in self._stub.StreamLogs(
                    controller_pb2.StreamLogsRequest(job_id=job_id, tail=tail, follow=follow),
                    metadata=self._metadata,
                ):
                    until = None
                    record = reply.record
                    key = (record.time.ToNanoseconds(), record.source, record.message)
                    if key in skip:
                        skip.discard(key)
                        continue
                    if follow:
                        given.append(key)
                    yield record
                return
            except grpc.RpcError as e:
                until = until or time.monotonic() + RECONNECT_S
                if not (follow and self._reconnect(e, until)):
                    raise self._error(e, "StreamLogs", None) from None
                tail, skip = LOGS_RESUME_TAIL, set(given)

    def metrics(self, job_id: str) -> list[controller_pb2.StepMetrics]:
        """Every recorded step of the job, in step order (WatchJob's replay, then stops)."""
        want = self.get(job_id).steps_completed
        out: list[controller_pb2.StepMetrics] = []
        if want == 0:
            return out
        call = self._stub.WatchJob(
            controller_pb2.WatchJobRequest(job_id=job_id, batch_steps=True),
            metadata=self._metadata,
        )
        try:
            for update in unbatched(call):
                if update.HasField("metrics"):
                    out.append(update.metrics)
                    if len(out) >= want:
                        break
        except grpc.RpcError as e:
            raise self._error(e, "WatchJob", None) from None
        finally:
            call.cancel()
        return out

    def sample(
        self,
        job_id: str,
        prompt: str,
        *,
        max_new_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        seed: int = 0,
    ) -> controller_pb2.SampleJobReply:
        """Text generated from the running job's current parameters on its first island, or
        from an ended job's last checkpoint loaded on an island for the call."""
        request = controller_pb2.SampleJobRequest(
            job_id=job_id,
            prompt=prompt,
            max_new_tokens=check_int32("max_new_tokens", max_new_tokens),
            temperature=temperature,
            top_k=check_int32("top_k", top_k),
            seed=check_seed(seed),
        )
        return self._call("Sample", request, timeout_s=max(self.timeout_s, 300.0))

    def generate(
        self,
        job_id: str,
        prompt: str,
        *,
        max_tokens: int = 64,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 0.0,
        seed: int = 0,
        stop: Sequence[str] = (),
        timeout_s: float | None = None,
    ) -> Iterator[controller_pb2.GenerateJobReply]:
        """Stream a generation from a serving job (`kind: serve`): text pieces, then a final
        reply with done=true, the token count and the latencies.

        Raises:
            ClientError: NOT_FOUND, FAILED_PRECONDITION (not serving, or "loading"),
                RESOURCE_EXHAUSTED (its queue is full), INVALID_ARGUMENT, UNAVAILABLE (the
                service stopped or was preempted).
        """
        request = controller_pb2.GenerateJobRequest(
            job_id=job_id,
            prompt=prompt,
            max_tokens=check_int32("max_tokens", max_tokens),
            temperature=temperature,
            top_k=check_int32("top_k", top_k),
            top_p=top_p,
            seed=check_seed(seed),
            stop=list(stop),
        )
        timeout_s = timeout_s or max(self.timeout_s, 600.0)
        try:
            yield from self._stub.Generate(request, timeout=timeout_s, metadata=self._metadata)
        except grpc.RpcError as e:
            raise self._error(e, "Generate", timeout_s) from None

    def dashboard_url(self, *, with_token: bool = False) -> str:
        """The controller's dashboard URL (from controller.json); `with_token` appends the
        token, which the dashboard trades for a cookie on first visit.

        Raises:
            ClientError: the controller recorded no dashboard.
        """
        try:
            info = json.loads((self.state_dir / ADDRESS_FILE).read_text())
            url = str(info["dashboard"])
        except (OSError, ValueError, KeyError):
            raise ClientError(
                f"no dashboard is recorded in {str(self.state_dir / ADDRESS_FILE)!r}; is the "
                "controller running?"
            ) from None
        if with_token:
            url += "?token=" + self._metadata[0][1].split(" ", 1)[1]
        return url


# SQLite's words for a write that could not be made now, which the controller answers
# UNAVAILABLE (controller/service.py), alone or in its own sentence: a busy controller, not
# one out of reach.
_STORE_BUSY = (
    "database is locked",
    "database table is locked",
    "database or disk is full",
    "disk I/O error",
    "attempt to write a readonly database",
)


def _details(error: grpc.RpcError, rpc: str, address: str, timeout_s: float | None) -> str:
    """The sentence of a failed call: the controller's own, or what went wrong on the way."""
    code, details = error.code(), error.details()
    if code == grpc.StatusCode.UNAVAILABLE and any(w in (details or "") for w in _STORE_BUSY):
        # The controller answered: its database could not be written now.
        return (
            f"the controller at {address} could not write its job database now ({details}); "
            "nothing was changed: try again."
        )
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the controller at {address} is not reachable ({details})."
    # gRPC's own words for a deadline this client set; the controller's would be a sentence.
    if code == grpc.StatusCode.DEADLINE_EXCEEDED and details in ("", "Deadline Exceeded"):
        limit = f"within {timeout_s:g} s" if timeout_s else "before its deadline"
        return f"the controller at {address} did not answer {rpc} {limit} (DEADLINE_EXCEEDED)."
    return details or f"{code.name} from the controller at {address} ({rpc})."
