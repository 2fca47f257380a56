"""A validated JobSpec turned into the model's configs, and the scheduling fields' defaults.

`spec.py` checks a spec; this module converts it (`to_configs`, `model_config`, ...). Both are
re-exported by `spec.py`, which callers import as `spec_lib`. The model packages are imported
lazily, inside the functions that need them.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import typing
from typing import Any

from google.protobuf import json_format, struct_pb2

from pathways_lite.v1 import controller_pb2

from .spec_errors import INT32_MAX, SpecError, quote

logger = logging.getLogger(__name__)

JobSpec = controller_pb2.JobSpec

DEFAULT_PRIORITY = 0
DEFAULT_WEIGHT = 1.0
DEFAULT_CHECKPOINT_EVERY_S = 300.0  # a crash loses at most about five minutes by default


@dataclasses.dataclass(frozen=True)
class JobConfigs:
    """A validated spec turned into the model package's configs.

    Attributes:
        model: pathways_lite.model.config.PalmConfig.
        optim: pathways_lite.model.optim.OptimConfig.
        train: pathways_lite.model.train.TrainConfig.
        data: pathways_lite.model.data.DataSpec.
    """

    model: Any
    optim: Any
    train: Any
    data: Any


def priority(spec: JobSpec) -> int:
    """The spec's priority, or the default."""
    return spec.priority if spec.HasField("priority") else DEFAULT_PRIORITY


def checkpoint_every_s(spec: JobSpec) -> float:
    """Seconds between time-based checkpoints (0: none by time), or the default."""
    train = spec.train
    return (
        train.checkpoint_every_s
        if train.HasField("checkpoint_every_s")
        else (DEFAULT_CHECKPOINT_EVERY_S)
    )


def weight(spec: JobSpec) -> float:
    """The spec's fair-share weight, or the default."""
    return spec.weight if spec.HasField("weight") else DEFAULT_WEIGHT


def model_overrides(spec: JobSpec) -> dict[str, Any]:
    """model.overrides as PalmConfig keyword arguments (whole numbers become ints).

    Raises:
        SpecError: an override is not a PalmConfig field or has a value of the wrong kind.
    """
    from pathways_lite.model.config import PalmConfig, field_hints

    hints = field_hints(PalmConfig)
    fields = [f.name for f in dataclasses.fields(PalmConfig)]
    overrides: dict[str, Any] = {}
    for key, value in sorted(spec.model.overrides.fields.items()):
        path = f"model.overrides.{key}"
        if key not in hints:
            raise SpecError(
                path,
                key,
                f"{path}: unknown key {quote(key)}; PalmConfig fields are: {', '.join(fields)}.",
            )
        overrides[key] = _struct_scalar(value, path, hints[key])
        if key == "n_layers" and isinstance(overrides[key], int) and overrides[key] > MAX_LAYERS:
            raise SpecError(
                path,
                overrides[key],
                f"{path}={overrides[key]} is more than {MAX_LAYERS} layers (PaLM 540B has "
                "118); a submission's memory estimate grows faster than its layers.",
            )
    return overrides


# The most layers a job's model may have: resolving a job (its memory estimate, on the
# controller's API thread) took 3 s at 118 layers, 20 s at 300 and minutes at 1,000.
MAX_LAYERS = 256


def _struct_scalar(value: struct_pb2.Value, path: str, hint: Any) -> Any:
    """One Struct value as the Python value a dataclass field of type `hint` expects."""
    kind = value.WhichOneof("kind")
    allowed = set(typing.get_args(hint)) or {hint}
    if kind == "null_value":
        if type(None) not in allowed:
            raise SpecError(path, None, f"{path}=null is not allowed: it needs a value.")
        return None
    if kind == "bool_value":
        if bool not in allowed:
            raise SpecError(
                path, value.bool_value, f"{path}={value.bool_value!r} must not be a boolean."
            )
        return value.bool_value
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise SpecError(path, number, f"{path}={number!r} must be a finite number.")
        if int in allowed:
            if not number.is_integer():
                raise SpecError(path, number, f"{path}={number!r} must be an integer.")
            if abs(number) > INT32_MAX:
                raise SpecError(
                    path, number, f"{path}={number:.0f} is larger than the maximum {INT32_MAX}."
                )
            return int(number)
        if float in allowed:
            return number
        raise SpecError(path, number, f"{path}={number!r} must not be a number.")
    if kind == "string_value":
        if str not in allowed:
            raise SpecError(
                path, value.string_value, f"{path}={quote(value.string_value)} must not be text."
            )
        return value.string_value
    raise SpecError(
        path, kind, f"{path} must be a number, a string, a boolean or null, not a {kind}."
    )


def model_config(spec: JobSpec, *, vocab_size: int | None = None) -> Any:
    """The spec's PalmConfig: model.preset with model.overrides applied.

    Args:
        spec: the job spec.
        vocab_size: the trained tokenizer's vocabulary size, which replaces the preset's
            placeholder unless model.overrides sets vocab_size explicitly.

    Raises:
        SpecError: no model section, an unknown preset, or an invalid override.
    """
    from pathways_lite.model.config import PRESETS, PalmConfig

    if not spec.HasField("model"):
        raise SpecError(
            "model", None, f"model is missing: give model.preset (one of {', '.join(PRESETS)})."
        )
    preset = spec.model.preset
    if not preset:
        raise SpecError(
            "model.preset", "", f"model.preset is missing: it must be one of {', '.join(PRESETS)}."
        )
    if preset not in PRESETS:
        raise SpecError(
            "model.preset",
            preset,
            f"model.preset={quote(preset)} is not a known preset; known presets: "
            f"{', '.join(PRESETS)}.",
        )
    overrides = model_overrides(spec)
    if vocab_size is not None and "vocab_size" not in overrides:
        overrides["vocab_size"] = vocab_size
    try:
        return PalmConfig.from_preset(preset, **overrides)
    except (ValueError, TypeError) as e:
        # PalmConfig names the field first ("d_model=-1 must be ..."): prefix its path.
        text = str(e)
        for key in overrides:
            if text.startswith(f"{key}="):
                raise SpecError(
                    f"model.overrides.{key}",
                    overrides[key],
                    text.replace(key, f"model.overrides.{key}", 1),
                ) from None
        field = "model.overrides" if overrides else "model.preset"
        raise SpecError(field, preset, f"{field} (preset {preset!r}): {text}") from None


# The OptimConfig fields the spec's optimizer section maps onto, one to one.
_OPTIM_FIELDS = (
    "learning_rate",
    "warmup_steps",
    "beta1",
    "decay_rate",
    "clip_norm",
    "clipping_threshold",
    "multiply_by_parameter_scale",
    "weight_decay",
    "eps",
)


def optim_config(spec: JobSpec) -> Any:
    """The spec's OptimConfig: its defaults with the optimizer section's set fields.

    Raises:
        SpecError: a value outside its range, naming `optimizer.<field>`.
    """
    from pathways_lite.model.optim import OptimConfig

    kwargs: dict[str, Any] = {}
    if spec.HasField("optimizer"):
        opt = spec.optimizer
        for name in _OPTIM_FIELDS:
            if opt.HasField(name):
                kwargs[name] = _optim_value(name, getattr(opt, name))
    try:
        return OptimConfig(**kwargs)
    except (ValueError, TypeError) as e:
        text = str(e)
        for name, value in kwargs.items():
            if text.startswith(f"{name}="):
                raise SpecError(
                    f"optimizer.{name}", value, text.replace(name, f"optimizer.{name}", 1)
                ) from None
        raise SpecError("optimizer", None, f"optimizer: {text}") from None


def _optim_value(name: str, value: Any) -> Any:
    path = f"optimizer.{name}"
    if name == "weight_decay":
        kind = value.WhichOneof("kind")
        if kind == "null_value":
            return None
        if kind == "string_value" and value.string_value == "dynamic":
            return "dynamic"
        if kind == "number_value" and math.isfinite(value.number_value):
            if value.number_value < 0:
                raise SpecError(
                    path, value.number_value, f"{path}={value.number_value!r} must be >= 0."
                )
            return value.number_value
        shown = json_format.MessageToJson(value, indent=None)
        raise SpecError(
            path,
            shown,
            f"{path}={quote(shown)} must be 'dynamic' (lr^2), a number >= 0, or null.",
        )
    if isinstance(value, bool):
        return value
    if isinstance(value, float) and not math.isfinite(value):
        raise SpecError(path, value, f"{path}={value!r} must be a finite number.")
    ranges = {
        "learning_rate": (lambda v: v > 0, "must be positive"),
        "warmup_steps": (lambda v: v >= 0, "must be >= 0"),
        "beta1": (lambda v: 0 <= v < 1, "must be in [0, 1)"),
        "decay_rate": (lambda v: 0 < v <= 1, "must be in (0, 1]"),
        "clip_norm": (lambda v: v >= 0, "must be > 0 (or 0 to disable clipping)"),
        "clipping_threshold": (
            lambda v: v == 0 or v >= 1,
            "must be >= 1 (or 0 to disable update clipping)",
        ),
        "eps": (lambda v: v > 0, "must be positive"),
    }
    ok, rule = ranges[name]
    if not ok(value):
        raise SpecError(path, value, f"{path}={value!r} {rule}.")
    if name in ("clip_norm", "clipping_threshold") and value == 0:
        return None  # 0 disables: OptimConfig spells that None
    return value


KINDS = ("train", "eval", "serve")
DEFAULT_SERVE_MAX_BATCH = 8
SERVE_MAX_BATCH = 256
DEFAULT_SERVE_TARGET_P99_MS = 200.0
DEFAULT_EVAL_SHOTS = 0
DEFAULT_EVAL_MAX_EXAMPLES = 200
EVAL_MAX_SHOTS = 32
EVAL_SPLITS = ("heldout", "train")


PIPELINE_SCHEDULES = ("gpipe", "1f1b")
DEFAULT_PIPELINE_SCHEDULE = "1f1b"


@dataclasses.dataclass(frozen=True)
class PipelineSettings:
    """`pipeline:` with its defaults: stages, microbatches (2 x stages), schedule (1f1b),
    recompute (false: a stage stashes its forwards' residuals for the backwards)."""

    stages: int
    microbatches: int
    schedule: str = DEFAULT_PIPELINE_SCHEDULE
    recompute: bool = False


def pipeline_settings(spec: JobSpec) -> PipelineSettings | None:
    """The spec's `pipeline:` settings (None: not pipelined), defaults for unset fields.

    Raises:
        SpecError: a value out of range or an unknown schedule, naming the field.
    """
    if not spec.HasField("pipeline"):
        return None
    p = spec.pipeline
    if not p.HasField("stages"):
        raise SpecError(
            "pipeline.stages", None, "pipeline.stages is missing: give at least 2 stages."
        )
    if p.stages < 2:
        raise SpecError(
            "pipeline.stages", p.stages, f"pipeline.stages={p.stages} must be at least 2."
        )
    microbatches = p.microbatches if p.HasField("microbatches") else 2 * p.stages
    if microbatches < 1:
        raise SpecError(
            "pipeline.microbatches",
            microbatches,
            f"pipeline.microbatches={microbatches} must be a positive integer.",
        )
    schedule = p.schedule if p.HasField("schedule") else DEFAULT_PIPELINE_SCHEDULE
    if schedule not in PIPELINE_SCHEDULES:
        raise SpecError(
            "pipeline.schedule",
            schedule,
            f"pipeline.schedule={quote(schedule)} is not one of {', '.join(PIPELINE_SCHEDULES)}.",
        )
    return PipelineSettings(p.stages, microbatches, schedule, p.recompute)


def job_kind(spec: JobSpec) -> str:
    """`kind`: `train` (the default), `eval` or `serve`.

    Raises:
        SpecError: another value.
    """
    kind = spec.kind if spec.HasField("kind") else "train"
    if kind not in KINDS:
        raise SpecError("kind", kind, f"kind={quote(kind)} is not one of {', '.join(KINDS)}.")
    return kind


@dataclasses.dataclass(frozen=True)
class EvalSettings:
    """`eval:` with its defaults: k-shot prompts, examples per source, split."""

    shots: int = DEFAULT_EVAL_SHOTS
    max_examples: int = DEFAULT_EVAL_MAX_EXAMPLES
    split: str = "heldout"


def eval_settings(spec: JobSpec) -> EvalSettings:
    """The spec's `eval:` settings, defaults for unset fields.

    Raises:
        SpecError: a value out of range, naming the field.
    """
    e = spec.eval
    shots = e.shots if e.HasField("shots") else DEFAULT_EVAL_SHOTS
    if not 0 <= shots <= EVAL_MAX_SHOTS:
        raise SpecError(
            "eval.shots", shots, f"eval.shots={shots} must be in [0, {EVAL_MAX_SHOTS}]."
        )
    n = e.max_examples if e.HasField("max_examples") else DEFAULT_EVAL_MAX_EXAMPLES
    if n <= 0:
        raise SpecError(
            "eval.max_examples", n, f"eval.max_examples={n} must be a positive integer."
        )
    split = e.split if e.HasField("split") else "heldout"
    if split not in EVAL_SPLITS:
        raise SpecError(
            "eval.split",
            split,
            f"eval.split={quote(split)} is not one of {', '.join(EVAL_SPLITS)}.",
        )
    return EvalSettings(shots, n, split)


def train_config(spec: JobSpec) -> Any:
    """The spec's TrainConfig (steps, global batch, sequence length, seed)."""
    from pathways_lite.model.train import TrainConfig

    train = spec.train
    try:
        return TrainConfig(
            # An eval job takes no step: train.steps is ignored.
            steps=train.steps if job_kind(spec) == "train" else 1,
            global_batch=train.global_batch,
            seq_len=train.seq_len,
            seed=train.seed if train.HasField("seed") else 0,
        )
    except ValueError as e:
        raise SpecError("train", None, str(e)) from None


def digest_every(spec: JobSpec) -> int | None:
    """train.digest_every, or None when unset (the controller picks by model size)."""
    return spec.train.digest_every if spec.train.HasField("digest_every") else None


def data_spec(spec: JobSpec) -> Any:
    """The spec's pathways_lite.model.data.DataSpec (its defaults for unset fields).

    Raises:
        SpecError: the data package rejects the values (its message names `data.<field>`).
    """
    from pathways_lite.model.data import DataSpec

    data = spec.data
    kwargs: dict[str, Any] = {"source": data.source or "stdlib", "paths": tuple(data.paths)}
    for name in (
        "column",
        "vocab_size",
        "max_bytes",
        "skip_undecodable",
        "task",
        "objective",
        "mixture_weights",
        "mixture_every",
    ):
        if data.HasField(name):
            kwargs[name] = getattr(data, name)
    entries = []
    for entry in data.mixture:
        e: dict[str, Any] = {"source": entry.source, "paths": tuple(entry.paths)}
        for name in ("task", "objective", "weight", "column"):
            if entry.HasField(name):
                e[name] = getattr(entry, name)
        entries.append(e)
    if entries:
        kwargs["mixture"] = tuple(entries)
    try:
        return DataSpec(**kwargs)
    except (ValueError, TypeError) as e:
        text = str(e)
        named = re.search(r"(data(?:\.\w+|\[\d+\])*)(?:=| weights)", text)
        field = named.group(1) if named else "data"
        if field not in text:
            text = f"{field}: {text}"
        value = kwargs.get(field.removeprefix("data."))
        raise SpecError(field, value, text) from None


def to_configs(
    spec: JobSpec, *, vocab_size: int | None = None, validated: bool = False
) -> JobConfigs:
    """Turn a spec into the model package's configs, validating it first.

    Args:
        spec: the job spec.
        vocab_size: the trained tokenizer's vocabulary size (see `model_config`); None
            means data.vocab_size (the size the tokenizer is trained to).
        validated: the caller has just validated this very spec: not again.

    Raises:
        SpecError: the spec does not validate.
    """
    from .spec import validate_spec  # spec.py imports this module

    if not validated:
        validate_spec(spec)
    data = data_spec(spec)
    return JobConfigs(
        model=model_config(spec, vocab_size=data.vocab_size if vocab_size is None else vocab_size),
        optim=optim_config(spec),
        train=train_config(spec),
        data=data,
    )


@dataclasses.dataclass(frozen=True)
class ServeSettings:
    """`serve:` with its defaults (issue 18): cache slots, positions per slot, latency target."""

    max_batch: int
    max_seq_len: int
    target_p99_ms: float


def serve_settings(spec: JobSpec, model_max_seq_len: int) -> ServeSettings:
    """The spec's `serve:` settings, defaults for unset fields.

    Raises:
        SpecError: a value out of range, naming the field.
    """
    s = spec.serve
    max_batch = s.max_batch if s.HasField("max_batch") else DEFAULT_SERVE_MAX_BATCH
    if not 1 <= max_batch <= SERVE_MAX_BATCH:
        raise SpecError(
            "serve.max_batch",
            max_batch,
            f"serve.max_batch={max_batch} must be in [1, {SERVE_MAX_BATCH}].",
        )
    max_seq_len = s.max_seq_len if s.HasField("max_seq_len") else model_max_seq_len
    if not 2 <= max_seq_len <= model_max_seq_len:
        raise SpecError(
            "serve.max_seq_len",
            max_seq_len,
            f"serve.max_seq_len={max_seq_len} must be in [2, the model's max_seq_len="
            f"{model_max_seq_len}].",
        )
    target = s.target_p99_ms if s.HasField("target_p99_ms") else DEFAULT_SERVE_TARGET_P99_MS
    if not math.isfinite(target) or target <= 0:
        raise SpecError(
            "serve.target_p99_ms",
            target,
            f"serve.target_p99_ms={target!r} must be a positive number of milliseconds.",
        )
    return ServeSettings(max_batch, max_seq_len, float(target))
