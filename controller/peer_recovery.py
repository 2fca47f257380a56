"""Peer recovery: a data-parallel job survives an island's death with no step lost.

The islands of a data-parallel job hold bitwise the same parameters and optimizer state after
every step, so when a step fails with an infrastructure error (a host died, an exchange was
aborted) and at least one island still answers, the job does not roll back to its checkpoint:

1. the job's exchanges are aborted on every island (the failed generation's steps end);
2. the islands whose hosts do not answer are restarted through Ray (as a unit);
3. the job continues from S = the steps whose metrics are recorded (every island completed
   them): a new generation is loaded with `resume_step` S; the survivors keep their state
   resident (`keep_state`; a step applied on a survivor but not completed by every island,
   interrupted mid-exchange, is rolled back to its start there), the restarted islands fetch
   it from a survivor host to host (`restore_peers`, workers/peer_restore.py);
4. every host's parameter digest must be equal (and after S steps) before a step is sent.

Any failure on the way (no island survives, an island cannot be restarted, a survivor dies
mid-transfer, digests differ) returns None: the caller rolls back to the last committed
checkpoint as before (controller/recovery.py), which stays the fallback. A peer recovery is
not charged to the retry budget, but the job must complete a step after one before the next
failure may be peer-recovered (no loop without progress).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import grpc

from pathways_lite.v1 import worker_pb2

from .dispatch import LOAD_TIMEOUT_S, Dispatcher, HostStep, StepReport, overlap_for
from .islands import Island, call_all, dead_islands
from .program import HostLoad
from .recovery import Attempt, FailureClass, classify
from .states import StoreError
from .store import JobStore

logger = logging.getLogger(__name__)

DIGEST_TIMEOUT_S = 60.0
# A restarted controller records at most this many steps from the hosts' replies (the hosts
# keep their last 1024).
MAX_REPLAYED_STEPS = 1000
NO_SEQ = 1 << 62


def _report(
    program: Any, islands: Sequence[Island], step: int, replies: Sequence[Any]
) -> StepReport:
    """The StepReport of a step from its hosts' (replayed) replies, as the dispatcher builds
    it: island order, host order; the mean of the islands' losses."""
    hosts, index = [], 0
    for island in islands:
        for host_index in range(len(island.hosts)):
            hosts.append(HostStep(island.id, host_index, replies[index]))
            index += 1
    losses = [h.reply.loss for h in hosts if h.host_index == 0]
    start_ns = min(h.reply.timings.start_unix_ns for h in hosts)
    end_ns = max(h.reply.timings.end_unix_ns for h in hosts)
    step_time_s = max(end_ns - start_ns, 1) / 1e9
    return StepReport(
        step=step,
        loss=sum(losses) / len(losses),
        tokens_per_s=program.tokens_per_step / step_time_s,
        step_time_s=step_time_s,
        hosts=tuple(hosts),
        checkpoints_committed=tuple(hosts[0].reply.checkpoints_committed),
        loss_stats=tuple(hosts[0].reply.loss_stats),
    )


class PeerRecovery:
    """Recovers a data-parallel job's failed step from its surviving islands.

    Args:
        store: the job store (metrics, events, generations).
        dispatcher: the controller's dispatcher (epoch, abort).
    """

    def __init__(self, store: JobStore, dispatcher: Dispatcher) -> None:
        self.store = store
        self.dispatcher = dispatcher
        # job -> the step its last peer recovery resumed at (progress guard).
        self._resumed_at: dict[str, int] = {}
        # job -> (generation loaded on its hosts, steps recorded) after a controller restart.
        self.adoptable: dict[str, tuple[int, int]] = {}

    async def recover(
        self, job_id: str, attempt: Attempt | None, islands: Sequence[Island], error: Any
    ) -> Attempt | None:
        """The attempt that continues the job after `error` with its state from the
        survivors, or None when the job must roll back to its checkpoint instead."""
        if attempt is None or len(islands) < 2 or classify(error) != FailureClass.INFRASTRUCTURE:
            return None
        program = attempt.program
        resume = self.store.steps_completed(job_id)
        if self._resumed_at.get(job_id) == resume:
            logger.warning("job %s: no step completed since its last peer recovery", job_id)
            return None
        started = time.monotonic()
        await self.dispatcher.abort(
            job_id, program.generation, islands, "a peer island failed; peer recovery"
        )
        seen = {island.id: island.generation for island in islands}
        dead = set(await dead_islands(islands))
        survivors = [island for island in islands if island.id not in dead]
        if not survivors:
            return None
        message = getattr(error, "message", None) or str(error)
        self.store.add_event(
            job_id,
            "failure",
            f"infrastructure failure (peer recovery from {', '.join(i.id for i in survivors)}): "
            f"{message[:1000]}" + (f" Island(s) {', '.join(sorted(dead))} lost." if dead else ""),
        )
        for island in islands:
            if island.id not in dead:
                continue
            if not island.restartable:
                return None
            try:
                await island.restart(seen[island.id])
            except Exception as e:  # its node is gone: the rollback path reports it lost
                logger.warning(
                    "island %s could not be restarted for peer recovery: %s", island.id, e
                )
                return None
            note = f" ({island.restart_note})" if island.restart_note else ""
            self.store.add_event(job_id, "island", f"Island {island.id} restarted{note}.")
        restarted_s = time.monotonic() - started
        generation = self.store.bump_generation(job_id)
        self.store.truncate_metrics(job_id, resume)
        program = dataclasses.replace(
            program, generation=generation, start_step=resume, restore_from=""
        )
        try:
            t_load = time.monotonic()
            replies = await self._load(program, islands, dead, survivors[0], resume)
            t_digest = time.monotonic()
            await self._check_digests(job_id, islands, resume)
            digest_s = time.monotonic() - t_digest
            load_s = t_digest - t_load
        except (grpc.aio.AioRpcError, PeerRecoveryError) as e:
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            logger.warning("job %s: peer recovery failed, rolling back: %s", job_id, detail)
            self.store.add_event(
                job_id,
                "failure",
                f"Peer recovery failed ({detail[:500]}); the job rolls back to its checkpoint.",
            )
            return None
        self._resumed_at[job_id] = resume
        fetched = max((r.peer_restore_bytes for r in replies), default=0)
        transfer_s = max((r.peer_restore_s for r in replies), default=0.0)
        self.store.add_event(
            job_id,
            "restore",
            f"Resumed at step {resume} from the state of surviving island(s) "
            f"{', '.join(i.id for i in survivors)} as generation {generation}"
            + (
                f"; island(s) {', '.join(sorted(dead))} restarted and loaded it from a survivor "
                f"({fetched} bytes in {transfer_s:.2f} s)"
                if dead
                else ""
            )
            + f"; no step runs again ({time.monotonic() - started:.2f} s: restart "
            f"{restarted_s:.2f} s, load {load_s:.2f} s (compile "
            f"{max(r.compile_s for r in replies):.2f} s), digests {digest_s:.2f} s).",
        )
        logger.warning(
            "job %s peer-recovered at step %d (generation %d) in %.2f s",
            job_id,
            resume,
            generation,
            time.monotonic() - started,
        )
        return Attempt(program, attempt.restored, set(attempt.registered))

    async def _load(
        self,
        program: Any,
        islands: Sequence[Island],
        dead: set[str],
        source: Island,
        resume: int,
    ) -> list[worker_pb2.LoadJobReply]:
        """LoadJob of the new generation: survivors keep their state, the restarted islands
        fetch it from `source` (host i from host i first, then the others)."""
        hosts = len(islands[0].hosts)
        if any(len(i.hosts) != hosts for i in islands):
            raise PeerRecoveryError("the job's islands have different host counts.")
        peers = [[i.hosts[h].address for i in islands] for h in range(hosts)]
        sources = [h.address for h in source.hosts]

        def request(island_index: int, host_index: int, _host: Any) -> worker_pb2.LoadJobRequest:
            message = program.load(
                HostLoad(
                    job_id=program.job_id,
                    generation=program.generation,
                    epoch=self.dispatcher.epoch,
                    island_index=island_index,
                    num_islands=len(islands),
                    peers=tuple(peers[host_index]),
                    checkpoint_dir=program.checkpoint_dir,
                    exchange_overlap=overlap_for(self.dispatcher.exchange_overlap, islands),
                )
            )
            message.resume_step = resume
            if islands[island_index].id in dead:
                own = sources[host_index] if host_index < len(sources) else None
                message.restore_peers.extend(
                    ([own] if own else []) + [a for a in sources if a != own]
                )
            else:
                message.keep_state = True
            return message

        results = await call_all(
            islands, "LoadJob", request, timeout=LOAD_TIMEOUT_S, return_exceptions=True
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return list(results)

    async def _check_digests(self, job_id: str, islands: Sequence[Island], resume: int) -> None:
        """Every host's parameter digest is equal and after `resume` steps."""
        replies = await call_all(
            islands,
            "ParamDigest",
            worker_pb2.ParamDigestRequest(job_id=job_id),
            timeout=DIGEST_TIMEOUT_S,
        )
        digests = {r.sha256 for r in replies}
        steps = {r.steps_applied for r in replies}
        if len(digests) != 1 or steps != {resume}:
            raise PeerRecoveryError(
                f"after the restore the hosts' digests differ ({len(digests)} distinct) or "
                f"their steps applied {sorted(steps)} are not {resume}."
            )

    def forget(self, job_id: str) -> None:
        self._resumed_at.pop(job_id, None)
        self.adoptable.pop(job_id, None)

    # ---- a restarted controller adopts the islands' resident state -----------------------

    def remember(self, job_id: str, generation: int, recorded: int) -> None:
        """A job the previous controller left running: loaded on its hosts in `generation`,
        `recorded` steps in the store. Its runner tries `adopt` before a checkpoint."""
        self.adoptable[job_id] = (generation, recorded)

    async def adopt(
        self,
        program: Any,
        islands: Sequence[Island],
        checkpoint_dir: str,
        on_step: Callable[[StepReport], Any],
        flush: Callable[[], Any] = lambda: None,
    ) -> tuple[Attempt, list[worker_pb2.LoadJobReply]] | None:
        """Continue a job a dead controller left running from the state its hosts still hold
        (the hosts outlive a controller): nothing is rolled back.

        The hosts ran past the recorded steps (slices in flight, metrics not yet written):
        their recorded replies of those steps (RunStep is idempotent on (generation, step):
        a replay runs nothing) are recorded through `on_step` and written (`flush`) before
        the `restore` event, then every host takes the new generation with its state
        (keep_state) and the digests are compared. None when the hosts do not hold the job
        as it was (the caller restores the checkpoint).
        """
        job_id = program.job_id
        hint = self.adoptable.pop(job_id, None)
        # A pipeline's stages hold different parameters (their digests never agree) and its
        # stage links are bound to the loaded generation: it restores its checkpoint.
        pipeline = len(program.checkpoint_islands) > 1
        if hint is None or program.mixture is not None or pipeline:
            return None
        old_generation, recorded = hint
        started = time.monotonic()
        loading = False
        # A step the dead controller sent to some islands only waits on the others: release.
        await self.dispatcher.abort(job_id, old_generation, islands, "the controller restarted")
        try:
            digests = await call_all(
                islands,
                "ParamDigest",
                worker_pb2.ParamDigestRequest(job_id=job_id),
                timeout=DIGEST_TIMEOUT_S,
            )
            applied = {r.steps_applied for r in digests}
            if len({r.sha256 for r in digests}) != 1 or len(applied) != 1:
                raise PeerRecoveryError(f"the hosts hold different states ({sorted(applied)}).")
            (held,) = applied
            if not recorded <= held <= recorded + MAX_REPLAYED_STEPS:
                raise PeerRecoveryError(f"the hosts hold {held} steps, {recorded} are recorded.")
            for step in range(recorded, held):
                replies = await call_all(
                    islands,
                    "RunStep",
                    worker_pb2.RunStepRequest(
                        job_id=job_id,
                        generation=old_generation,
                        step=step,
                        # A replay takes no number; a step not recorded is refused, never run.
                        island_seq=NO_SEQ,
                        epoch=self.dispatcher.epoch,
                    ),
                    timeout=DIGEST_TIMEOUT_S,
                )
                if not all(r.replayed for r in replies):
                    raise PeerRecoveryError(f"step {step} was not replayed.")
                on_step(_report(program, islands, step, replies))
            try:
                flush()  # in the store before the event that says they were run before
            except StoreError as e:
                # Steps that cannot be recorded cannot be adopted: the checkpoint's restore
                # (the caller discards them) runs them again and records them then.
                raise PeerRecoveryError(f"the replayed steps are not recorded: {e}") from e
            program = dataclasses.replace(
                program, start_step=held, restore_from="", checkpoint_dir=checkpoint_dir
            )
            loading = True
            replies = await self._load(program, islands, set(), islands[0], held)
            await self._check_digests(job_id, islands, held)
        except (grpc.aio.AioRpcError, PeerRecoveryError) as e:
            detail = e.details() if isinstance(e, grpc.aio.AioRpcError) else str(e)
            logger.warning("job %s: its hosts' state is not adopted: %s", job_id, detail)
            if loading:
                # Hosts that took the new generation with their state would refuse the
                # checkpoint's load of that generation (a different load): dropped first.
                await self.dispatcher.unload(job_id, islands)
            return None
        self.store.add_event(
            job_id,
            "restore",
            f"Resumed at step {held} from the state its islands kept after the controller "
            f"restart as generation {program.generation} ({held - recorded} steps run before "
            f"the restart recorded from the hosts; {time.monotonic() - started:.2f} s); no "
            "step runs again.",
        )
        return Attempt(program, None), replies


class PeerRecoveryError(RuntimeError):
    """A peer recovery cannot go on (the caller rolls back to the checkpoint)."""
