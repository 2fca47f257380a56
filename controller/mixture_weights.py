"""A mixture job's per-step source weights, decided by the controller and sent with each step.

With `data.mixture_weights: dynamic` and N = `data.mixture_every`, the steps form blocks of N:
block b is steps [bN, (b + 1)N). Blocks 0 and 1 use the entries' weights; block b >= 2 uses

    model.mixture.dynamic_weights(base, sum of the per-source loss sums of block b - 2,
                                  sum of the per-source target counts of block b - 2)

— the weights of steps [k + N, k + 2N) are a pure function of the global per-source losses of
steps [k - N, k) (k = (b - 1)N). The losses are the global (sum, count) pairs every island
holds after the exchange (host 0 of island 0 reports them; no host's local slice is used), so
with up to N steps in flight the controller already knows them when block b starts. A step
whose block source is not complete yet waits (`ready`), so any window keeps the rule.

Each decision is recorded as a job event (`mixture_weights`: JSON {"block", "steps",
"weights"}), and so is each completed block's losses (`mixture_losses`: {"block", "sums",
"counts"}): a restore, or a controller restarted on the same state directory, reads them back
(`load_events`, plus every stored step's exact sums: `observe` of the stored metrics) and
sends the same weights, and the reference trainer replays them from the
log (`weights_by_step`).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

WEIGHTS_EVENT = "mixture_weights"
LOSSES_EVENT = "mixture_losses"


class MixtureSchedule:
    """The source names of a mixture job, and (dynamic) the weights of every step.

    Args:
        names: the sources' names, mixture order.
        base: the entries' normalised weights.
        dynamic: whether to re-weight (`data.mixture_weights: dynamic`).
        every: N, the block length.
        record: called with (event kind, message) for each decision and completed block.
    """

    def __init__(
        self,
        names: Sequence[str],
        base: Sequence[float],
        *,
        dynamic: bool = False,
        every: int = 100,
        record: Callable[[str, str], Any] | None = None,
    ) -> None:
        self.names = tuple(names)
        self.base = tuple(float(w) for w in base)
        self.dynamic = dynamic
        self.every = max(1, int(every))
        self.record = record
        self._step_stats: dict[int, np.ndarray] = {}
        self._block_losses: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._weights: dict[int, tuple[float, ...]] = {}

    def load_events(self, events: Iterable[tuple[str, str]]) -> MixtureSchedule:
        """Take recorded decisions and block losses back (kind, message pairs)."""
        for kind, message in events:
            try:
                d = json.loads(message)
            except ValueError:
                continue
            if kind == WEIGHTS_EVENT:
                self._weights[int(d["block"])] = tuple(float(w) for w in d["weights"])
            elif kind == LOSSES_EVENT:
                self._block_losses[int(d["block"])] = (
                    np.asarray(d["sums"], np.float64),
                    np.asarray(d["counts"], np.float64),
                )
        return self

    @property
    def num_sources(self) -> int:
        return len(self.names)

    def _source_block(self, block: int) -> int | None:
        return block - 2 if self.dynamic and block >= 2 else None

    def ready(self, step: int) -> bool:
        """Whether the weights of `step` can be decided now."""
        block = step // self.every
        source = self._source_block(block)
        return source is None or block in self._weights or source in self._block_losses

    def weights_for(self, step: int) -> tuple[float, ...]:
        """The weights to send with `step` (empty: the dataset's own, static weights)."""
        from pathways_lite.model.mixture import dynamic_weights

        block = step // self.every
        source = self._source_block(block)
        if source is None:
            return ()
        if block not in self._weights:
            if source not in self._block_losses:
                raise RuntimeError(
                    f"the mixture weights of step {step} need the per-source losses of steps "
                    f"[{source * self.every}, {(source + 1) * self.every}), which were not "
                    "all recorded."
                )
            sums, counts = self._block_losses[source]
            weights = dynamic_weights(self.base, sums, counts)
            self._weights[block] = weights
            lo, hi = block * self.every, (block + 1) * self.every
            logger.info("mixture weights of steps [%d, %d): %s", lo, hi, weights)
            if self.record is not None:
                self.record(
                    WEIGHTS_EVENT,
                    json.dumps({"block": block, "steps": [lo, hi], "weights": list(weights)}),
                )
        return self._weights[block]

    def observe(self, step: int, loss_stats: Sequence[float]) -> None:
        """A completed step's global stats (model.loss.masked_loss_sums's layout)."""
        if not loss_stats:
            return
        n = self.num_sources
        block = step // self.every
        if not self.dynamic or block in self._block_losses:
            return
        self._step_stats[step] = np.asarray(loss_stats, np.float64)
        steps = range(block * self.every, (block + 1) * self.every)
        if all(s in self._step_stats for s in steps):
            stats = np.stack([self._step_stats.pop(s) for s in steps])
            sums, counts = stats[:, 3 : 3 + n].sum(0), stats[:, 3 + n : 3 + 2 * n].sum(0)
            self._block_losses[block] = (sums, counts)
            if self.record is not None:
                self.record(
                    LOSSES_EVENT,
                    json.dumps({"block": block, "sums": list(sums), "counts": list(counts)}),
                )

    def source_metrics(self, loss_stats: Sequence[float]) -> tuple[dict, dict]:
        """(mean loss by source name, target tokens by source name) of one step's stats."""
        n = self.num_sources
        if len(loss_stats) != 3 + 2 * n:
            return {}, {}
        sums, counts = loss_stats[3 : 3 + n], loss_stats[3 + n :]
        losses = {name: s / c for name, s, c in zip(self.names, sums, counts, strict=True) if c}
        tokens = {name: int(round(c)) for name, c in zip(self.names, counts, strict=True)}
        return losses, tokens


def weights_by_step(events: Iterable[tuple[str, str]], every: int) -> dict[int, tuple[float, ...]]:
    """Recorded decisions as {block: weights} (for replaying a job in the reference trainer:
    step s uses the weights of block s // every, or the base weights when absent)."""
    out: dict[int, tuple[float, ...]] = {}
    for kind, message in events:
        if kind == WEIGHTS_EVENT:
            d = json.loads(message)
            out[int(d["block"])] = tuple(float(w) for w in d["weights"])
    return out
