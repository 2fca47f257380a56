"""The one table mapping logical axis names to mesh axes, and the helpers that apply it.

Layers name the axes of their parameters and activations only by logical names ("embed",
"mlp", "batch", ...). This module is the single place where those names meet the mesh axes
("data", "model"), in the spirit of MaxText's `logical_axis_rules`:

- parameters: "embed" is fully sharded over "data" (FSDP, as PaLM did within a pod), the
  heads / MLP / vocabulary dimensions over "model" (tensor parallelism);
- activations: "batch" over "data", heads / MLP / vocabulary over "model"; the residual
  stream's feature axis ("act_embed") stays whole.

A logical name absent from the table, or mapped to None, is replicated. A mesh axis is used at
most once per array, a mesh axis the mesh lacks is dropped, and a dimension that the mesh axis
size does not divide is replicated rather than unevenly split.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

logger = logging.getLogger(__name__)

MESH_AXES = ("data", "model")

LOGICAL_RULES: tuple[tuple[str, str | None], ...] = (
    # activations
    ("batch", "data"),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "model"),
    ("act_mlp", "model"),
    ("act_vocab", "model"),
    ("act_kv", None),
    # parameters
    ("vocab", "model"),
    ("embed", "data"),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", None),
    ("head_dim", None),
)

Rules = Sequence[tuple[str, str | None]]


def _rules_dict(rules: Rules) -> dict[str, str | None]:
    table: dict[str, str | None] = {}
    for name, axis in rules:
        table.setdefault(name, axis)  # the first rule for a name wins
    return table


def logical_to_spec(names: Sequence[str | None], rules: Rules = LOGICAL_RULES) -> PartitionSpec:
    """Map logical axis names to a PartitionSpec; a mesh axis is used at most once.

    Args:
        names: one logical name (or None) per array dimension.
        rules: (logical name, mesh axis or None) pairs; the first match wins.

    Returns:
        The PartitionSpec; names without a rule are replicated (None).
    """
    table = _rules_dict(rules)
    used: set[str] = set()
    out: list[str | None] = []
    for name in names:
        axis = table.get(name) if name is not None else None
        if axis is not None and axis in used:
            axis = None
        if axis is not None:
            used.add(axis)
        out.append(axis)
    return PartitionSpec(*out)


def _mesh_sizes(mesh: Mesh | Any) -> dict[str, int]:
    return dict(mesh.shape)


def spec_for_shape(
    shape: Sequence[int],
    names: Sequence[str | None],
    mesh_shape: Mapping[str, int],
    rules: Rules = LOGICAL_RULES,
) -> PartitionSpec:
    """The PartitionSpec of an array of `shape` on a mesh of `mesh_shape` (axis -> size).

    Mesh axes the mesh does not have are dropped, and a dimension its mesh axis does not
    divide evenly is replicated.
    """
    if len(shape) != len(names):
        raise ValueError(
            f"Logical axis names {tuple(names)} do not match an array of shape {tuple(shape)}."
        )
    spec = logical_to_spec(names, rules)
    out: list[str | None] = []
    for dim, axis in zip(shape, spec, strict=True):
        if axis is None or axis not in mesh_shape:
            out.append(None)
        elif dim % mesh_shape[axis]:
            logger.debug("dimension %d not divisible by mesh axis %s; replicated", dim, axis)
            out.append(None)
        else:
            out.append(axis)
    return PartitionSpec(*out)


def shard_divisor(
    shape: Sequence[int],
    names: Sequence[str | None] | None,
    mesh_shape: Mapping[str, int],
    rules: Rules = LOGICAL_RULES,
) -> int:
    """How many ways an array is split across devices (its bytes per device = total / this)."""
    if not names:
        return 1
    spec = spec_for_shape(shape, names, mesh_shape, rules)
    return math.prod(mesh_shape[a] for a in spec if a is not None)


def make_mesh(data: int = 1, model: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "model") mesh with Auto axes, the kind the model's constraints expect.

    Args:
        data: size of the data-parallel (and FSDP) axis.
        model: size of the tensor-parallel axis.
        devices: the devices to use (default: the first data * model of `jax.devices()`).
    """
    if data <= 0 or model <= 0:
        raise ValueError(f"Mesh sizes data={data}, model={model} must be positive integers.")
    devices = list(jax.devices() if devices is None else devices)
    if len(devices) < data * model:
        raise ValueError(
            f"A mesh of data={data} x model={model} needs {data * model} devices; "
            f"{len(devices)} are available."
        )
    grid = np.asarray(devices[: data * model], dtype=object).reshape(data, model)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def param(value: jax.Array, names: tuple[str | None, ...]) -> nnx.Param:
    """An nnx.Param carrying its logical axis names as `out_sharding` metadata.

    Eager sharding is off: placement happens once, from `state_shardings`, where the mesh is
    known, so a model can also be built with no mesh at all.
    """
    assert len(names) == value.ndim, (names, value.shape)
    return nnx.Param(value, out_sharding=names, eager_sharding=False)


def logical_names(variable: nnx.Variable) -> tuple[str | None, ...] | None:
    """The logical axis names recorded on a variable, or None."""
    return variable.get_metadata().get("out_sharding")


def _is_variable(x: Any) -> bool:
    return isinstance(x, nnx.Variable)


def _as_state(tree: Any) -> Any:
    if isinstance(tree, nnx.Module):
        return nnx.state(tree)
    if isinstance(tree, tuple) and len(tree) == 2 and isinstance(tree[0], nnx.GraphDef):
        return tree[1]
    return tree


def state_shardings(graphdef_state_or_model: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """NamedShardings for a model's state, from the logical names on each nnx.Param.

    Args:
        graphdef_state_or_model: an nnx.Module, an nnx.State (concrete or abstract, e.g.
            from `nnx.eval_shape`), or a (graphdef, state) pair.
        mesh: the device mesh (axes "data" and "model", either may be absent).
        rules: the logical rules table.

    Returns:
        A tree with the structure of the state whose leaves are NamedShardings (each inside
        the same kind of nnx.Variable as the state, as `nnx.get_named_sharding` returns), so
        it can be passed to `jax.jit(..., out_shardings=...)` or `jax.device_put`.
    """
    state = _as_state(graphdef_state_or_model)
    sizes = _mesh_sizes(mesh)

    def one(x: Any) -> Any:
        if _is_variable(x):
            names = logical_names(x)
            shape = x.get_value().shape
            spec = spec_for_shape(shape, names, sizes, rules) if names else PartitionSpec()
            return x.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=_is_variable)


def _strip_value(path: tuple) -> tuple:
    """Drop a trailing `.value` key: nnx.Variable leaves add it when flattened."""
    if path and isinstance(path[-1], jax.tree_util.GetAttrKey) and path[-1].name == "value":
        return path[:-1]
    return path


def param_names_by_path(params_state: Any) -> dict[tuple, tuple[str | None, ...] | None]:
    """{key path of each parameter: its logical names} for a model state (or module)."""
    state = _as_state(params_state)
    flat = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_variable)[0]
    return {_strip_value(tuple(path)): logical_names(var) for path, var in flat}


def mirrored_names(
    path: tuple, names_by_path: Mapping[tuple, tuple[str | None, ...] | None]
) -> tuple[str | None, ...] | None:
    """The logical names of the parameter that a leaf at `path` mirrors, or None.

    Optimizer states (optax) hold trees shaped like the parameters, nested under their own
    keys, so a leaf mirrors the parameter whose key path is a suffix of its own.
    """
    path = _strip_value(tuple(path))
    for start in range(len(path)):
        names = names_by_path.get(path[start:])
        if names is not None:
            return names
    return None


def tree_shardings_like_params(
    tree: Any, params_state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES
) -> Any:
    """NamedShardings for a tree of arrays that mirrors the parameters (an optimizer state).

    Each array leaf whose key path ends with a parameter's path, and whose rank matches it, is
    split like that parameter (so fully sharded data parallelism also shards the optimizer
    state); every other leaf (step counters, Adafactor's unused factored slots) is replicated.

    Args:
        tree: e.g. `opt.init(params)` or `jax.eval_shape(opt.init, params)`.
        params_state: the model state (or module) whose Params carry logical names.
        mesh: the device mesh.
        rules: the logical rules table.
    """
    names_by_path = param_names_by_path(params_state)
    sizes = _mesh_sizes(mesh)

    def one(path: tuple, leaf: Any) -> NamedSharding:
        names = mirrored_names(path, names_by_path)
        shape = getattr(leaf, "shape", ())
        if names is None or len(names) != len(shape):
            return NamedSharding(mesh, PartitionSpec())
        return NamedSharding(mesh, spec_for_shape(shape, names, sizes, rules))

    return jax.tree_util.tree_map_with_path(one, tree)


def check_mesh() -> None:
    """Raise if the active mesh has Explicit axes: the model is written for Auto axes.

    With Explicit axes (`jax.make_mesh`'s default) every gather and contraction would need
    an explicit output sharding; build meshes with `make_mesh` here instead.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and not mesh.are_all_axes_auto:
        raise ValueError(
            f"The model needs a mesh whose axes are all Auto; the active mesh has "
            f"axis_types={mesh.axis_types}. Build it with pathways_lite.model.sharding.make_mesh "
            "or pass axis_types=(AxisType.Auto, AxisType.Auto)."
        )


def constrain(x: jax.Array, names: tuple[str | None, ...], rules: Rules = LOGICAL_RULES):
    """Constrain an activation's sharding by logical names, only when a mesh is active.

    With no mesh set (`jax.set_mesh`), this returns `x` unchanged, so the model runs on a
    single device with no mesh at all.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    spec = spec_for_shape(x.shape, names, dict(mesh.shape), rules)
    return jax.lax.with_sharding_constraint(x, spec)
