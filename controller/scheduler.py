"""The scheduler skeleton: which queued job gets which islands (one job per island for now).

A job holds all of its islands or none (gang placement). Queued jobs are considered in the
store's scheduling order (priority, then submission); a job that does not fit the free islands
now stays queued, while later jobs that do fit may start (no reservation yet). The
multi-tenancy issue replaces this with gang-ordered sharing, fair shares and preemption.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

logger = logging.getLogger(__name__)


class Scheduler:
    """Island assignment: every island is free or held by exactly one job.

    Args:
        island_ids: the cluster's islands, in island order.
    """

    def __init__(self, island_ids: Sequence[str]) -> None:
        self.island_ids = list(island_ids)
        self._holder: dict[str, str | None] = {i: None for i in self.island_ids}

    def free(self) -> list[str]:
        """Islands no job holds, in island order."""
        return [i for i in self.island_ids if self._holder[i] is None]

    def fits_ever(self, islands: int) -> bool:
        """Whether a job of `islands` islands can ever run on this cluster."""
        return 0 < islands <= len(self.island_ids)

    def assign(self, job_id: str, islands: int) -> list[str] | None:
        """Give `job_id` the first `islands` free islands, or None (all or nothing)."""
        free = self.free()
        if islands > len(free):
            return None
        chosen = free[:islands]
        for island in chosen:
            self._holder[island] = job_id
        logger.info("job %s holds islands %s", job_id, chosen)
        return chosen

    def release(self, job_id: str) -> list[str]:
        """Free every island `job_id` holds; returns them."""
        held = self.islands_of(job_id)
        for island in held:
            self._holder[island] = None
        return held

    def islands_of(self, job_id: str) -> list[str]:
        """The islands `job_id` holds, in island order."""
        return [i for i in self.island_ids if self._holder[i] == job_id]

    def jobs_on(self, island: str) -> list[str]:
        """Ids of the jobs holding `island` (zero or one for now)."""
        holder = self._holder.get(island)
        return [] if holder is None else [holder]
