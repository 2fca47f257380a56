"""Device memory diagnostics of an island host, as worker.proto messages.

A compiled step's memory analysis (`memory_proto`), and what the loaded jobs hold on the
devices right now, read from `jax.live_arrays()` (`job_memory`, `live_bytes_total`). The
live-array readers touch JAX: call them on the host's runtime thread.
"""

from __future__ import annotations

import collections

from pathways_lite.v1 import common_pb2, worker_pb2

from .runtime import JobRuntime, MemoryReport


def memory_proto(report: MemoryReport) -> common_pb2.MemoryAnalysis:
    """A compiled step's memory report on the wire."""
    return common_pb2.MemoryAnalysis(
        argument_bytes=report.argument_bytes,
        output_bytes=report.output_bytes,
        temp_bytes=report.temp_bytes,
        generated_code_bytes=report.generated_code_bytes,
        alias_bytes=report.alias_bytes,
        resident_bytes=report.resident_bytes,
        total_bytes=report.total_bytes,
    )


def job_memory(job_id: str, runtime: JobRuntime) -> worker_pb2.JobMemory:
    """The job's arrays among jax.live_arrays(), per device and in all."""
    import jax

    mine = {id(a) for a in runtime.device_arrays()}
    per_device: collections.Counter = collections.Counter()
    for array in jax.live_arrays():
        if id(array) in mine and not array.is_deleted():
            for shard in array.addressable_shards:
                per_device[shard.device.id] += shard.data.nbytes
    return worker_pb2.JobMemory(
        job_id=job_id,
        live_bytes_per_device=max(per_device.values(), default=0),
        live_bytes=sum(per_device.values()),
        suspended=runtime.suspended,
        host_bytes=runtime.host_bytes(),
    )


def live_bytes_total() -> int:
    """Bytes of every array in jax.live_arrays() on this host, whoever holds it."""
    import jax

    return sum(
        shard.data.nbytes
        for array in jax.live_arrays()
        if not array.is_deleted()
        for shard in array.addressable_shards
    )
