"""Host facts: what an island host is (its devices, address, memory budget, wire version).

Gathered once when a host starts (`HostMetadata`) and reported by the Info rpc (`info_reply`,
with the host's current state); nothing here changes while the host serves, except the port,
filled in when the server binds.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pathways_lite.v1 import common_pb2, worker_pb2

# Bumped on every incompatible change of worker.proto; the controller compares it at connect.
# 3: ExchangeGradients moved from WorkerService to its own ExchangeService.
# 4: RunStep carries a mixture's weights and its reply the global (sum, count) loss stats; a
#    mixture dataset folder is a LoadJob data source (an older host would ignore the weights).
# 5: LoadJob init_from (parameters only) and the Evaluate rpc.
# 6: RunSlice: a slice of steps streamed back step by step (ExecutionEntry's
#    received_unix_ns).
# 7: SkipSeq when_due/count: a cancelled slice's numbers skipped as their turns come.
# 8: RunSlice streams RunSliceReply: several steps' replies per message.
# 9: LoadJob pipeline (StagePlacement): an island runs one stage of a pipeline job; its
#    activations and gradients travel host to host on ExchangeGradients phases 20-23.
# 10: StartServe/StopServe/Generate (kind: serve); a training step waits while the host's
#    service decodes.
# 11: peer restore: LoadJob keep_state, resume_step, restore_peers; ExchangeService FetchState.
# 12: GradientChunk.bucket: the gradient exchange in buckets overlapped with the backward pass
#    (LoadJob exchange_bucket_bytes, exchange_overlap).
# 14: CutSlice (a job's slices cut at one step boundary on all its islands, for serving);
#    only a single-island job's step waits at the host's serve gate.
# 15: LoadJob restore_stage_bounds / init_stage_bounds: restore_from / init_from is a pipeline
#    job's checkpoint split by stage, read whole (13 unused).
# 16: StagePlacement.recompute; without it a stage stashes its forward's residuals (hosts of
#    15 always ran the forward again from the stage input).
WORKER_WIRE_VERSION = 16


@dataclass(frozen=True)
class DeviceRecord:
    """One device as the host reports it."""

    id: int
    platform: str
    kind: str
    process_index: int


@dataclass(frozen=True)
class HostMetadata:
    """What an island host is, gathered once at start (the port is filled in at bind)."""

    island: str
    host_index: int
    num_hosts: int
    node_ip: str
    node_id: str
    pid: int
    devices: tuple[DeviceRecord, ...]
    island_device_count: int
    memory_budget_bytes_per_device: int
    port: int = 0
    wire_version: int = WORKER_WIRE_VERSION
    # Measured matmul FLOP/s of one accelerator (0 on CPU hosts).
    peak_flops_per_device: float = 0.0

    @property
    def address(self) -> str:
        return f"{self.node_ip}:{self.port}"

    @classmethod
    def in_process(
        cls, island: str, devices: Sequence[Any], budget_bytes_per_device: int
    ) -> HostMetadata:
        """A one-host island served by this process on loopback (tests, benchmarks, a GPU
        check without Ray): every device of `devices`, this process's pid."""
        return cls(
            island=island,
            host_index=0,
            num_hosts=1,
            node_ip="127.0.0.1",
            node_id="local",
            pid=os.getpid(),
            devices=tuple(DeviceRecord(d.id, d.platform, d.device_kind, 0) for d in devices),
            island_device_count=len(devices),
            memory_budget_bytes_per_device=budget_bytes_per_device,
        )


def default_memory_budget(devices: Sequence[Any]) -> int:
    """Bytes per device a host may fill: the accelerator's own limit (`memory_stats()`'s
    `bytes_limit` on GPUs), else half the machine's RAM shared by its (simulated) devices."""
    stats = devices[0].memory_stats() if hasattr(devices[0], "memory_stats") else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram // (2 * len(devices))


def info_reply(
    m: HostMetadata,
    *,
    loaded_jobs: Sequence[str],
    newest_epoch: int,
    next_island_seq: int,
    running_job: str,
) -> worker_pb2.InfoReply:
    """The Info rpc's answer: the host's metadata and its current state."""
    return worker_pb2.InfoReply(
        island=m.island,
        host_index=m.host_index,
        num_hosts=m.num_hosts,
        node_ip=m.node_ip,
        node_id=m.node_id,
        address=m.address,
        port=m.port,
        pid=m.pid,
        devices=[
            worker_pb2.DeviceInfo(
                id=d.id, platform=d.platform, kind=d.kind, process_index=d.process_index
            )
            for d in m.devices
        ],
        island_device_count=m.island_device_count,
        memory_budget_bytes_per_device=m.memory_budget_bytes_per_device,
        wire_version=common_pb2.WireVersion(version=m.wire_version),
        loaded_jobs=list(loaded_jobs),
        newest_epoch=newest_epoch,
        next_island_seq=next_island_seq,
        running_job=running_job,
        peak_flops_per_device=m.peak_flops_per_device,
    )
