"""A warm spare's jobs compiled ahead: a restarted island host loads them without compiling.

A warm spare (workers/island_host.py) is a process beside an island host, JAX imported, not
serving, that the controller promotes when the host dies. While it waits it asks its host
(through Ray, every `POLL_S`) for the LoadJob requests of the data-parallel training jobs the
host holds and builds and compiles each job's runtime as the host did (the persistent
compile cache makes that cheap), keeping it without any state. Promoted, its worker service
builds runtimes with `PrecompiledRuntimes.factory`: a LoadJob of a job compiled ahead takes
that runtime (once) when its build matches, so the peer restore that follows only fetches
the state. A job whose build differs (another model, mesh, batch, data, island) is built
and compiled as before: nothing is assumed, only reused when equal.

Only one-host CPU islands compile ahead (a multi-host island's spares join their JAX runtime
only when promoted).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from pathways_lite.v1 import worker_pb2

from .peer_restore import compile_pre_step
from .requests import decode_load
from .runtime import IslandJobSpec, JobRuntime
from .runtimes import make_runtime

logger = logging.getLogger(__name__)

# How often a spare asks its host what it holds: a spare that became next in line after a
# promotion compiles the new host's jobs within this of the host's load (at 2 s a third kill
# of an island soon after two others could find its spare idle, waiting for its next poll).
# A poll is one small Ray call; a spare with nothing new to compile does nothing else.
POLL_S = 0.5
# What a new generation of the same job may change without changing the compiled runtime.
_PER_GENERATION = ("generation", "peers")


def same_build(a: IslandJobSpec, b: IslandJobSpec) -> bool:
    """Whether a runtime built for `a` serves `b` (a new generation of the same job)."""
    return dataclasses.replace(a, **{f: getattr(b, f) for f in _PER_GENERATION}) == b


class PrecompiledRuntimes:
    """Runtimes compiled ahead by a warm spare, by job id, each handed out once.

    Args:
        devices: the island's devices (the spare's own, in mesh order).
        build: the runtime factory (workers/runtimes.py's `make_runtime`).
    """

    def __init__(self, devices: Sequence[Any], build: Callable[..., JobRuntime] = make_runtime):
        self.devices = list(devices)
        self._build = build
        self._lock = threading.Lock()
        self._runtimes: dict[str, tuple[IslandJobSpec, JobRuntime]] = {}
        # How many LoadJobs took a runtime compiled ahead.
        self.reused = 0

    def compile_ahead(self, requests: Sequence[bytes]) -> list[str]:
        """Build and compile the runtime of every request not compiled yet (blocking);
        forget the jobs no longer listed, unless none is (a host just promoted that has not
        loaded its jobs yet). Returns the job ids compiled now."""
        if not requests:
            return []
        wanted = {}
        for raw in requests:
            request = worker_pb2.LoadJobRequest.FromString(raw)
            spec = decode_load(request, len(self.devices))
            wanted[spec.job_id] = spec
        compiled = []
        with self._lock:
            for job_id in [j for j in self._runtimes if j not in wanted]:
                del self._runtimes[job_id]
        for job_id, spec in wanted.items():
            with self._lock:  # one compile at a time; a LoadJob's factory waits for it
                held = self._runtimes.get(job_id)
                if held is not None and same_build(held[0], spec):
                    continue
                runtime = self._build(spec, self.devices)
                runtime.compile()
                compile_pre_step(runtime)
                self._runtimes[job_id] = (spec, runtime)
                compiled.append(job_id)
        return compiled

    def factory(self, spec: IslandJobSpec, devices: Sequence[Any]) -> JobRuntime:
        """The worker service's runtime factory: the job's runtime compiled ahead when its
        build matches (handed out once), else a new one."""
        with self._lock:
            held = self._runtimes.pop(spec.job_id, None)
        if held is not None and same_build(held[0], spec) and list(devices) == self.devices:
            runtime = held[1]
            runtime.spec = spec
            self.reused += 1
            logger.info("job %s: its runtime was compiled ahead", spec.job_id)
            return runtime
        return self._build(spec, devices)

    def job_ids(self) -> list[str]:
        with self._lock:
            return sorted(self._runtimes)

    def __len__(self) -> int:
        with self._lock:
            return len(self._runtimes)


def precompile_loop(
    precompiled: PrecompiledRuntimes,
    requests: Callable[[], list[bytes]],
    stop: threading.Event,
) -> None:
    """Until `stop`: at once, then every POLL_S, compile ahead what `requests()` (the loaded
    jobs of the host the spare stands in for) lists. A host that does not answer (it died)
    is asked again: a spare behind another one follows the host promoted in its place
    (`IslandHost.next_in_line`)."""
    wait_s = 0.0
    silent = False
    while not stop.wait(wait_s):
        wait_s = POLL_S
        try:
            listed = requests()
        except Exception as e:  # noqa: BLE001 - the host died: the next one is followed
            if not silent:
                logger.info("warm spare: its host does not answer (%r)", e)
            silent = True
            continue
        silent = False
        if stop.is_set():
            return
        try:
            done = precompiled.compile_ahead(listed)
        except Exception:  # a job the spare cannot build: its LoadJob will say why
            logger.exception("warm spare: compiling ahead failed")
            continue
        if done:
            logger.info("warm spare: compiled %s ahead", ", ".join(done))
