"""The controller's Prometheus metrics: a custom collector read at every scrape.

Nothing is counted twice and nothing is kept apart from the controller: each scrape reads the
job store (jobs by state), the controller's own counters (steps, failures since start), the
dashboard's view of each running job and of the islands, and
`prometheus_client` formats the text exposition. The registry is the dashboard's own, not the
process-wide default, so two controllers in one process (tests) never collide.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from .states import JobState
from .store import JobRecord


class ControllerCollector:
    """Collects one controller's metrics when Prometheus scrapes.

    Args:
        controller: the controller (its `store`, `steps_total` and `failures_total`).
        islands: the islands view (dicts with `id`, `devices`, `jobs`, `memory_used_bytes`,
            `memory_budget_bytes`), as the dashboard shows it.
        summarize: a job's summary (`id`, `name`, `steps_completed`, `tokens_per_s`, `loss`),
            as the dashboard shows it (controller/views.py's `job_summary`).
    """

    def __init__(
        self,
        controller: Any,
        islands: Callable[[], list[dict[str, Any]]],
        summarize: Callable[[JobRecord], dict[str, Any]],
    ) -> None:
        self.controller = controller
        self.islands = islands
        self.summarize = summarize

    def collect(self) -> Iterator[Metric]:
        c = self.controller
        jobs = GaugeMetricFamily(
            "pathways_lite_jobs", "Jobs in the controller's store by state.", labels=["state"]
        )
        for state, n in c.store.count_by_state().items():
            jobs.add_metric([state.value], n)
        yield jobs
        yield CounterMetricFamily(
            "pathways_lite_steps_total",
            "Training steps completed since this controller started.",
            value=c.steps_total,
        )
        yield CounterMetricFamily(
            "pathways_lite_job_failures_total",
            "Jobs that failed since this controller started.",
            value=c.failures_total,
        )

        per_job = [self.summarize(r) for r in c.store.jobs_in_states([JobState.RUNNING])]
        steps, tokens, loss = (
            GaugeMetricFamily(name, help_text, labels=["job", "name"])
            for name, help_text in (
                ("pathways_lite_job_steps_completed", "Completed steps of each running job."),
                (
                    "pathways_lite_job_tokens_per_second",
                    "Training throughput of each running job's latest step.",
                ),
                ("pathways_lite_job_loss", "Training loss of each running job's latest step."),
            )
        )
        for s in per_job:
            labels = [s["id"], s["name"]]
            steps.add_metric(labels, s["steps_completed"])
            tokens.add_metric(labels, s["tokens_per_s"] or 0.0)
            if s["loss"] is not None:
                loss.add_metric(labels, s["loss"])
        yield from (steps, tokens, loss)
        yield from eval_families(c.store.latest_evals())

        islands = self.islands()
        for name, help_text, value in (
            (
                "pathways_lite_island_memory_used_bytes",
                "Device memory the resident jobs' compiled steps use on each island.",
                lambda i: i["memory_used_bytes"],
            ),
            (
                "pathways_lite_island_memory_budget_bytes",
                "Device memory budget of each island.",
                lambda i: i["memory_budget_bytes"],
            ),
            ("pathways_lite_island_devices", "Devices of each island.", lambda i: i["devices"]),
            (
                "pathways_lite_island_resident_jobs",
                "Jobs resident on each island.",
                lambda i: len(i["jobs"]),
            ),
        ):
            family = GaugeMetricFamily(name, help_text, labels=["island"])
            for island in islands:
                family.add_metric([island["id"]], value(island))
            yield family


def eval_families(rows: list[tuple[str, str, Any]]) -> list[Metric]:
    """Each job's newest evaluation per source (kind: eval jobs, train.eval_every): loss,
    perplexity, and for text-to-text sources exact match and token F1; with the step."""
    labels = ["job", "name", "source"]
    fams = {
        key: GaugeMetricFamily(f"pathways_lite_job_eval_{key}", help_text, labels=labels)
        for key, help_text in (
            ("loss", "Mean token loss of each job's newest evaluation, per source."),
            ("perplexity", "Perplexity (exp of the loss) of each job's newest evaluation."),
            ("exact_match", "Greedy-decoded exact match of text-to-text sources, in [0, 1]."),
            ("token_f1", "Greedy-decoded token F1 of text-to-text sources, in [0, 1]."),
            ("step", "Optimizer steps applied to the parameters of the newest evaluation."),
        )
    }
    for job_id, name, row in rows:
        key = [job_id, name, row.source]
        fams["loss"].add_metric(key, row.loss)
        fams["perplexity"].add_metric(key, row.perplexity)
        fams["step"].add_metric(key, row.step)
        if row.exact_match is not None:
            fams["exact_match"].add_metric(key, row.exact_match)
        if row.token_f1 is not None:
            fams["token_f1"].add_metric(key, row.token_f1)
    return list(fams.values())


def controller_registry(
    controller: Any,
    islands: Callable[[], list[dict[str, Any]]],
    summarize: Callable[[JobRecord], dict[str, Any]],
) -> CollectorRegistry:
    """A registry holding only a `ControllerCollector` (no process or platform collectors:
    the controller's metrics, nothing else)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector(controller, islands, summarize))
    return registry
