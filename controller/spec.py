"""Every semantic check of a JobSpec, and its conversion into the model's configs.

The controller runs `validate_spec` on every submission, from any client; the CLI runs it too,
to fail before contacting the controller. Errors are `SpecError`s whose message is one sentence
naming the field and the value (`train.global_batch=10 is not divisible by islands=3.`); the
servicer answers them with INVALID_ARGUMENT (`InfeasibleSpecError`: RESOURCE_EXHAUSTED).

The model packages are imported lazily, inside the functions that need them: parsing a spec in
the CLI should not pay for importing JAX until a check needs a preset.
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

logger = logging.getLogger(__name__)

JobSpec = controller_pb2.JobSpec

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
NAME_MAX_LEN = 63
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
DEFAULT_PRIORITY = 0
WEIGHT_MAX = 1000.0
DEFAULT_WEIGHT = 1.0
DEFAULT_CHECKPOINT_EVERY_S = 300.0  # a crash loses at most about five minutes by default
INT32_MAX = 2**31 - 1
# Values quoted in messages are cut to this many characters (a name may be megabytes long).
_QUOTE_MAX = 48


class SpecError(ValueError):
    """A job spec that cannot run: `field` is its dotted path, `value` the offending value.

    `str(error)` is the message alone: one sentence that names the field and quotes the value.
    """

    def __init__(self, field: str, value: Any, message: str):
        super().__init__(message)
        self.field = field
        self.value = value
        self.message = message


class InfeasibleSpecError(SpecError):
    """A well-formed spec that the current cluster can never run (RESOURCE_EXHAUSTED)."""


@dataclasses.dataclass(frozen=True)
class ClusterShape:
    """What the cluster offers, for the feasibility checks.

    Attributes:
        islands: number of islands in the cluster.
        devices_per_island: devices in every island.
    """

    islands: int
    devices_per_island: int


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


def quote(value: Any) -> str:
    """The repr of a value, cut short so that an absurd value still gives a one-line message."""
    text = repr(value)
    if len(text) > _QUOTE_MAX:
        text = text[: _QUOTE_MAX - 3] + "..."
    return text.replace("\n", "\\n")


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

    _check_train(spec, islands, mesh_data, model_cfg)
    _check_data(spec, model_cfg)
    _check_optimizer(spec)
    _check_scheduling(spec)

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


def _check_data(spec: JobSpec, model_cfg: Any) -> None:
    if not spec.HasField("data"):
        raise SpecError("data", None, "data is missing: give at least data.source (e.g. 'stdlib').")
    from pathways_lite.model.data import SOURCES as DATA_SOURCES

    data = spec.data
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
    if data.source == "stdlib":
        if paths:
            raise SpecError(
                "data.paths",
                paths,
                f"data.paths={quote(paths)} must be empty for data.source='stdlib' (the "
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
        if not math.isfinite(w) or not 0 < w <= WEIGHT_MAX:
            raise SpecError("weight", w, f"weight={w!r} must be a number in (0, {WEIGHT_MAX:g}].")


# ------------------------------------------------------------------------------------------
# Conversion to the model's configs
# ------------------------------------------------------------------------------------------


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
    from pathways_lite.model.config import PalmConfig

    hints = typing.get_type_hints(PalmConfig)
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
    return overrides


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


def train_config(spec: JobSpec) -> Any:
    """The spec's TrainConfig (steps, global batch, sequence length, seed)."""
    from pathways_lite.model.train import TrainConfig

    train = spec.train
    try:
        return TrainConfig(
            steps=train.steps,
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
    kwargs: dict[str, Any] = {"source": data.source, "paths": tuple(data.paths)}
    for name in ("column", "vocab_size", "max_bytes", "skip_undecodable"):
        if data.HasField(name):
            kwargs[name] = getattr(data, name)
    try:
        return DataSpec(**kwargs)
    except (ValueError, TypeError) as e:
        text = str(e)
        field = next((f"data.{k}" for k in kwargs if f"data.{k}=" in text), "data")
        if field not in text:
            text = f"{field}: {text}"
        raise SpecError(field, kwargs.get(field.removeprefix("data.")), text) from None


def to_configs(spec: JobSpec, *, vocab_size: int | None = None) -> JobConfigs:
    """Turn a spec into the model package's configs, validating it first.

    Args:
        spec: the job spec.
        vocab_size: the trained tokenizer's vocabulary size (see `model_config`); None
            means data.vocab_size (the size the tokenizer is trained to).

    Raises:
        SpecError: the spec does not validate.
    """
    validate_spec(spec)
    data = data_spec(spec)
    return JobConfigs(
        model=model_config(spec, vocab_size=data.vocab_size if vocab_size is None else vocab_size),
        optim=optim_config(spec),
        train=train_config(spec),
        data=data,
    )
