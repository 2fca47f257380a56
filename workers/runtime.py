"""The per-job runtime interface of an island host: `JobRuntime` and the values it trades.

The worker service (workers/service.py) never touches JAX itself: it validates requests,
enforces ordering, and calls a `JobRuntime` from a worker thread. A runtime owns one job's
compiled step and its resident state on the island's mesh. The runtimes themselves live in
their own files (workers/probe_runtime.py, workers/palm_runtime.py) and workers/runtimes.py
picks one per model preset; this file imports neither.
"""

from __future__ import annotations

import abc
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RuntimeUnavailableError(Exception):
    """The host has no runtime for the requested model (a wrong state, not a bad request)."""


class JobSpecError(ValueError):
    """A job spec field has a value the runtime cannot accept; the message names it."""


@dataclass(frozen=True)
class MeshSpec:
    """Shape of the island's (`data`, `model`) mesh."""

    data: int
    model: int

    @property
    def size(self) -> int:
        return self.data * self.model


@dataclass(frozen=True)
class IslandJobSpec:
    """Everything an island host needs to build one job (the decoded LoadJobRequest).

    Attributes:
        job_id: The controller's id of the job.
        generation: Restart generation of the job.
        preset: Model preset name (names the model family; PaLM reads `model_config`).
        overrides: Probe job only: its config overrides (field -> value).
        mesh: Mesh shape inside the island.
        model_config: PaLM: every PalmConfig field, resolved by the controller.
        optim_config: OptimConfig fields (absent ones take the defaults).
        data: Data spec (source, paths, tokenizer_hash).
        data_hash: Content hash of the prepared dataset.
        seed: Seed of initialisation and data order.
        global_batch: Examples per step over all islands.
        seq_len: Tokens per example.
        island_index: This island's index among the job's islands.
        num_islands: Islands the job spans.
        peers: host:port of this host's counterpart in every island (island order).
        digest_every: compare parameter digests with the peers every this many steps.
        exchange_timeout_s: deadline of one gradient exchange.
        exchange_bucket_bytes: gradient bucket size of the overlapped exchange.
        exchange_overlap: exchange buckets during the backward pass (else after it).
    """

    job_id: str
    generation: int
    preset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    mesh: MeshSpec = MeshSpec(1, 1)
    model_config: Mapping[str, Any] = field(default_factory=dict)
    optim_config: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    data_hash: str = ""
    seed: int = 0
    global_batch: int = 1
    seq_len: int = 1
    island_index: int = 0
    num_islands: int = 1
    peers: tuple[str, ...] = ()
    digest_every: int = 0
    exchange_timeout_s: float = 0.0
    exchange_bucket_bytes: int = 0
    exchange_overlap: bool = False
    # A pipeline job's stage placement (workers/pipeline.py's PipelinePlacement), or None.
    pipeline: Any = None
    # restore_from / init_from is a pipeline job's checkpoint split by stage: the block range
    # of every stage (workers/pipeline.py's read_stage_parts); () for a whole model's.
    restore_stage_bounds: tuple[tuple[int, int], ...] = ()
    init_stage_bounds: tuple[tuple[int, int], ...] = ()

    @property
    def island_batch(self) -> int:
        """Examples this island reads per step."""
        return self.global_batch // self.num_islands

    def island_example_ids(self, step: int) -> list[int]:
        """Ids of this island's examples of `step`: its contiguous slice of the global batch."""
        first = step * self.global_batch + self.island_index * self.island_batch
        return list(range(first, first + self.island_batch))


@dataclass(frozen=True)
class MemoryReport:
    """Device memory of a compiled step, bytes per device.

    `resident_bytes` is what the job keeps on the devices while the program runs without
    passing it in (a PaLM job's optimizer state during its gradient program), so
    `total_bytes` is what the job holds at that program's peak.
    """

    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    alias_bytes: int = 0
    resident_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return max(
            0,
            self.argument_bytes
            + self.output_bytes
            + self.temp_bytes
            + self.generated_code_bytes
            - self.alias_bytes
            + self.resident_bytes,
        )


@dataclass(frozen=True)
class StepResult:
    """What one step reports: its loss, the example ids read, and host-side phase seconds."""

    loss: float
    example_ids: Sequence[int]
    phase_s: Mapping[str, float] = field(default_factory=dict)
    # Set by runtimes that exchange gradients between islands.
    param_digest: bytes = b""
    exchange_s: float = 0.0
    exchange_bytes_sent: int = 0
    # A masked (mixture) step's global stats: model.loss.masked_loss_sums's vector, summed
    # over every island.
    loss_stats: Sequence[float] = ()
    # A pipeline stage's (workers/pipeline.py): schedule seconds waiting on the neighbours,
    # activation bytes sent, the most bytes of forward residuals stashed at once, the schedule's
    # seconds.
    pipeline_wait_s: float = 0.0
    stage_bytes_sent: int = 0
    peak_stash_bytes: int = 0
    pipeline_s: float = 0.0
    # (name, start ns, end ns) of the step's parts, for the execution log's trace slices.
    slices: Sequence[tuple[str, int, int]] = ()


@dataclass(frozen=True)
class Digest:
    """A digest of a job's parameters."""

    sha256: bytes
    steps_applied: int
    num_params: int


class JobRuntime(abc.ABC):
    """One job resident on an island: its compiled step and its state on the mesh.

    Methods are blocking and are called from one worker thread at a time. A runtime that
    trains across islands gets its `exchange` (workers/exchange.py's JobExchange) from the
    service before `load`; `supports_exchange` says whether it can use one.
    """

    supports_exchange = False

    def __init__(self, spec: IslandJobSpec) -> None:
        self.spec = spec
        self.exchange: Any = None

    @abc.abstractmethod
    def estimate_bytes_per_device(self) -> int:
        """Bytes per device the job will hold, computed without allocating anything."""

    @abc.abstractmethod
    def data_hash(self) -> str:
        """Content hash of the data this job reads; LoadJob's data_hash must equal it."""

    def compile(self) -> MemoryReport | None:
        """Compile the step without touching device state, ahead of `load`; the host runs it
        off its runtime thread, so the island's other jobs keep stepping meanwhile. Returns
        the compiled step's memory analysis, or None for a runtime that compiles in `load`."""
        return None

    @abc.abstractmethod
    def load(self, *, dry_run: bool) -> MemoryReport:
        """Build and compile the step (unless `compile` did); unless `dry_run`, initialise
        the state on the mesh."""

    @abc.abstractmethod
    def run_step(self, step: int) -> StepResult:
        """Run training step `step` on this island's slice of the global batch."""

    @abc.abstractmethod
    def digest(self) -> Digest:
        """Digest of the current parameters."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Drop every device buffer of the job."""

    # Suspend/resume (multi-tenancy preemption): runtimes that support it override these.
    suspended = False

    def suspend(self) -> int:
        """Move the job's state off the devices into host memory; returns its host bytes."""
        raise RuntimeUnavailableError(f"job {self.spec.job_id!r}'s runtime cannot be suspended.")

    def resume(self) -> None:
        """Put the state `suspend` moved to the host back on the devices, bit for bit."""
        raise RuntimeUnavailableError(f"job {self.spec.job_id!r}'s runtime cannot be resumed.")

    def device_arrays(self) -> list[Any]:
        """The job's arrays resident on the devices (for live-array accounting)."""
        return []

    def host_bytes(self) -> int:
        """Bytes of the job's state held in host memory while suspended."""
        return 0


def memory_report(compiled: Any) -> MemoryReport:
    """Read XLA's compiled memory analysis (absent on some backends: zeros then)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return MemoryReport()
    return MemoryReport(
        argument_bytes=int(getattr(analysis, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(analysis, "output_size_in_bytes", 0)),
        temp_bytes=int(getattr(analysis, "temp_size_in_bytes", 0)),
        generated_code_bytes=int(getattr(analysis, "generated_code_size_in_bytes", 0)),
        alias_bytes=int(getattr(analysis, "alias_size_in_bytes", 0)),
    )


def fetch_global(array: Any) -> np.ndarray:
    """The global value of a (possibly multi-host) array on this host."""
    if array.is_fully_addressable or array.is_fully_replicated:
        if array.is_fully_addressable:
            return np.asarray(array)
        return np.asarray(array.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
