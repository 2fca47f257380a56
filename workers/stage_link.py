"""Host-to-host links between pipeline stages: activations forward, their gradients backward.

Host i of replica r's island of stage s talks to host i of replica r's island of stages s - 1
and s + 1 (and, for the embedding's two gradient contributions and the step's scalars, of
every stage). Everything rides the peers' ExchangeGradients stream as float32 chunks filed in
the receiving host's `Mailbox` (workers/exchange.py) under phases of their own:

    PHASE_ACT     stage s -> s + 1   microbatch m's output activation (B_m, T, D), part = m
    PHASE_GRAD    stage s -> s - 1   the gradient of stage s's input for microbatch m, part = m
    PHASE_EMBED   first <-> last     the embedding gradient (summed over microbatches), part = stage
    PHASE_SCALARS every -> every     (gradient sum of squares, loss) after the replicas' mean,
                                     part = the sending stage

`source_island` is the replica index (the same on both ends), so the worker service's check
that it is below num_islands (the stage's replicas) holds. Nothing goes through the controller.
Each receive waits at most `timeout_s` from the moment it starts waiting, and each send has
`timeout_s` from the moment it starts (never one deadline for the whole step: a step's compute,
however long, uses up none of its waits); a peer that never sends fails the step with a
`StageTimeoutError` naming the stage, its host and the microbatch, and `Abort` (the mailbox's)
releases the waits as it does the gradient exchange's.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Sequence
from typing import Any

import grpc
import numpy as np

from .exchange import (
    ExchangeAbortedError,
    ExchangeError,
    ExchangeTimeoutError,
    Mailbox,
    Peers,
    _chunks,
)

logger = logging.getLogger(__name__)

PHASE_ACT = 20
PHASE_GRAD = 21
PHASE_EMBED = 22
PHASE_SCALARS = 23
CHUNK_ELEMENTS = 1 << 18  # float32 values per chunk message (1 MiB of payload)
PHASE_NAMES = {
    PHASE_ACT: "activations",
    PHASE_GRAD: "activation gradients",
    PHASE_EMBED: "embedding gradients",
    PHASE_SCALARS: "step scalars",
}


class StageTimeoutError(ExchangeTimeoutError):
    """A neighbouring stage sent nothing within the wait's deadline."""


class StageLink:
    """One job's links to the other stages on one host, called from the runtime thread.

    Args:
        loop: the worker service's event loop (where streams and the mailbox live).
        mailbox, peers: the service's exchange mailbox and peer channels.
        job_id, generation: the job.
        replica: this island's replica index (the same in every stage's island it talks to).
        stage: this island's stage.
        addresses: host:port of this host's counterpart in every stage, stage order.
        timeout_s: deadline of one receive (from when it starts waiting) and of one send
            (from when it starts).
    """

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        mailbox: Mailbox,
        peers: Peers,
        *,
        job_id: str,
        generation: int,
        replica: int,
        stage: int,
        addresses: Sequence[str],
        timeout_s: float,
    ) -> None:
        self.loop = loop
        self.mailbox = mailbox
        self.peers = peers
        self.job_id = job_id
        self.generation = generation
        self.replica = replica
        self.stage = stage
        self.addresses = list(addresses)
        self.timeout_s = timeout_s
        self.step = 0
        self.bytes_sent = 0
        self.activation_bytes_sent = 0  # PHASE_ACT and PHASE_GRAD only
        self._sends: list[tuple[int, concurrent.futures.Future]] = []

    def begin(self, step: int) -> None:
        """Start a step."""
        self.step = step
        self.bytes_sent = 0
        self.activation_bytes_sent = 0
        self._sends = []

    def _head(self, phase: int) -> dict[str, Any]:
        return dict(
            job_id=self.job_id,
            generation=self.generation,
            step=self.step,
            source_island=self.replica,
            phase=phase,
        )

    async def _send(self, stage: int, chunks: list[bytes], payload: int, what: str) -> int:
        address = self.addresses[stage]
        try:
            await self.peers.send_serialized(address, chunks, self.timeout_s)
        except grpc.aio.AioRpcError as e:
            if e.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise StageTimeoutError(
                    f"sending {what} of job {self.job_id!r} step {self.step} to stage {stage} "
                    f"(host {address}) did not finish within {self.timeout_s:.1f} s."
                ) from None
            if e.code() == grpc.StatusCode.ABORTED:
                raise ExchangeAbortedError(e.details()) from None
            raise ExchangeError(
                f"sending {what} of job {self.job_id!r} step {self.step} to stage {stage} "
                f"(host {address}) failed: {e.code().name}: {e.details()}"
            ) from None
        return payload

    def send(self, stage: int, phase: int, part: int, values: np.ndarray, what: str) -> None:
        """Start sending `values` (float32) to `stage`; `finish` waits for every send."""
        # Never cast here: a stage's output is float32 by design (model/pipeline.LINK_DTYPE),
        # and a silent cast would hide a stage that computes in another dtype.
        assert values.dtype == np.float32, f"{what} are {values.dtype}, not float32"
        flat = np.ascontiguousarray(values).reshape(-1)
        chunks = _chunks(self._head(phase), flat, part)
        send = self._send(stage, chunks, 4 * flat.size, what)
        self._sends.append((phase, asyncio.run_coroutine_threadsafe(send, self.loop)))

    async def _wait(self, key: tuple, stage: int, what: str, deadline: float) -> Any:
        try:
            return await self.mailbox.wait(key, deadline - time.monotonic())
        except ExchangeTimeoutError:
            raise StageTimeoutError(
                f"job {self.job_id!r} step {self.step}: stage {self.stage} (replica "
                f"{self.replica}) got no {what} from stage {stage} (host "
                f"{self.addresses[stage]}) within {self.timeout_s:.1f} s; that stage may be "
                "hung or dead."
            ) from None

    def receive(self, stage: int, phase: int, part: int, what: str) -> np.ndarray:
        """The float32 values `stage` sent under (phase, part) this step (blocking; waits
        at most `timeout_s` from now)."""
        key = (self.job_id, self.generation, self.step, phase, self.replica, part, 0)
        deadline = time.monotonic() + self.timeout_s
        future = asyncio.run_coroutine_threadsafe(self._wait(key, stage, what, deadline), self.loop)
        return future.result()

    def finish(self) -> int:
        """Wait for this step's sends; returns the payload bytes sent."""
        for phase, future in self._sends:
            sent = future.result()
            self.bytes_sent += sent
            if phase in (PHASE_ACT, PHASE_GRAD):
                self.activation_bytes_sent += sent
        self._sends = []
        return self.bytes_sent

    def abandon(self) -> None:
        """A failed step: cancel its sends still in flight."""
        for _, future in self._sends:
            future.cancel()
        self._sends = []
