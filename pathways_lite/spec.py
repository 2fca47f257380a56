"""YAML job specs: text or file -> dict -> JobSpec proto, with one-line errors naming the field.

The YAML maps one to one onto `pathways_lite.v1.JobSpec`; the conversion is protobuf's
`json_format.ParseDict`, which rejects unknown keys. Before it, a walk over the dict against the
proto's descriptor finds the first problem (an unknown key, a value of the wrong type or out of
range) and reports it with its dotted path, because ParseDict's own messages are multi-line and
do not always say where. Semantic checks (presets, divisibility, ranges) are
`pathways_lite.controller.spec.validate_spec`; `load_spec_file(..., validate=True)` runs them.
"""

from __future__ import annotations

import logging
import math
import re
from pathlib import Path
from typing import Any

import yaml
from google.protobuf import json_format
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from pathways_lite.controller.spec import JobSpec, SpecError, quote, validate_spec

logger = logging.getLogger(__name__)

__all__ = [
    "SpecError",
    "load_spec_file",
    "load_spec_text",
    "parse_yaml",
    "spec_from_dict",
    "spec_to_dict",
]

_INT_RANGES = {
    FieldDescriptor.CPPTYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.CPPTYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.CPPTYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.CPPTYPE_UINT64: (0, 2**64 - 1),
}
_INT64_TYPES = (FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT64)
_FLOAT_TYPES = (FieldDescriptor.CPPTYPE_DOUBLE, FieldDescriptor.CPPTYPE_FLOAT)
_STRUCT = "google.protobuf.Struct"
_VALUE = "google.protobuf.Value"


class _SpecLoader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float (YAML 1.1 wants `1.0e-3`) and rejects duplicate
    keys instead of keeping the last one silently."""


_SpecLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def _construct_mapping(loader: _SpecLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    seen: dict[Any, Any] = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
        except TypeError:  # an unhashable key: the constructor below reports it
            break
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {quote(key)}", key_node.start_mark
            )
        seen[key] = True
    return yaml.SafeLoader.construct_mapping(loader, node, deep=deep)


_SpecLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def parse_yaml(text: str | bytes, source: str = "spec") -> dict[str, Any]:
    """Parse YAML text into a dict.

    Args:
        text: the YAML document.
        source: how to call the document in errors (a file name).

    Raises:
        SpecError: the text is not YAML (the message gives the line and column), or its top
            level is not a mapping.
    """
    try:
        data = yaml.load(text, Loader=_SpecLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "somewhere"
        problem = " ".join(str(e.problem or e.context or "invalid YAML").split())
        raise SpecError(
            source, None, f"{source} does not parse as YAML at {where}: {problem}."
        ) from None
    except (yaml.YAMLError, UnicodeDecodeError, ValueError, RecursionError) as e:
        problem = " ".join(str(e).split())[:200]
        raise SpecError(source, None, f"{source} does not parse as YAML: {problem}.") from None
    if data is None:
        raise SpecError(source, None, f"{source} is empty: a job spec is a YAML mapping.")
    if not isinstance(data, dict):
        raise SpecError(
            source,
            type(data).__name__,
            f"{source} must be a YAML mapping of spec fields, not a {type(data).__name__}.",
        )
    return data


def spec_from_dict(data: dict[str, Any]) -> JobSpec:
    """Convert a spec dict (the YAML's structure) into a JobSpec proto.

    Raises:
        SpecError: an unknown key or a value of the wrong type, naming its dotted path.
    """
    if not isinstance(data, dict):
        raise SpecError(
            "spec", type(data).__name__, f"spec must be a mapping, not {type(data).__name__}."
        )
    _check_message(data, JobSpec.DESCRIPTOR, "")
    spec = JobSpec()
    try:
        json_format.ParseDict(data, spec)
    except (json_format.ParseError, ValueError, TypeError, RecursionError) as e:
        # The walk above should have caught it; ParseDict stays the authority on the format.
        text = " ".join(str(e).split())
        match = re.search(r"at \"?([A-Za-z0-9_.\[\]]+)\"?", text)
        field = match.group(1).removeprefix("JobSpec").strip(".") if match else ""
        raise SpecError(field or "spec", None, f"{field or 'spec'}: {text[:300]}") from None
    return spec


def load_spec_text(text: str | bytes, source: str = "spec", *, validate: bool = False) -> JobSpec:
    """YAML text -> JobSpec.

    Args:
        text: the YAML document.
        source: how to call the document in errors.
        validate: also run every semantic check (`controller.spec.validate_spec`).

    Raises:
        SpecError: the YAML does not parse, has unknown keys or wrong types, or (with
            validate) fails a semantic check.
    """
    spec = spec_from_dict(parse_yaml(text, source))
    if validate:
        validate_spec(spec)
    return spec


def load_spec_file(path: str | Path, *, validate: bool = False) -> JobSpec:
    """A YAML file -> JobSpec (see `load_spec_text`).

    Raises:
        SpecError: the file cannot be read, or as `load_spec_text`.
    """
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as e:
        raise SpecError(
            str(path), None, f"spec file {str(path)!r} cannot be read: {e.strerror or e}."
        ) from None
    return load_spec_text(text, source=path.name, validate=validate)


def spec_to_dict(spec: JobSpec) -> dict[str, Any]:
    """A JobSpec as the dict its YAML would hold (field names as written in specs)."""
    data = json_format.MessageToDict(spec, preserving_proto_field_name=True)
    _ints_from_strings(data, JobSpec.DESCRIPTOR)
    return data


def _ints_from_strings(data: dict[str, Any], descriptor: Descriptor) -> None:
    """Undo proto3 JSON's strings for 64-bit integers, in place (YAML has real integers)."""
    for field in descriptor.fields:
        if field.name not in data:
            continue
        if field.cpp_type in _INT64_TYPES and not field.is_repeated:
            data[field.name] = int(data[field.name])
        elif (
            field.cpp_type == FieldDescriptor.CPPTYPE_MESSAGE
            and not field.is_repeated
            and field.message_type.full_name not in (_STRUCT, _VALUE)
        ):
            _ints_from_strings(data[field.name], field.message_type)


# ------------------------------------------------------------------------------------------
# The walk
# ------------------------------------------------------------------------------------------


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


def _check_message(data: dict, descriptor: Descriptor, prefix: str) -> None:
    by_name = {f.name: f for f in descriptor.fields}
    by_name.update({f.json_name: f for f in descriptor.fields})
    for key, value in data.items():
        if not isinstance(key, str) or key not in by_name:
            known = ", ".join(f.name for f in descriptor.fields)
            where = f"keys of {prefix}" if prefix else "top-level keys"
            path = _join(prefix, str(key))
            raise SpecError(
                path, key, f"{path}: unknown key {quote(key)} in the spec; {where} are: {known}."
            )
        field = by_name[key]
        path = _join(prefix, field.name)
        if value is None:
            continue  # ParseDict treats null as "unset" (a Value field keeps it as null)
        if field.is_repeated:
            if not isinstance(value, list):
                raise SpecError(
                    path,
                    value,
                    f"{path}={quote(value)} must be a list (write [{quote(value)}] for one).",
                )
            for i, item in enumerate(value):
                _check_value(item, field, f"{path}[{i}]")
        else:
            _check_value(value, field, path)


def _check_value(value: Any, field: FieldDescriptor, path: str) -> None:
    cpp = field.cpp_type
    if cpp == FieldDescriptor.CPPTYPE_MESSAGE:
        full_name = field.message_type.full_name
        if full_name == _STRUCT:
            if not isinstance(value, dict):
                raise SpecError(path, value, f"{path}={quote(value)} must be a mapping.")
            _check_struct(value, path)
        elif full_name == _VALUE:
            _check_json_value(value, path)
        else:
            if not isinstance(value, dict):
                raise SpecError(
                    path, value, f"{path}={quote(value)} must be a mapping of {path} fields."
                )
            _check_message(value, field.message_type, path)
    elif cpp in _INT_RANGES:
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            value = int(value)
        if cpp in _INT64_TYPES and isinstance(value, str) and re.fullmatch(r"-?[0-9]{1,20}", value):
            value = int(value)  # proto3 JSON writes 64-bit integers as strings
        if isinstance(value, bool) or not isinstance(value, int):
            raise SpecError(path, value, f"{path}={quote(value)} must be an integer.")
        low, high = _INT_RANGES[cpp]
        if not low <= value <= high:
            raise SpecError(path, value, f"{path}={value} is out of range [{low}, {high}].")
    elif cpp in _FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise SpecError(path, value, f"{path}={quote(value)} must be a number.")
        if isinstance(value, int) and abs(value) > 2**53:
            raise SpecError(path, value, f"{path}={value} is too large.")
        if isinstance(value, float) and not math.isfinite(value):
            raise SpecError(path, value, f"{path}={value!r} must be a finite number.")
    elif cpp == FieldDescriptor.CPPTYPE_BOOL:
        if not isinstance(value, bool):
            raise SpecError(path, value, f"{path}={quote(value)} must be true or false.")
    elif cpp == FieldDescriptor.CPPTYPE_STRING:
        if not isinstance(value, str):
            raise SpecError(path, value, f"{path}={quote(value)} must be a string.")
        if field.type == FieldDescriptor.TYPE_STRING and not _utf8(value):
            raise SpecError(path, value, f"{path}={quote(value)} is not valid UTF-8 text.")
    elif cpp == FieldDescriptor.CPPTYPE_ENUM:
        names = [v.name for v in field.enum_type.values]
        if value not in names:
            raise SpecError(path, value, f"{path}={quote(value)} is not one of {names}.")


def _check_struct(value: dict, path: str) -> None:
    for key, item in value.items():
        if not isinstance(key, str):
            raise SpecError(
                f"{path}.{key}", key, f"{path} has a key {quote(key)} that is not a string."
            )
        _check_json_value(item, f"{path}.{key}")


def _check_json_value(value: Any, path: str) -> None:
    # Every Struct/Value in the spec holds config scalars; refusing lists and mappings here
    # also keeps YAML alias bombs from being walked.
    if value is None or isinstance(value, bool):
        return
    if isinstance(value, int | float):
        if isinstance(value, int) and abs(value) > 2**53:
            raise SpecError(path, value, f"{path}={value} is too large.")
        return
    if isinstance(value, str):
        if not _utf8(value):
            raise SpecError(path, value, f"{path}={quote(value)} is not valid UTF-8 text.")
        return
    raise SpecError(
        path,
        type(value).__name__,
        f"{path}={quote(value)} must be a number, a string, a boolean or null.",
    )


def _utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates
        return False
    return True


def _references(spec: JobSpec) -> list[tuple[str, str]]:
    """(field, job reference) of a spec's `after` and `init_from.job`."""
    refs = [(f"after[{i}]", ref) for i, ref in enumerate(spec.after)]
    if spec.init_from.HasField("job"):
        refs.append(("init_from.job", spec.init_from.job))
    return refs


def chain_order(specs: list[JobSpec]) -> list[int]:
    """The order to submit the specs of one `submit a.yaml b.yaml ...` call in: a spec whose
    `after` or `init_from.job` names another spec of the call comes after it (file order
    otherwise). References to jobs outside the call are left to the controller.

    Raises:
        SpecError: two specs of the call share a name, or the references close a cycle
            (the message walks it).
    """
    index: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.name in index:
            raise SpecError(
                "name",
                spec.name,
                f"name={quote(spec.name)} is given to two specs of this submission (files "
                f"{index[spec.name] + 1} and {i + 1}): a chain names each job once.",
            )
        index[spec.name] = i
    edges = {
        i: [(field, ref, index[ref]) for field, ref in _references(s) if ref in index]
        for i, s in enumerate(specs)
    }
    order: list[int] = []
    state: dict[int, str] = {}

    def visit(i: int, path: list[tuple[int, str, str]]) -> None:
        if state.get(i) == "done":
            return
        if state.get(i) == "open":
            start = next(k for k, (j, _, _) in enumerate(path) if j == i)
            cycle = path[start:]
            walk = " -> ".join(specs[j].name for j, _, _ in cycle) + f" -> {specs[i].name}"
            _, field, ref = cycle[-1]
            raise SpecError(
                field,
                ref,
                f"{field}={quote(ref)} in job {specs[cycle[-1][0]].name!r} closes a "
                f"dependency cycle: {walk}.",
            )
        state[i] = "open"
        for field, ref, j in edges[i]:
            visit(j, [*path, (i, field, ref)])
        state[i] = "done"
        order.append(i)

    for i in range(len(specs)):
        visit(i, [])
    return order


def with_job_ids(spec: JobSpec, ids: dict[str, str]) -> JobSpec:
    """A copy of `spec` whose references to jobs of the same submission (by name) are ids."""
    out = JobSpec()
    out.CopyFrom(spec)
    for i, ref in enumerate(out.after):
        out.after[i] = ids.get(ref, ref)
    if out.init_from.HasField("job"):
        out.init_from.job = ids.get(out.init_from.job, out.init_from.job)
    return out
