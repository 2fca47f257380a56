"""Job chains: `after`, `init_from`, and the checkpoint a fine-tuning or eval job starts from.

A job may wait for others (`after: [JOB, ...]`; `init_from: {job: X}` implies `after: [X]`).
At submit every name is resolved once to a job id (`resolve_references`: the store's one
resolver), and the stored spec holds the ids, so later jobs of the same name never change a
chain; jobs only ever name jobs that exist already, so a chain submitted job by job cannot
close a cycle (the CLI checks the files of one `submit a.yaml b.yaml` call together). Admission
asks `blockers` on every pass: a job waits while a dependency is unfinished, and fails with
the dependency's reason once one failed or was cancelled.

`init_from` is checked at submit as far as it can be: a source that ended without the
checkpoint asked for, a step it will never commit, a model of another shape (the first
differing field is named). The checkpoint itself is resolved when the job starts
(`init_checkpoint`): the source's committed checkpoint at `step`, or its newest.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from pathlib import Path
from typing import Any

from pathways_lite.v1 import controller_pb2

from . import spec as spec_lib
from .resolved import InitRef, ResolvedJob
from .spec_errors import SpecError, quote
from .states import JobState, StoreError
from .store import JobRecord, JobStore

# A job's tokenizer beside its checkpoints (model/tokenizer.py's MODEL_FILE name).
TOKENIZER_FILE = "tokenizer.model"
# How an `init` event (a job started from a checkpoint) begins; `init_path` reads it back.
INIT_EVENT_PREFIX = "Parameters from checkpoint "


def init_path(message: str) -> str:
    """The checkpoint folder an `init` event names."""
    rest = message[len(INIT_EVENT_PREFIX) :] if message.startswith(INIT_EVENT_PREFIX) else ""
    return rest.split(" (", 1)[0]


@dataclasses.dataclass(frozen=True)
class InitCheckpoint:
    """The checkpoint a job's parameters start from, and the job that wrote it."""

    path: str
    step: int
    source: JobRecord


def dependencies(spec: controller_pb2.JobSpec) -> list[str]:
    """The job ids a (resolved) spec waits for: `after`, then `init_from.job`."""
    deps = list(spec.after)
    if spec.init_from.HasField("job") and spec.init_from.job not in deps:
        deps.append(spec.init_from.job)
    return deps


def _find(store: JobStore, field: str, ref: str) -> JobRecord:
    try:
        return store.find_job(ref)
    except StoreError as e:  # JobNotFoundError, AmbiguousJobError
        raise SpecError(field, ref, f"{field}={quote(ref)} names no single job: {e}") from None


def resolve_references(spec: controller_pb2.JobSpec, store: JobStore) -> controller_pb2.JobSpec:
    """A copy of a validated spec with `after` and `init_from.job` as job ids, checked.

    Raises:
        SpecError: an unknown job; an init_from source that ended without the checkpoint
            asked for, or whose step it will never commit; a model of another shape.
    """
    resolved = controller_pb2.JobSpec()
    resolved.CopyFrom(spec)
    del resolved.after[:]
    for i, ref in enumerate(spec.after):
        resolved.after.append(_find(store, f"after[{i}]", ref).id)
    if not spec.HasField("init_from"):
        return resolved
    init = spec.init_from
    if init.HasField("job"):
        source = _find(store, "init_from.job", init.job)
        resolved.init_from.job = source.id
        _check_source(source, init, store)
    else:
        found = store.checkpoint_by_path(init.checkpoint)
        if found is None:
            raise SpecError(
                "init_from.checkpoint",
                init.checkpoint,
                f"init_from.checkpoint={quote(init.checkpoint)} is not a committed checkpoint "
                "of a job this controller knows (`pathways-lite get JOB` lists a job's "
                "checkpoints in its events).",
            )
        source = store.get_job(found.job_id)
    check_same_model(spec, source.spec)
    return resolved


def _check_source(source: JobRecord, init: Any, store: JobStore) -> None:
    """init_from.job's source can (still) give the checkpoint asked for."""
    field = "init_from.job"
    kind = spec_lib.job_kind(source.spec)
    article = "an" if kind[:1] in "aeiou" else "a"
    if kind != "train":
        raise SpecError(
            field,
            init.job,
            f"{field}={quote(init.job)} is {article} {kind} job ({source.id}): it writes no "
            "checkpoint.",
        )
    if init.HasField("step"):
        steps = source.spec.train.steps
        if init.step > steps:
            raise SpecError(
                "init_from.step",
                init.step,
                f"init_from.step={init.step} is past job {source.id}'s last step {steps}: "
                "it will never commit that checkpoint.",
            )
        committed = {c.step for c in store.checkpoints(source.id)}
        if source.state.terminal and init.step not in committed:
            raise SpecError(
                "init_from.step",
                init.step,
                f"init_from.step={init.step}: job {source.id} ended ({source.state.value}) "
                f"without a committed checkpoint at that step (it has "
                f"{sorted(committed) or 'none'}).",
            )
    elif source.state.terminal and store.latest_checkpoint(source.id) is None:
        raise SpecError(
            field,
            init.job,
            f"{field}={quote(init.job)}: job {source.id} ended ({source.state.value}) without "
            "a committed checkpoint.",
        )
    if source.state in (JobState.FAILED, JobState.CANCELLED):
        raise SpecError(
            field,
            init.job,
            f"{field}={quote(init.job)}: job {source.id} is {source.state.value}, and a job "
            "started from another waits for it to succeed; name one of its committed "
            "checkpoints with init_from.checkpoint instead.",
        )


def check_same_model(spec: controller_pb2.JobSpec, source: controller_pb2.JobSpec) -> None:
    """The new job's model has the source checkpoint's shape (vocabulary aside: the new job
    tokenizes with the checkpoint's tokenizer, so it embeds the same vocabulary).

    Raises:
        SpecError: the first differing PalmConfig field, with both values.
    """
    mine, theirs = spec_lib.model_config(spec), spec_lib.model_config(source)
    if getattr(mine, "to_dict", None) is None:
        return
    a, b = mine.to_dict(), theirs.to_dict()
    for name in a:
        if name == "vocab_size" or a[name] == b.get(name):
            continue
        raise SpecError(
            f"model.{name}",
            a[name],
            f"model.{name}={quote(a[name])} differs from the checkpoint's {name}="
            f"{quote(b.get(name))} (job {source.name!r}, preset {source.model.preset!r}): "
            "init_from needs a model of the same shape.",
        )
    if spec.data.HasField("vocab_size") and spec.data.vocab_size != source.data.vocab_size:
        raise SpecError(
            "data.vocab_size",
            spec.data.vocab_size,
            f"data.vocab_size={spec.data.vocab_size} differs from the checkpoint's tokenizer "
            f"({source.data.vocab_size or 'default'}): the job tokenizes with the checkpoint's "
            "tokenizer; leave data.vocab_size unset.",
        )


def blockers(store: JobStore, record: JobRecord) -> tuple[list[str], JobRecord | None]:
    """What holds a queued job back: (the dependencies not yet succeeded, the first that
    failed or was cancelled, or None)."""
    waiting = []
    for dep in dependencies(record.spec):
        try:
            other = store.get_job(dep)
        except StoreError:  # pruned: it finished long ago
            continue
        if other.state in (JobState.FAILED, JobState.CANCELLED):
            return waiting, other
        if other.state != JobState.SUCCEEDED:
            waiting.append(dep)
    return waiting, None


def init_checkpoint(store: JobStore, spec: controller_pb2.JobSpec) -> InitCheckpoint | None:
    """The committed checkpoint a job with `init_from` starts from, once its source allows.

    Raises:
        SpecError: the source has no committed checkpoint at the step asked for (or none).
    """
    if not spec.HasField("init_from"):
        return None
    init = spec.init_from
    if init.HasField("checkpoint"):
        found = store.checkpoint_by_path(init.checkpoint)
        if found is None:
            raise SpecError(
                "init_from.checkpoint",
                init.checkpoint,
                f"init_from.checkpoint={quote(init.checkpoint)} is no longer a committed "
                "checkpoint.",
            )
        return InitCheckpoint(found.path, found.step, store.get_job(found.job_id))
    source = store.get_job(init.job)
    committed = store.checkpoints(source.id)
    if init.HasField("step"):
        match = [c for c in committed if c.step == init.step]
        if not match:
            raise SpecError(
                "init_from.step",
                init.step,
                f"init_from.step={init.step}: job {source.id} has no committed checkpoint at "
                f"that step (it has {sorted(c.step for c in committed) or 'none'}).",
            )
        return InitCheckpoint(match[-1].path, match[-1].step, source)
    if not committed:
        raise SpecError(
            "init_from.job",
            init.job,
            f"init_from.job={quote(init.job)}: job {source.id} ended ({source.state.value}) "
            "without a committed checkpoint.",
        )
    return InitCheckpoint(committed[-1].path, committed[-1].step, source)


def with_init(store: JobStore, record: JobRecord, job: ResolvedJob) -> ResolvedJob:
    """A starting job with its init_from checkpoint resolved and the tokenizer its source
    kept beside it (an `init` event says which); a job without init_from unchanged.

    Raises:
        SpecError: the source has no committed checkpoint at the step asked for, or no
            tokenizer beside it.
    """
    init = init_checkpoint(store, record.spec)
    if init is None or job.init is not None:
        return job
    tokenizer = Path(init.path).parent / TOKENIZER_FILE
    if not tokenizer.is_file():
        raise SpecError(
            "init_from",
            init.path,
            f"init_from: the checkpoint {init.path} has no tokenizer beside it ({tokenizer}); "
            "it was written before checkpoints kept their tokenizer.",
        )
    store.add_event(
        record.id,
        "init",
        f"{INIT_EVENT_PREFIX}{init.path} (job {init.source.id}, step {init.step}); "
        "fresh optimizer state.",
    )
    # A pipeline job's checkpoint is split by stage: the hosts read the whole model from
    # its stage parts (LoadJobRequest.init_stage_bounds).
    pipe = spec_lib.pipeline_settings(init.source.spec)
    stages = pipe.stages if pipe is not None else 0
    return dataclasses.replace(
        job, init=InitRef(init.path, init.step, init.source.id, str(tokenizer), stages)
    )


def keep_tokenizer(job_dir: str, dataset_path: str, *, resuming: bool = False) -> None:
    """Copy a job's tokenizer beside its checkpoints (`<checkpoint dir>/tokenizer.model`): a
    job started from one of them (init_from) tokenizes its data with it. Blocking.

    Raises:
        SpecError: `resuming` (the job has a committed checkpoint) and the tokenizer kept
            differs from the data's: its files changed since the checkpoints were written,
            and the parameters would go on with other token ids (the data is prepared again,
            its tokenizer trained on it, at every run of a job).
    """
    if not job_dir:
        return
    target = Path(job_dir) / TOKENIZER_FILE
    source = Path(dataset_path) / TOKENIZER_FILE
    if not source.is_file():
        return
    if target.is_file():
        from pathways_lite.model.tokenizer import Tokenizer

        # By their pieces (a tokenizer trained again on the same data has the same, in a file
        # that differs: the trainer records where it wrote it).
        if Tokenizer.load(target).hash == Tokenizer.load(source).hash:
            return
        if resuming:
            raise SpecError(
                "data.paths",
                None,
                "The job's data changed since its checkpoints were written: the tokenizer "
                f"trained on it now ({source}) differs from the one its checkpoints were "
                f"trained with ({target}), so they would go on with other token ids. Put the "
                "data back as it was, or train on the new data in a new job started from a "
                "checkpoint (init_from, which reads it with the old tokenizer).",
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
