"""What the dispatcher runs: a job's step program, and where each host loads it.

A `StepProgram` is a loaded job stepped from `start_step` to `steps`: its id and generation,
its checkpoint policy and restore point, and `load`, the function that builds one host's
LoadJobRequest from that host's `HostLoad` (controller/resolved.py's `load_request` for a PaLM
job; a probe runtime's own in tests and benchmarks, starting from `placement_request`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from pathways_lite.v1 import worker_pb2


@dataclasses.dataclass(frozen=True)
class HostLoad:
    """Where and how one host loads a job.

    Attributes:
        job_id: the load key (a job's id, or a sampling load's own key).
        generation: the job's restart generation.
        epoch: the controller's epoch.
        island_index: the island's index among the job's islands.
        num_islands: how many islands the job spans.
        peers: host i of every island of the job, island order (empty on one island).
        checkpoint_dir: where the hosts write checkpoints ("" writes none).
        restore_from: the checkpoint to restore ("" starts from the seed).
        dry_run: compile and report memory without allocating.
        exchange_overlap: a data-parallel job exchanges its gradients during the backward
            pass (the dispatcher's `exchange_overlap` setting for the job's islands).
    """

    job_id: str
    generation: int = 0
    epoch: int = 0
    island_index: int = 0
    num_islands: int = 1
    peers: tuple[str, ...] = ()
    checkpoint_dir: str = ""
    restore_from: str = ""
    dry_run: bool = False
    exchange_overlap: bool = False


def placement_request(at: HostLoad) -> worker_pb2.LoadJobRequest:
    """The placement fields of a LoadJobRequest, which every runtime's load carries."""
    return worker_pb2.LoadJobRequest(
        job_id=at.job_id,
        generation=at.generation,
        epoch=at.epoch,
        island_index=at.island_index,
        num_islands=at.num_islands,
        peers=list(at.peers),
        checkpoint_dir=at.checkpoint_dir,
        restore_from=at.restore_from,
        dry_run=at.dry_run,
    )


@dataclasses.dataclass(frozen=True)
class StepProgram:
    """What the dispatcher runs: a loaded job stepped from `start_step` to `steps`.

    Attributes:
        job_id: the job's id (the hosts' load key).
        generation: its restart generation.
        steps: total steps of the job.
        tokens_per_step: tokens of one global batch (for throughput).
        load: builds one host's LoadJobRequest from its `HostLoad`.
        start_step: the first step to run (after a resume).
        checkpoint_every: with a `checkpoint_dir`, the hosts checkpoint after every
            `checkpoint_every` steps (0: none in between) and after the last step.
        checkpoint_dir: where the hosts write checkpoints ("" writes none).
        restore_from: the checkpoint the hosts restore at load ("" starts from the seed).
        checkpoint_every_s: with a `checkpoint_dir`, also checkpoint after the first step sent
            once this many seconds have passed since the run started or last asked for one
            (0: none by time).
        mixture: a mixture job's MixtureSchedule (controller/mixture_weights.py): the source
            names and, for dynamic weights, the weights each step is sent with.
        eval_every: train.eval_every: a slice ends after every `eval_every`-th step, so
            the controller's evaluation runs between the exact steps (0: none).
        checkpoint_islands: positions, in the job's island order, of the islands whose
            hosts write checkpoints (island 0; a pipeline's replica 0 of every stage): a
            checkpoint counts as committed once host 0 of every one of them committed it.
    """

    job_id: str
    generation: int
    steps: int
    tokens_per_step: int
    load: Callable[[HostLoad], worker_pb2.LoadJobRequest]
    start_step: int = 0
    checkpoint_every: int = 0
    checkpoint_dir: str = ""
    restore_from: str = ""
    checkpoint_every_s: float = 0.0
    mixture: Any = None
    eval_every: int = 0
    checkpoint_islands: tuple[int, ...] = (0,)

    def checkpoint_after(self, step: int, since_last_s: float = 0.0) -> bool:
        """Whether the hosts checkpoint the state after `step`, `since_last_s` seconds after
        the last checkpoint was asked for (or the run started)."""
        done = step + 1
        every = self.checkpoint_every
        by_time = 0 < self.checkpoint_every_s <= since_last_s
        return bool(self.checkpoint_dir) and (
            done == self.steps or (every > 0 and done % every == 0) or by_time
        )
