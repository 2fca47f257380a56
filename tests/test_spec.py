"""Job specs: YAML -> JobSpec -> semantic checks -> model configs, and one-line errors naming the
field for every kind of bad input (including generated ones)."""

from __future__ import annotations

import copy
import math
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathways_lite.controller.spec import (
    ClusterShape,
    InfeasibleSpecError,
    SpecError,
    to_configs,
    validate_spec,
)
from pathways_lite.spec import (
    load_spec_file,
    load_spec_text,
    parse_yaml,
    spec_from_dict,
    spec_to_dict,
)
from pathways_lite.v1 import controller_pb2

ISSUE_EXAMPLE = """\
name: tiny-2x2
model: {preset: palm-tiny}
islands: 2
devices_per_island: 2
mesh: {data: 1, model: 2}
train: {steps: 20, global_batch: 8, seq_len: 64, seed: 0}
data: {source: stdlib}
"""

FULL_EXAMPLE = """\
name: full.spec_1
model:
  preset: palm-tiny
  overrides: {n_layers: 3, d_model: 32, norm: layernorm, z_loss: 0.0}
islands: 2
devices_per_island: 4
mesh: {data: 2, model: 2}
train: {steps: 5, global_batch: 8, seq_len: 32, seed: 7, checkpoint_every: 2}
data: {source: stdlib, vocab_size: 1024, max_bytes: 100000}
optimizer:
  learning_rate: 1e-3
  warmup_steps: 10
  beta1: 0.5
  decay_rate: 0.7
  clip_norm: 0
  weight_decay: null
  eps: 1e-20
priority: 5
weight: 2.5
"""


def example_dict() -> dict:
    return yaml.safe_load(ISSUE_EXAMPLE)


def test_issue_example_is_accepted_and_maps_to_model_configs():
    spec = load_spec_text(ISSUE_EXAMPLE, validate=True)
    assert spec.name == "tiny-2x2"
    assert (spec.islands, spec.devices_per_island) == (2, 2)
    assert (spec.mesh.data, spec.mesh.model) == (1, 2)

    cfgs = to_configs(spec, vocab_size=300)
    assert cfgs.model.d_model == 64 and cfgs.model.n_layers == 2  # palm-tiny
    assert cfgs.model.vocab_size == 300  # the trained tokenizer's size
    assert (cfgs.train.steps, cfgs.train.global_batch, cfgs.train.seq_len) == (20, 8, 64)
    assert cfgs.train.seed == 0
    assert cfgs.data.source == "stdlib" and cfgs.data.paths == ()
    assert cfgs.optim.learning_rate == 1e-2  # unset optimizer: the paper's defaults
    assert cfgs.optim.weight_decay == "dynamic"


def test_every_section_maps_one_to_one():
    spec = load_spec_text(FULL_EXAMPLE, validate=True)
    cfgs = to_configs(spec)
    assert (cfgs.model.n_layers, cfgs.model.d_model, cfgs.model.norm) == (3, 32, "layernorm")
    assert isinstance(cfgs.model.n_layers, int)  # Struct numbers are floats on the wire
    assert cfgs.model.z_loss == 0.0
    assert cfgs.model.vocab_size == 1024  # follows data.vocab_size when not overridden
    assert cfgs.data.vocab_size == 1024 and cfgs.data.max_bytes == 100_000
    assert spec.train.checkpoint_every == 2 and cfgs.train.seed == 7
    opt = cfgs.optim
    assert (opt.learning_rate, opt.warmup_steps, opt.beta1, opt.decay_rate) == (1e-3, 10, 0.5, 0.7)
    assert opt.clip_norm is None  # 0 disables clipping
    assert opt.weight_decay is None  # null: no weight decay
    assert opt.eps == 1e-20
    assert spec.priority == 5 and spec.weight == 2.5
    # dict -> proto -> dict keeps the spec as written
    assert spec_from_dict(spec_to_dict(spec)) == spec


def test_unset_optional_fields_differ_from_zero():
    spec = load_spec_text(ISSUE_EXAMPLE)
    assert not spec.HasField("priority") and not spec.HasField("weight")
    assert not spec.train.HasField("checkpoint_every")
    explicit = load_spec_text(ISSUE_EXAMPLE + "priority: 0\n")
    assert explicit.HasField("priority")


def _replace(old: str, new: str) -> str:
    assert old in ISSUE_EXAMPLE
    return ISSUE_EXAMPLE.replace(old, new)


BAD_SPECS = [
    # wrong types
    ("wrong type: int", _replace("steps: 20", "steps: twenty"), "train.steps", "'twenty'"),
    ("wrong type: float for int", _replace("islands: 2", "islands: 2.5"), "islands", "2.5"),
    ("wrong type: bool for int", _replace("islands: 2", "islands: yes"), "islands", "True"),
    ("wrong type: section", _replace("mesh: {data: 1, model: 2}", "mesh: 2"), "mesh", "2"),
    ("wrong type: string", _replace("name: tiny-2x2", "name: [a, b]"), "name", "['a', 'b']"),
    (
        "wrong type: list",
        _replace("source: stdlib}", "source: files, paths: a.txt}"),
        "data.paths",
        "'a.txt'",
    ),
    (
        "wrong type: bool",
        ISSUE_EXAMPLE.replace("source: stdlib}", "source: stdlib, skip_undecodable: maybe}"),
        "data.skip_undecodable",
        "'maybe'",
    ),
    (
        "out of range int32",
        _replace("steps: 20", "steps: 99999999999"),
        "train.steps",
        "99999999999",
    ),
    # negative or zero sizes
    ("negative steps", _replace("steps: 20", "steps: -1"), "train.steps", "-1"),
    ("zero batch", _replace("global_batch: 8", "global_batch: 0"), "train.global_batch", "=0"),
    ("zero seq_len", _replace("seq_len: 64", "seq_len: 0"), "train.seq_len", "=0"),
    ("zero islands", _replace("islands: 2", "islands: 0"), "islands", "=0"),
    (
        "negative devices",
        _replace("devices_per_island: 2", "devices_per_island: -2"),
        "devices_per_island",
        "-2",
    ),
    (
        "zero mesh axis",
        _replace("mesh: {data: 1, model: 2}", "mesh: {data: 0, model: 2}"),
        "mesh.data",
        "=0",
    ),
    ("negative seed", _replace("seed: 0", "seed: -3"), "train.seed", "-3"),
    (
        "negative override",
        _replace("{preset: palm-tiny}", "{preset: palm-tiny, overrides: {d_model: -8}}"),
        "model.overrides.d_model",
        "-8",
    ),
    (
        "zero vocab",
        _replace("source: stdlib}", "source: stdlib, vocab_size: 0}"),
        "data.vocab_size",
        "=0",
    ),
    # unknown preset
    ("unknown preset", _replace("palm-tiny", "palm-huge"), "model.preset", "'palm-huge'"),
    # missing sections and fields
    ("missing data", _replace("data: {source: stdlib}\n", ""), "data", "missing"),
    (
        "missing train",
        _replace("train: {steps: 20, global_batch: 8, seq_len: 64, seed: 0}\n", ""),
        "train",
        "missing",
    ),
    ("missing model", _replace("model: {preset: palm-tiny}\n", ""), "model", "missing"),
    ("missing mesh", _replace("mesh: {data: 1, model: 2}\n", ""), "mesh", "missing"),
    ("missing islands", _replace("islands: 2\n", ""), "islands", "missing"),
    ("missing name", _replace("name: tiny-2x2\n", ""), "name", "missing"),
    ("missing steps", _replace("steps: 20, ", ""), "train.steps", "missing"),
    ("missing preset", _replace("{preset: palm-tiny}", "{}"), "model.preset", "missing"),
    ("empty section", _replace("data: {source: stdlib}", "data:"), "data", "missing"),
    # unknown keys, at every level
    ("unknown top key", ISSUE_EXAMPLE + "gpus: 8\n", "gpus", "'gpus'"),
    ("unknown nested key", _replace("seed: 0", "sead: 0"), "train.sead", "'sead'"),
    (
        "unknown override",
        _replace("{preset: palm-tiny}", "{preset: palm-tiny, overrides: {layers: 2}}"),
        "model.overrides.layers",
        "'layers'",
    ),
    ("unknown optimizer key", ISSUE_EXAMPLE + "optimizer: {lr: 0.1}\n", "optimizer.lr", "'lr'"),
    # absurd names
    ("name with spaces", _replace("name: tiny-2x2", "name: 'my job'"), "name", "'my job'"),
    ("name too long", _replace("name: tiny-2x2", "name: " + "a" * 300), "name", "300"),
    ("name starting with dot", _replace("name: tiny-2x2", "name: .hidden"), "name", "'.hidden'"),
    ("name with slash", _replace("name: tiny-2x2", "name: ../etc"), "name", "'../etc'"),
    ("name with newline", _replace("name: tiny-2x2", 'name: "a\\nb"'), "name", "'a\\nb'"),
    # YAML that does not parse
    (
        "unclosed flow",
        _replace("mesh: {data: 1, model: 2}", "mesh: {data: 1, model: 2"),
        "spec",
        "line",
    ),
    ("bad indentation", ISSUE_EXAMPLE + "  oops: [\n", "spec", "line"),
    ("tab indentation", "name: a\ntrain:\n\tsteps: 1\n", "spec", "line 3"),
    ("duplicate key", ISSUE_EXAMPLE + "islands: 4\n", "spec", "duplicate key 'islands'"),
    ("not a mapping", "- name: a\n", "spec", "list"),
    ("empty document", "", "spec", "empty"),
    # semantic checks
    (
        "batch not divisible by islands",
        _replace("islands: 2", "islands: 3").replace("global_batch: 8", "global_batch: 10"),
        "train.global_batch",
        "train.global_batch=10 is not divisible by islands=3",
    ),
    (
        "batch not divisible by mesh.data",
        _replace("mesh: {data: 1, model: 2}", "mesh: {data: 2, model: 1}").replace(
            "global_batch: 8", "global_batch: 6"
        ),
        "train.global_batch",
        "mesh.data=2",
    ),
    (
        "mesh not the island",
        _replace("mesh: {data: 1, model: 2}", "mesh: {data: 2, model: 2}"),
        "mesh",
        "devices_per_island=2",
    ),
    (
        "seq_len beyond the model",
        _replace("seq_len: 64", "seq_len: 100000"),
        "train.seq_len",
        "max_seq_len",
    ),
    ("unknown data source", _replace("source: stdlib", "source: web"), "data.source", "'web'"),
    ("files without paths", _replace("source: stdlib", "source: files"), "data.paths", "empty"),
    (
        "stdlib with paths",
        _replace("source: stdlib", "source: stdlib, paths: [a]"),
        "data.paths",
        "stdlib",
    ),
    (
        "column for stdlib",
        _replace("source: stdlib", "source: stdlib, column: body"),
        "data.column",
        "'body'",
    ),
    (
        "bad learning rate",
        ISSUE_EXAMPLE + "optimizer: {learning_rate: -0.1}\n",
        "optimizer.learning_rate",
        "-0.1",
    ),
    ("bad beta1", ISSUE_EXAMPLE + "optimizer: {beta1: 1.0}\n", "optimizer.beta1", "1.0"),
    (
        "bad weight decay",
        ISSUE_EXAMPLE + "optimizer: {weight_decay: lots}\n",
        "optimizer.weight_decay",
        "lots",
    ),
    (
        "nan learning rate",
        ISSUE_EXAMPLE + "optimizer: {learning_rate: .nan}\n",
        "optimizer.learning_rate",
        "nan",
    ),
    ("priority out of range", ISSUE_EXAMPLE + "priority: 5000\n", "priority", "5000"),
    ("zero weight", ISSUE_EXAMPLE + "weight: 0\n", "weight", "0"),
    ("infinite weight", ISSUE_EXAMPLE + "weight: .inf\n", "weight", "inf"),
    # A weight near 0 made the scheduler's pass of the job inf, then NaN.
    ("tiny weight", ISSUE_EXAMPLE + "weight: 1.0e-300\n", "weight", "1e-300"),
    (
        "odd head_dim",
        _replace("{preset: palm-tiny}", "{preset: palm-tiny, overrides: {head_dim: 15}}"),
        "model.overrides.head_dim",
        "15",
    ),
    (
        "fractional override",
        _replace("{preset: palm-tiny}", "{preset: palm-tiny, overrides: {n_layers: 1.5}}"),
        "model.overrides.n_layers",
        "1.5",
    ),
    (
        # Resolving it (its memory estimate) took minutes on the controller's API thread.
        "too many layers",
        _replace("{preset: palm-tiny}", "{preset: palm-tiny, overrides: {n_layers: 100000}}"),
        "model.overrides.n_layers",
        "100000",
    ),
]


@pytest.mark.parametrize(
    "text, field, quoted", [b[1:] for b in BAD_SPECS], ids=[b[0] for b in BAD_SPECS]
)
def test_bad_spec_gets_one_line_naming_the_field(text, field, quoted):
    with pytest.raises(SpecError) as info:
        load_spec_text(text, validate=True)
    err = info.value
    message = str(err)
    assert err.field == field, message
    assert field in message, message
    assert quoted in message, message
    assert "\n" not in message and len(message) < 400, message


def test_yaml_errors_give_the_line_number():
    text = ISSUE_EXAMPLE.replace("islands: 2", "islands: [2")
    with pytest.raises(SpecError) as info:
        load_spec_text(text, source="job.yaml")
    assert info.value.field == "job.yaml"
    assert "job.yaml does not parse as YAML at line" in str(info.value)


def test_yaml_reads_exponent_floats_as_numbers():
    assert parse_yaml("x: 1e-3\ny: -2E+2\nz: 1.5e3\n") == {"x": 1e-3, "y": -200.0, "z": 1500.0}


def test_spec_file_errors_name_the_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("steps: 20", "steps: -5"))
    with pytest.raises(SpecError, match=r"train\.steps=-5"):
        load_spec_file(path, validate=True)
    with pytest.raises(SpecError, match="missing.yaml"):
        load_spec_file(tmp_path / "missing.yaml")
    path.write_text(ISSUE_EXAMPLE)
    assert load_spec_file(path, validate=True).name == "tiny-2x2"


def test_wire_spec_is_checked_without_yaml():
    """A client that sends a proto directly gets the same checks (the controller runs them)."""
    spec = load_spec_text(ISSUE_EXAMPLE)
    spec.train.global_batch = -4
    with pytest.raises(SpecError, match=r"train\.global_batch=-4 must be a positive integer"):
        validate_spec(spec)
    spec = load_spec_text(ISSUE_EXAMPLE)
    spec.model.overrides.update({"norm": 3})
    with pytest.raises(SpecError, match=r"model\.overrides\.norm=3\.0 must not be a number"):
        validate_spec(spec)
    spec = load_spec_text(ISSUE_EXAMPLE)
    spec.name = "x\udcff"[:1] + "\x00"
    with pytest.raises(SpecError, match="name="):
        validate_spec(spec)


def test_cluster_feasibility():
    spec = load_spec_text(ISSUE_EXAMPLE)
    validate_spec(spec, ClusterShape(islands=2, devices_per_island=2))
    with pytest.raises(SpecError, match=r"devices_per_island=2 does not match .* 4 devices"):
        validate_spec(spec, ClusterShape(islands=2, devices_per_island=4))
    with pytest.raises(InfeasibleSpecError, match=r"islands=2 is more than the 1 islands"):
        validate_spec(spec, ClusterShape(islands=1, devices_per_island=2))


# ------------------------------------------------------------------------------------------
# Generated specs: accepted, or a SpecError naming a field; never any other exception.
# ------------------------------------------------------------------------------------------

_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.integers(min_value=-3, max_value=70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["palm-tiny", "stdlib", "files", "dynamic", "", "1e-3", "a" * 80]),
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: (
        st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=8), children, max_size=3)
    ),
    max_leaves=6,
)


def _schema_paths(descriptor, prefix=()) -> list[tuple[str, ...]]:
    paths = []
    for field in descriptor.fields:
        path = (*prefix, field.name)
        paths.append(path)
        if field.message_type is not None and not field.message_type.full_name.startswith(
            "google.protobuf"
        ):
            paths += _schema_paths(field.message_type, path)
    return paths


# Every key path of the schema, plus overrides and a few keys that do not exist.
_PATHS = _schema_paths(controller_pb2.JobSpec.DESCRIPTOR) + [
    ("model", "overrides", "d_model"),
    ("model", "overrides", "n_heads"),
    ("model", "overrides", "vocab_size"),
    ("bogus",),
    ("train", "bogus"),
]
_MUTATIONS = st.lists(
    st.tuples(st.sampled_from(_PATHS), st.sampled_from(["set", "delete"]), _VALUES),
    min_size=1,
    max_size=4,
)


def _mutate(base: dict, mutations) -> dict:
    data = copy.deepcopy(base)
    for path, op, value in mutations:
        node = data
        for key in path[:-1]:
            if not isinstance(node.get(key), dict):
                node[key] = {}
            node = node[key]
        if op == "delete":
            node.pop(path[-1], None)
        else:
            node[path[-1]] = value
    return data


def _assert_accepted_or_named(parse) -> None:
    try:
        spec = parse()
    except SpecError as err:
        message = str(err)
        assert err.field, message
        assert err.field in message, message
        assert "\n" not in message, message
        return
    # Accepted: it must convert to the model's configs too.
    cfgs = to_configs(spec)
    assert cfgs.train.global_batch % spec.islands == 0


_PROPERTY = settings(
    max_examples=150,
    deadline=2000,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,
)


@_PROPERTY
@given(_MUTATIONS)
def test_generated_spec_dicts_are_accepted_or_name_a_field(mutations):
    data = _mutate(example_dict(), mutations)
    _assert_accepted_or_named(lambda: _validated(spec_from_dict(data)))


@_PROPERTY
@given(_MUTATIONS)
def test_generated_spec_yaml_is_accepted_or_names_a_field(mutations):
    data = _mutate(example_dict(), mutations)
    text = yaml.safe_dump(data, allow_unicode=True)
    _assert_accepted_or_named(lambda: load_spec_text(text, validate=True))


@_PROPERTY
@given(st.text(max_size=200) | st.binary(max_size=200))
def test_arbitrary_text_is_accepted_or_names_a_field(text):
    _assert_accepted_or_named(lambda: load_spec_text(text, validate=True))


def _validated(spec: controller_pb2.JobSpec) -> controller_pb2.JobSpec:
    validate_spec(spec)
    return spec


def test_property_sees_accepted_and_rejected_specs():
    """The generator is not degenerate: small mutations keep some specs valid."""
    ok = _mutate(example_dict(), [(("train", "steps"), "set", 3)])
    bad = _mutate(example_dict(), [(("train", "steps"), "set", math.nan)])
    assert _validated(spec_from_dict(ok)).train.steps == 3
    with pytest.raises(SpecError, match=r"train\.steps=nan must be an integer"):
        spec_from_dict(bad)


def test_yaml_alias_bomb_is_refused_quickly():
    """Anchors expanding to 10 * 4**19 leaves: refused at the first non-scalar, never walked."""
    lines = ["a0: &a0 [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    lines += [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 20)]
    bomb = "name: bomb\nmodel:\n  preset: palm-tiny\n  overrides:\n"
    bomb += "".join(f"    {line}\n" for line in lines)
    started = time.perf_counter()
    with pytest.raises(SpecError, match=r"model\.overrides\.a0=\[1, 1"):
        load_spec_text(bomb)
    assert time.perf_counter() - started < 5
