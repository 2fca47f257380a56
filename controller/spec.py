"""Every semantic check of a JobSpec.

The controller runs `validate_spec` on every submission, from any client; the CLI runs it too,
to fail before contacting the controller. Errors are `SpecError`s whose message is one sentence
naming the field and the value (`train.global_batch=10 is not divisible by islands=3.`); the
servicer answers them with INVALID_ARGUMENT (`InfeasibleSpecError`: RESOURCE_EXHAUSTED).

The conversion of a spec into the model's configs lives in `spec_configs.py` and the error type
in `spec_errors.py`; both are re-exported here, so callers import this module alone.
The model packages are imported lazily, inside the functions that need them: parsing a spec in
the CLI should not pay for importing JAX until a check needs a preset.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from pathways_lite.v1 import controller_pb2

from .spec_configs import (  # noqa: F401  (re-exported)
    DEFAULT_CHECKPOINT_EVERY_S,
    DEFAULT_PRIORITY,
    DEFAULT_WEIGHT,
    EvalSettings,
    JobConfigs,
    PipelineSettings,
    ServeSettings,
    checkpoint_every_s,
    data_spec,
    digest_every,
    eval_settings,
    job_kind,
    model_config,
    model_overrides,
    optim_config,
    pipeline_settings,
    priority,
    serve_settings,
    to_configs,
    train_config,
    weight,
)
from .spec_errors import INT32_MAX, InfeasibleSpecError, SpecError, quote  # noqa: F401

JobSpec = controller_pb2.JobSpec

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX_LEN = 63
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
WEIGHT_MIN = 1e-3
WEIGHT_MAX = 1000.0


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """What the cluster offers, for the feasibility checks.

    Attributes:
        islands: number of islands in the cluster.
        devices_per_island: devices in every island.
    """

    islands: int
    devices_per_island: int


# ------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------


def validate_spec(spec: JobSpec, cluster: ClusterShape | None = None) -> None:
    """Check every field of a spec, and its feasibility on `cluster` when given.

    Args:
        spec: the job spec as parsed or received on the wire.
        cluster: the cluster the job must fit; None skips the feasibility checks.

    Raises:
        SpecError: the first problem found, naming the field and value.
        InfeasibleSpecError: the spec asks for more islands than the cluster has.
    """
    if not isinstance(spec, JobSpec):
        raise SpecError("spec", type(spec).__name__, f"spec must be a JobSpec, got {quote(spec)}.")
    _check_name(spec.name)
    model_cfg = model_config(spec)  # checks model.preset and model.overrides

    islands = _required_positive(spec, "islands", "islands")
    devices = _required_positive(spec, "devices_per_island", "devices_per_island")
    if not spec.HasField("mesh"):
        raise SpecError(
            "mesh", None, "mesh is missing: give mesh.data and mesh.model (data x model devices)."
        )
    mesh_data = _required_positive(spec.mesh, "data", "mesh.data")
    mesh_model = _required_positive(spec.mesh, "model", "mesh.model")
    if mesh_data * mesh_model != devices:
        raise SpecError(
            "mesh",
            (mesh_data, mesh_model),
            f"mesh.data={mesh_data} x mesh.model={mesh_model} is {mesh_data * mesh_model} "
            f"devices, but devices_per_island={devices}.",
        )

    replicas = _check_pipeline(spec, islands, mesh_data, model_cfg)
    _check_train(spec, replicas, mesh_data, model_cfg)
    _check_data(spec, model_cfg)
    _check_optimizer(spec)
    _check_scheduling(spec)
    _check_lifecycle(spec)
    _check_serve(spec, model_cfg)

    if cluster is not None:
        if devices != cluster.devices_per_island:
            raise SpecError(
                "devices_per_island",
                devices,
                f"devices_per_island={devices} does not match the cluster's islands, which "
                f"have {cluster.devices_per_island} devices each.",
            )
        if islands > cluster.islands:
            raise InfeasibleSpecError(
                "islands",
                islands,
                f"islands={islands} is more than the {cluster.islands} islands of the cluster.",
            )


def _check_name(name: str) -> None:
    if not name:
        raise SpecError("name", name, "name is missing: give the job a name such as 'tiny-2x2'.")
    if len(name) > NAME_MAX_LEN:
        raise SpecError(
            "name",
            name,
            f"name={quote(name)} is {len(name)} characters long; at most {NAME_MAX_LEN} "
            "are allowed.",
        )
    if not NAME_PATTERN.fullmatch(name):
        raise SpecError(
            "name",
            name,
            f"name={quote(name)} must be letters, digits, '.', '_' or '-', starting with a "
            "letter or digit.",
        )


def _required_positive(message: Any, attr: str, path: str, *, maximum: int = INT32_MAX) -> int:
    if not message.HasField(attr):
        raise SpecError(path, None, f"{path} is missing: it must be a positive integer.")
    return _positive(getattr(message, attr), path, maximum=maximum)


def _positive(value: int, path: str, *, maximum: int = INT32_MAX) -> int:
    if value <= 0:
        raise SpecError(path, value, f"{path}={value} must be a positive integer.")
    if value > maximum:
        raise SpecError(path, value, f"{path}={value} is larger than the maximum {maximum}.")
    return value


def _check_train(spec: JobSpec, islands: int, mesh_data: int, model_cfg: Any) -> None:
    if not spec.HasField("train"):
        raise SpecError(
            "train", None, "train is missing: give train.steps, train.global_batch, train.seq_len."
        )
    train = spec.train
    if job_kind(spec) == "train":  # an eval job ignores train.steps
        _required_positive(train, "steps", "train.steps")
    batch = _required_positive(train, "global_batch", "train.global_batch")
    seq_len = _required_positive(train, "seq_len", "train.seq_len")
    if train.HasField("seed") and train.seed < 0:
        raise SpecError(
            "train.seed", train.seed, f"train.seed={train.seed} must be a non-negative integer."
        )
    for field, zero in (
        ("checkpoint_every", "only at the end"),
        ("digest_every", "never compare"),
        ("checkpoint_every_s", "never by time"),
    ):
        value = getattr(train, field)
        if train.HasField(field) and not value >= 0:  # `not >=` also refuses NaN
            raise SpecError(
                f"train.{field}", value, f"train.{field}={value:g} must be >= 0 (0: {zero})."
            )
    if batch % islands:
        raise SpecError(
            "train.global_batch",
            batch,
            f"train.global_batch={batch} is not divisible by islands={islands}.",
        )
    per_island = batch // islands
    if per_island % mesh_data:
        raise SpecError(
            "train.global_batch",
            batch,
            f"train.global_batch={batch} gives {per_island} sequences per island, which is not "
            f"divisible by mesh.data={mesh_data}.",
        )
    max_len = getattr(model_cfg, "max_seq_len", None)
    if max_len is not None and seq_len > max_len:
        raise SpecError(
            "train.seq_len",
            seq_len,
            f"train.seq_len={seq_len} is longer than the model's max_seq_len={max_len} "
            f"(preset {spec.model.preset!r}; raise it with model.overrides.max_seq_len).",
        )


def _check_pipeline(spec: JobSpec, islands: int, mesh_data: int, model_cfg: Any) -> int:
    """The islands that split the global batch: the replicas of each stage of a pipeline
    job (islands / stages), every island otherwise."""
    pipe: PipelineSettings | None = pipeline_settings(spec)
    if pipe is None:
        return islands
    if job_kind(spec) != "train":
        raise SpecError(
            "pipeline",
            pipe.stages,
            f"pipeline is only for train jobs (pipeline.stages={pipe.stages}); this job is "
            f"kind={quote(job_kind(spec))}.",
        )
    if islands % pipe.stages:
        raise SpecError(
            "pipeline.stages",
            pipe.stages,
            f"pipeline.stages={pipe.stages} does not divide islands={islands} "
            "(islands = stages x data-parallel replicas).",
        )
    layers = getattr(model_cfg, "n_layers", None)
    if layers is not None and layers < pipe.stages:
        raise SpecError(
            "pipeline.stages",
            pipe.stages,
            f"pipeline.stages={pipe.stages} is more than the model's n_layers={layers}: every "
            "stage holds at least one block.",
        )
    replicas = islands // pipe.stages
    batch = spec.train.global_batch
    if spec.train.HasField("global_batch") and batch % (replicas * pipe.microbatches * mesh_data):
        raise SpecError(
            "train.global_batch",
            batch,
            f"train.global_batch={batch} is not divisible by replicas={replicas} x "
            f"pipeline.microbatches={pipe.microbatches} x mesh.data={mesh_data} "
            f"(= {replicas * pipe.microbatches * mesh_data}).",
        )
    if spec.data.mixture:
        sources = [entry.source for entry in spec.data.mixture]
        raise SpecError(
            "data.mixture",
            sources,
            f"data.mixture (sources {quote(sources)}) is not supported with pipeline: pipeline "
            "jobs train a plain language model.",
        )
    if spec.data.HasField("task"):
        raise SpecError(
            "data.task",
            spec.data.task,
            f"data.task={quote(spec.data.task)} is not supported with pipeline: pipeline jobs "
            "train a plain language model.",
        )
    # What the stages' hosts read: a plain language-model dataset (DataSpec.is_plain).
    from pathways_lite.model.data import TEXT_SOURCES

    if spec.data.HasField("objective") and spec.data.objective != "lm":
        raise SpecError(
            "data.objective",
            spec.data.objective,
            f"data.objective={quote(spec.data.objective)} is not supported with pipeline: "
            "pipeline jobs train a plain language model (objective 'lm').",
        )
    if spec.data.source and spec.data.source not in TEXT_SOURCES:
        raise SpecError(
            "data.source",
            spec.data.source,
            f"data.source={quote(spec.data.source)} is not supported with pipeline: pipeline "
            f"jobs train a plain language model on a text source ({', '.join(TEXT_SOURCES)}).",
        )
    if spec.HasField("init_from"):
        raise SpecError(
            "init_from",
            None,
            "init_from is not supported with pipeline: a pipeline job starts from its seed.",
        )
    if spec.train.eval_every > 0:
        raise SpecError(
            "train.eval_every",
            spec.train.eval_every,
            f"train.eval_every={spec.train.eval_every} is not supported with pipeline: "
            "evaluation runs the whole model on one island.",
        )
    return replicas


def _check_data(spec: JobSpec, model_cfg: Any) -> None:
    if not spec.HasField("data"):
        raise SpecError("data", None, "data is missing: give at least data.source (e.g. 'stdlib').")
    from pathways_lite.model.data import SOURCES as DATA_SOURCES

    data = spec.data
    if data.mixture:
        _check_mixture(spec)
        data_spec(spec)
        return
    if not data.source:
        raise SpecError(
            "data.source",
            "",
            f"data.source is missing: it must be one of {', '.join(DATA_SOURCES)}.",
        )
    if data.source not in DATA_SOURCES:
        raise SpecError(
            "data.source",
            data.source,
            f"data.source={quote(data.source)} is not one of {', '.join(DATA_SOURCES)}.",
        )
    paths = list(data.paths)
    if data.source in ("stdlib", "stdlib-tasks"):
        if paths:
            raise SpecError(
                "data.paths",
                paths,
                f"data.paths={quote(paths)} must be empty for data.source={data.source!r} (the "
                "standard library is the corpus).",
            )
    elif not paths:
        raise SpecError(
            "data.paths",
            paths,
            f"data.paths is empty: data.source={data.source!r} needs at least one file, folder "
            "or glob.",
        )
    for i, path in enumerate(paths):
        if not path or "\0" in path:
            raise SpecError(
                f"data.paths[{i}]", path, f"data.paths[{i}]={quote(path)} is not a valid path."
            )
    if data.HasField("column"):
        if data.source != "parquet":
            raise SpecError(
                "data.column",
                data.column,
                f"data.column={quote(data.column)} only applies to data.source='parquet', "
                f"not {data.source!r}.",
            )
        if not data.column:
            raise SpecError("data.column", "", "data.column='' must be a non-empty column name.")
    if data.HasField("vocab_size"):
        vocab = _positive(data.vocab_size, "data.vocab_size")
        model_vocab = getattr(model_cfg, "vocab_size", None)
        overridden = "vocab_size" in spec.model.overrides.fields
        if overridden and model_vocab is not None and model_vocab < vocab:
            raise SpecError(
                "model.overrides.vocab_size",
                model_vocab,
                f"model.overrides.vocab_size={model_vocab} is smaller than "
                f"data.vocab_size={vocab}: the model could not embed every token.",
            )
    if data.HasField("max_bytes"):
        _positive(data.max_bytes, "data.max_bytes", maximum=2**62)
    data_spec(spec)  # the data package's own checks


def _check_mixture(spec: JobSpec) -> None:
    data = spec.data
    for name in ("source", "task", "objective", "column"):
        value = getattr(data, name)
        if value:
            raise SpecError(
                f"data.{name}",
                value,
                f"data.{name}={quote(value)} is not used with data.mixture: each entry names its "
                "own source, paths, task and objective.",
            )
    if data.paths:
        raise SpecError(
            "data.paths",
            list(data.paths),
            f"data.paths={quote(list(data.paths))} is not used with data.mixture: give each "
            "entry its own paths.",
        )
    for i, entry in enumerate(data.mixture):
        for j, path in enumerate(entry.paths):
            if not path or "\0" in path:
                field = f"data.mixture[{i}].paths[{j}]"
                raise SpecError(field, path, f"{field}={quote(path)} is not a valid path.")
    if data.HasField("max_bytes"):
        _positive(data.max_bytes, "data.max_bytes", maximum=2**62)
    if data.HasField("vocab_size"):
        _positive(data.vocab_size, "data.vocab_size")


def _check_optimizer(spec: JobSpec) -> None:
    if spec.HasField("optimizer"):
        optim_config(spec)  # each field's range, then OptimConfig's own checks


def _check_scheduling(spec: JobSpec) -> None:
    if spec.HasField("priority") and not PRIORITY_MIN <= spec.priority <= PRIORITY_MAX:
        raise SpecError(
            "priority",
            spec.priority,
            f"priority={spec.priority} is outside [{PRIORITY_MIN}, {PRIORITY_MAX}].",
        )
    if spec.HasField("weight"):
        w = spec.weight
        if not math.isfinite(w) or not WEIGHT_MIN <= w <= WEIGHT_MAX:
            # (A weight near 0 made the scheduler's pass of the job inf, then NaN.)
            raise SpecError(
                "weight", w, f"weight={w!r} must be a number in [{WEIGHT_MIN:g}, {WEIGHT_MAX:g}]."
            )


def _check_lifecycle(spec: JobSpec) -> None:
    """kind, init_from, after, eval and train.eval_every (issue 17). Whether the jobs they
    name exist and hold a checkpoint is the controller's check at submit (core.py)."""
    kind = job_kind(spec)
    if spec.HasField("init_from"):
        init = spec.init_from
        has_job, has_path = init.HasField("job"), init.HasField("checkpoint")
        if has_job == has_path:
            raise SpecError(
                "init_from",
                None,
                "init_from must name exactly one of init_from.job (a job's name or id) and "
                "init_from.checkpoint (a checkpoint folder).",
            )
        if has_job and not init.job:
            raise SpecError("init_from.job", "", "init_from.job='' must name a job.")
        if has_path and not init.checkpoint:
            raise SpecError("init_from.checkpoint", "", "init_from.checkpoint='' must be a folder.")
        if init.HasField("step"):
            if has_path:
                raise SpecError(
                    "init_from.step",
                    init.step,
                    f"init_from.step={init.step} only applies to init_from.job (a checkpoint "
                    "folder holds one step).",
                )
            if init.step < 0:
                raise SpecError(
                    "init_from.step", init.step, f"init_from.step={init.step} must be >= 0."
                )
    elif kind == "eval":
        raise SpecError(
            "init_from",
            None,
            "kind='eval' needs init_from: the job or checkpoint whose parameters it evaluates.",
        )
    elif kind == "serve":
        raise SpecError(
            "init_from",
            None,
            "kind='serve' needs init_from: the job or checkpoint whose parameters it serves.",
        )
    seen = set()
    for i, ref in enumerate(spec.after):
        if not ref:
            raise SpecError(f"after[{i}]", ref, f"after[{i}]='' must name a job.")
        if ref in seen:
            raise SpecError(f"after[{i}]", ref, f"after[{i}]={quote(ref)} is listed twice.")
        if ref == spec.name:
            raise SpecError(
                f"after[{i}]",
                ref,
                f"after[{i}]={quote(ref)} is the job itself: a dependency cycle.",
            )
        seen.add(ref)
    if spec.HasField("init_from") and spec.init_from.job == spec.name:
        raise SpecError(
            "init_from.job",
            spec.init_from.job,
            f"init_from.job={quote(spec.init_from.job)} is the job itself: a dependency cycle.",
        )
    every = spec.train.eval_every
    if spec.train.HasField("eval_every") and every < 0:
        raise SpecError(
            "train.eval_every", every, f"train.eval_every={every} must be >= 0 (0: never)."
        )
    eval_settings(spec)  # each field's range


def _check_serve(spec: JobSpec, model_cfg: Any) -> None:
    """`serve:` (issue 18): only on serve jobs, each field in range."""
    kind = job_kind(spec)
    if kind != "serve":
        if spec.HasField("serve"):
            raise SpecError(
                "serve", None, f"serve settings only apply to kind='serve'; this job is {kind!r}."
            )
        return
    serve_settings(spec, model_cfg.max_seq_len)  # `pipeline` is refused by _check_pipeline
