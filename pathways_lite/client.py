"""The Python client of the controller: submit, get, list, cancel, watch jobs; list islands.

`Client(state_dir=...)` finds the controller through `<state_dir>/controller.json`;
`Client(address="127.0.0.1:port")` talks to a given address. The controller's wire version is
checked at connect. Errors are `ClientError`s whose message is the controller's sentence.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from pathways_lite.controller.service import CONTROLLER_WIRE_VERSION
from pathways_lite.controller.store import JobState
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

from .local import default_state_dir, read_address

logger = logging.getLogger(__name__)

TERMINAL = {"succeeded", "failed", "cancelled"}


class ClientError(Exception):
    """A failed controller call; `code` is its gRPC status (None when not a call)."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


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
        "generation": job.generation,
    }
    for name in ("created_at", "started_at", "finished_at"):
        if job.HasField(name):
            out[name] = getattr(job, name).ToJsonString()
    return out


def island_to_dict(island: controller_pb2.Island) -> dict[str, Any]:
    return {
        "id": island.id,
        "devices": island.devices,
        "job_ids": list(island.job_ids),
        "hosts": [
            json_format.MessageToDict(h, preserving_proto_field_name=True)
            | {"devices": h.devices, "port": h.port, "pid": h.pid}
            for h in island.hosts
        ],
    }


class Client:
    """A connection to one controller.

    Args:
        state_dir: the cluster's state directory (default: $PATHWAYS_LITE_STATE or
            ~/.pathways_lite); ignored when `address` is given.
        address: the controller's `host:port`.
        timeout_s: deadline of unary calls.

    Raises:
        ClientError: no controller found, it does not answer, or its wire version differs.
    """

    def __init__(
        self,
        state_dir: str | Path | None = None,
        *,
        address: str | None = None,
        timeout_s: float = 30.0,
    ) -> None:
        if address is None:
            try:
                address = read_address(state_dir or default_state_dir())
            except RuntimeError as e:
                raise ClientError(str(e)) from None
        self.address = address
        self.timeout_s = timeout_s
        self._channel = grpc.insecure_channel(address)
        self._stub = controller_pb2_grpc.ControllerServiceStub(self._channel)
        info = self.info()
        if info.wire_version.version != CONTROLLER_WIRE_VERSION:
            self.close()
            raise ClientError(
                f"the controller at {address} speaks wire version {info.wire_version.version}, "
                f"this client speaks {CONTROLLER_WIRE_VERSION}; use matching pathways_lite "
                "versions."
            )

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout_s: float | None = None) -> Any:
        try:
            return method(request, timeout=timeout_s or self.timeout_s)
        except grpc.RpcError as e:
            raise ClientError(_details(e, self.address), e.code()) from None

    def info(self) -> controller_pb2.ControllerInfoReply:
        return self._call(self._stub.Info, controller_pb2.ControllerInfoRequest())

    def submit(
        self, spec: controller_pb2.JobSpec, *, validate_only: bool = False, request_id: str = ""
    ) -> controller_pb2.Job:
        """Submit a job spec (a JobSpec proto; see pathways_lite.spec to load YAML)."""
        request = controller_pb2.SubmitJobRequest(
            spec=spec, validate_only=validate_only, request_id=request_id
        )
        return self._call(self._stub.SubmitJob, request).job

    def get(self, job_id: str) -> controller_pb2.Job:
        return self._call(self._stub.GetJob, controller_pb2.GetJobRequest(job_id=job_id)).job

    def list(
        self, *, states: tuple[str, ...] = (), include_losses: bool = False, page_size: int = 0
    ) -> list[controller_pb2.Job]:
        """Every job (all pages), oldest first; `states` filters by name (`running`...)."""
        wire_states = [JobState(s).to_proto() for s in states]
        jobs, token = [], ""
        while True:
            reply = self._call(
                self._stub.ListJobs,
                controller_pb2.ListJobsRequest(
                    page_size=page_size,
                    page_token=token,
                    states=wire_states,
                    include_losses=include_losses,
                ),
            )
            jobs.extend(reply.jobs)
            token = reply.next_page_token
            if not token:
                return jobs

    def cancel(self, job_id: str, reason: str = "") -> controller_pb2.Job:
        request = controller_pb2.CancelJobRequest(job_id=job_id, reason=reason)
        return self._call(self._stub.CancelJob, request).job

    def watch(self, job_id: str, from_step: int = 0) -> Iterator[controller_pb2.WatchJobReply]:
        """The job's updates until it finishes (see WatchJob)."""
        try:
            yield from self._stub.WatchJob(
                controller_pb2.WatchJobRequest(job_id=job_id, from_step=from_step)
            )
        except grpc.RpcError as e:
            raise ClientError(_details(e, self.address), e.code()) from None

    def wait(self, job_id: str, timeout_s: float | None = None) -> controller_pb2.Job:
        """Follow the job until it finishes; returns its final record.

        Raises:
            ClientError: the stream broke, or `timeout_s` passed (DEADLINE_EXCEEDED).
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            try:
                kwargs = {} if deadline is None else {"timeout": deadline - time.monotonic()}
                for _ in self._stub.WatchJob(
                    controller_pb2.WatchJobRequest(job_id=job_id), **kwargs
                ):
                    pass
            except grpc.RpcError as e:
                raise ClientError(_details(e, self.address), e.code()) from None
            job = self.get(job_id)
            if state_name(job.state) in TERMINAL:
                return job

    def islands(self) -> list[controller_pb2.Island]:
        return list(self._call(self._stub.ListIslands, controller_pb2.ListIslandsRequest()).islands)

    def logs(self, job_id: str, *, tail: int = 0, follow: bool = False) -> Iterator[Any]:
        """The job's log records (LogRecord), the newest `tail` of the buffer, then new ones."""
        try:
            for reply in self._stub.StreamLogs(
                controller_pb2.StreamLogsRequest(job_id=job_id, tail=tail, follow=follow)
            ):
                yield reply.record
        except grpc.RpcError as e:
            raise ClientError(_details(e, self.address), e.code()) from None


def _details(error: grpc.RpcError, address: str) -> str:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return f"the controller at {address} is not reachable ({error.details()})."
    return error.details() or f"{code.name} from the controller at {address}."
