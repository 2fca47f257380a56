"""Evaluating a job resident on an island: the worker service's Evaluate rpc.

It scores the job's current parameters on the sources of its prepared data with
`pathways_lite.model.evaluate`, on the island's mesh (every host of the island runs the same
SPMD program on the same arrays; host 0's reply is the answer): language-model sources by the
mean token loss of their first rows, in order (a plain dataset's examples, or a mixture
source's rows with its loss mask); text-to-text sources (`stdlib-tasks`, `text2text`) on a
split of their pairs, by target loss and by greedy exact match and token F1 with k-shot
prompts. Only runtimes that hold a PaLM model (`PalmRuntime`) can be evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from .runtime import JobSpecError, RuntimeUnavailableError

logger = logging.getLogger(__name__)

TASK_SOURCES = ("stdlib-tasks", "text2text")


def eval_sources(manifest: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The sources an evaluation scores, from a prepared dataset's manifest: a mixture's
    sources (model/mixture.py: `sources[i]` with its name and entry) or the one plain text
    source (model/data.py: `spec`). `kind` is "text2text" for task sources, else "lm";
    `index` is the source's place in a mixture (None for a plain dataset)."""
    if manifest.get("kind") == "mixture":
        out = []
        for i, s in enumerate(manifest["sources"]):
            entry = s.get("entry", {})
            source = entry.get("source", "")
            out.append(
                {
                    "name": s["name"],
                    "kind": "text2text" if source in TASK_SOURCES else "lm",
                    "source": source,
                    "task": entry.get("task"),
                    "paths": list(entry.get("paths") or ()),
                    "index": i,
                }
            )
        return out
    spec = manifest.get("spec", {})
    return [{"name": spec.get("source") or "stdlib", "kind": "lm", "index": None}]


def lm_rows(dataset: Any, index: int | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `n` rows (N, T + 1) of a language-model source and their loss weights
    (N, T): a plain dataset's examples, or a mixture source's rows and mask."""
    if index is None:
        n = min(n, dataset.num_examples)
        rows = dataset.examples(np.arange(n, dtype=np.int64))
        return rows, np.ones((n, rows.shape[1] - 1), np.float32)
    files = dataset.manifest["sources"][index]["files"]
    tokens = np.load(dataset.path / files["tokens"], mmap_mode="r")[:n]
    mask = np.load(dataset.path / files["mask"], mmap_mode="r")[:n]
    return np.asarray(tokens, np.int32), np.asarray(mask[:, 1:], np.float32)


def evaluate(runtime: Any, *, max_examples: int, shots: int, split: str) -> tuple[int, list[Any]]:
    """Score a loaded job's current parameters on its sources (blocking: run it on the
    host's runtime thread, between steps). Returns (steps applied, [SourceScore]).

    Raises:
        JobSpecError: a task source's pairs cannot be read (naming the source).
        RuntimeUnavailableError: the runtime holds no language model.
    """
    import jax

    from pathways_lite.model import evaluate as ev
    from pathways_lite.model.corpus import DataError
    from pathways_lite.model.tasks import task_pairs

    fns = getattr(runtime, "fns", None)
    loaded = getattr(runtime, "_loaded", None)
    if fns is None or loaded is None or not hasattr(runtime, "_open_data"):
        raise RuntimeUnavailableError(
            f"job {runtime.spec.job_id!r} (model {runtime.spec.preset!r}) has no language "
            "model to evaluate."
        )
    state = loaded().state
    runtime._open_data()
    dataset = runtime.dataset
    rows_per_batch = runtime.spec.island_batch

    def place(array: np.ndarray) -> Any:
        array = np.ascontiguousarray(array)
        return jax.make_array_from_callback(
            array.shape, fns.batch_sharding, lambda index: array[index]
        )

    scores = []
    for source in eval_sources(dataset.manifest):
        if source["kind"] == "lm":
            rows, weights = lm_rows(dataset, source["index"], max_examples)
            loss = ev.mean_loss(
                ev.loss_sums_fn(fns), state.params, rows, weights, rows_per_batch, place, fns.mesh
            )
            scores.append(ev.SourceScore(source["name"], loss, len(rows)))
            continue
        try:
            pairs = task_pairs(source["source"], source["task"], source["paths"], split)
            pool = (
                task_pairs(source["source"], source["task"], source["paths"], "train")
                if shots
                else []
            )
        except DataError as e:
            raise JobSpecError(f"evaluating {source['name']!r}: {e}") from None
        scores.append(
            ev.evaluate_text2text(
                fns,
                state.params,
                dataset.tokenizer,
                source["name"],
                pairs[:max_examples],
                pool[: 4 * shots],
                shots=shots,
                seq_len=runtime.spec.seq_len,
                batch_rows=rows_per_batch,
                place=place,
            )
        )
    return int(state.step), scores
