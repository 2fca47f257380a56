"""A stand-in ControllerService on a real gRPC port, for the client, CLI and demo tests that
need a controller's answers (refusals, lost answers, slow calls, broken streams) in
milliseconds rather than a cluster's start.

`serve_fake(state_dir)` writes the state dir a client reads (controller.json naming this
process, a 0600 token) and returns the servicer; its attributes steer the answers.
"""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc

from pathways_lite.controller.auth import ensure_token, token_path
from pathways_lite.controller.states import JobState
from pathways_lite.controller.wire import CONTROLLER_WIRE_VERSION
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc


class FakeController(controller_pb2_grpc.ControllerServiceServicer):
    """Creates every job succeeded; keeps what it was asked.

    Attributes:
        submits: every SubmitJobRequest received, in order.
        refuse: spec names answered INVALID_ARGUMENT.
        lose_answers: how many more submissions are recorded, then answered UNAVAILABLE (the
            job exists; the client never heard).
        get_delay_s: how long GetJob takes.
        get_unavailable: when set, GetJob answers UNAVAILABLE with these words.
        break_watch: WatchJob fails (INTERNAL) instead of ending.
        watch_steps: the steps WatchJob streams (those from the request's from_step), after
            the job's record, as metrics; `watch_requests` keeps the requests.
        gone_after_step: WatchJob ends UNAVAILABLE (the controller went away) after this step
            (-1: before its first reply).
        log_records: what StreamLogs streams: (time in ns, message) pairs of source "c";
            `logs_requests` keeps the requests.
        gone_after_log: StreamLogs ends UNAVAILABLE after this many records.
        islands: what ListIslands returns.
    """

    def __init__(self) -> None:
        self.submits: list[controller_pb2.SubmitJobRequest] = []
        self.jobs: dict[str, controller_pb2.Job] = {}
        self.by_key: dict[str, str] = {}
        self.refuse: set[str] = set()
        self.lose_answers = 0
        self.get_delay_s = 0.0
        self.get_unavailable = ""
        self.break_watch = False
        self.watch_steps: range = range(0)
        self.watch_requests: list[controller_pb2.WatchJobRequest] = []
        self.gone_after_step: int | None = None
        self.log_records: list[tuple[int, str]] = []
        self.logs_requests: list[controller_pb2.StreamLogsRequest] = []
        self.gone_after_log: int | None = None
        self.islands: list[controller_pb2.Island] = []
        self._lock = threading.Lock()

    def Info(self, request, context):
        reply = controller_pb2.ControllerInfoReply(version="fake")
        reply.wire_version.version = CONTROLLER_WIRE_VERSION
        return reply

    def SubmitJob(self, request, context):
        with self._lock:
            self.submits.append(request)
            if request.spec.name in self.refuse:
                context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"spec {request.spec.name!r} is refused."
                )
            job_id = self.by_key.get(request.request_id) if request.request_id else None
            if job_id is None:
                job_id = f"job-{len(self.jobs) + 1}"
                self.jobs[job_id] = controller_pb2.Job(
                    id=job_id,
                    name=request.spec.name,
                    state=JobState.SUCCEEDED.to_proto(),
                    spec=request.spec,
                )
                if request.request_id:
                    self.by_key[request.request_id] = job_id
            if self.lose_answers:
                self.lose_answers -= 1
                context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer")
            return controller_pb2.SubmitJobReply(job=self.jobs[job_id])

    def GetJob(self, request, context):
        time.sleep(self.get_delay_s)
        if self.get_unavailable:  # as the controller answers a write its database refused
            context.abort(grpc.StatusCode.UNAVAILABLE, self.get_unavailable)
        if request.job_id not in self.jobs:
            context.abort(grpc.StatusCode.NOT_FOUND, f"no job {request.job_id!r}.")
        return controller_pb2.GetJobReply(job=self.jobs[request.job_id])

    def WatchJob(self, request, context):
        self.watch_requests.append(request)
        if self.break_watch:
            context.abort(grpc.StatusCode.INTERNAL, "the stream broke.")
        if self.gone_after_step == -1:
            context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")
        job = self.jobs.get(request.job_id, controller_pb2.Job(id=request.job_id))
        yield controller_pb2.WatchJobReply(job=job)
        for step in self.watch_steps:
            if step < request.from_step:
                continue
            yield controller_pb2.WatchJobReply(metrics=controller_pb2.StepMetrics(step=step))
            if step == self.gone_after_step:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    def StreamLogs(self, request, context):
        self.logs_requests.append(request)
        records = self.log_records[-request.tail :] if request.tail else self.log_records
        for i, (ns, message) in enumerate(records):
            record = controller_pb2.LogRecord(source="c", level="INFO", message=message)
            record.time.FromNanoseconds(ns)
            yield controller_pb2.StreamLogsReply(record=record)
            if i + 1 == self.gone_after_log:
                context.abort(grpc.StatusCode.UNAVAILABLE, "Socket closed")

    def ListIslands(self, request, context):
        return controller_pb2.ListIslandsReply(islands=self.islands)


def serve_fake(state_dir: Path) -> tuple[FakeController, grpc.Server]:
    """Serve a FakeController on 127.0.0.1 and record it in `state_dir` as its controller."""
    fake = FakeController()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    controller_pb2_grpc.add_ControllerServiceServicer_to_server(fake, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    state_dir.mkdir(parents=True, exist_ok=True)
    ensure_token(token_path(state_dir))
    info = {
        "address": f"127.0.0.1:{port}",
        "pid": os.getpid(),
        "dashboard": f"http://127.0.0.1:{port + 1}/",
    }
    (state_dir / "controller.json").write_text(json.dumps(info))
    return fake, server
