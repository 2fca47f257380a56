"""The logical-axis rules: specs for parameters and activations, and a sharded forward pass
on a 2 x 2 mesh of CPU devices that equals the single-device one."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from pathways_lite.model import sharding
from pathways_lite.model.config import PalmConfig
from pathways_lite.model.loss import lm_loss
from pathways_lite.model.palm import Palm


def test_rules_table_maps_logical_names_to_mesh_axes():
    rules = dict(sharding.LOGICAL_RULES)
    assert rules["batch"] == "data" and rules["embed"] == "data"
    assert rules["mlp"] == rules["heads"] == rules["vocab"] == "model"
    assert set(rules.values()) <= {"data", "model", None}
    assert sharding.logical_to_spec(("batch", "length", "act_embed")) == P("data", None, None)
    assert sharding.logical_to_spec(("embed", "mlp")) == P("data", "model")
    assert sharding.logical_to_spec(("vocab", "embed")) == P("model", "data")
    assert sharding.logical_to_spec(("unknown", None)) == P(None, None)
    # A mesh axis is used once per array: the second "data" dimension is replicated.
    assert sharding.logical_to_spec(("batch", "embed")) == P("data", None)


def test_spec_for_shape_drops_missing_axes_and_uneven_splits():
    mesh_shape = {"data": 2, "model": 4}
    assert sharding.spec_for_shape((8, 12), ("embed", "mlp"), mesh_shape) == P("data", "model")
    assert sharding.spec_for_shape((8, 6), ("embed", "mlp"), mesh_shape) == P("data", None)
    assert sharding.spec_for_shape((8, 12), ("embed", "mlp"), {"data": 2}) == P("data", None)
    with pytest.raises(ValueError, match=r"\(8, 12\)"):
        sharding.spec_for_shape((8, 12), ("embed",), mesh_shape)


def test_constrain_is_identity_without_a_mesh():
    x = jnp.ones((4, 3, 2))
    assert sharding.constrain(x, ("batch", "length", "act_embed")) is x


@pytest.fixture(scope="module")
def mesh():
    assert len(jax.devices()) >= 4, "conftest sets 4 host devices"
    return sharding.make_mesh(data=2, model=2)


def test_state_shardings_follow_parameter_logical_names(mesh):
    model = Palm(PalmConfig.palm_tiny(), rngs=nnx.Rngs(0))
    shardings = sharding.state_shardings(model, mesh)
    flat = {
        "/".join(map(str, path)): var.get_value().spec for path, var in nnx.to_flat_state(shardings)
    }
    assert flat["embed/embedding"] == P("model", "data")
    assert flat["blocks/0/attention/q_kernel"] == P("data", "model", None)
    assert flat["blocks/0/attention/k_kernel"] == P("data", None, None)
    assert flat["blocks/1/attention/o_kernel"] == P("model", None, "data")
    assert flat["blocks/0/mlp/gate_kernel"] == P("data", "model")
    assert flat["blocks/0/mlp/down_kernel"] == P("model", "data")
    assert flat["final_norm/scale"] == P("data")
    # The same from (graphdef, state) and from an abstract state (nothing allocated).
    graphdef, state = nnx.split(model)
    same = sharding.state_shardings((graphdef, state), mesh)
    assert jax.tree.structure(same) == jax.tree.structure(shardings)
    abstract = nnx.state(nnx.eval_shape(lambda: Palm(PalmConfig.palm_tiny(), rngs=nnx.Rngs(0))))
    assert jax.tree.leaves(sharding.state_shardings(abstract, mesh)) == jax.tree.leaves(shardings)


def test_sharded_forward_and_loss_equal_single_device(mesh):
    cfg = PalmConfig.palm_tiny()
    model = Palm(cfg, rngs=nnx.Rngs(0))
    tokens_bt = jax.random.randint(jax.random.key(1), (4, 16), 0, cfg.vocab_size, jnp.int32)
    graphdef, state = nnx.split(model)

    def loss_and_logits(state, tokens_bt):
        logits_btv = nnx.merge(graphdef, state)(tokens_bt)
        loss, _ = lm_loss(logits_btv[:, :-1], tokens_bt[:, 1:])
        return loss, logits_btv

    ref_loss, ref_logits = jax.jit(loss_and_logits)(state, tokens_bt)

    shardings = sharding.state_shardings(state, mesh)
    sharded_state = jax.device_put(state, shardings)
    q_kernel = sharded_state["blocks"][0]["attention"]["q_kernel"].get_value()
    assert q_kernel.sharding.spec == P("data", "model", None)
    assert {s.data.shape for s in q_kernel.addressable_shards} == {(32, 2, 16)}
    batch_sharding = jax.sharding.NamedSharding(mesh, P("data", None))
    with jax.set_mesh(mesh):
        loss, logits = jax.jit(loss_and_logits)(
            sharded_state, jax.device_put(tokens_bt, batch_sharding)
        )
    # The activation constraints applied: logits are split by batch and by vocabulary.
    assert logits.sharding.spec == P("data", None, "model")
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    assert abs(float(loss) - float(ref_loss)) <= 1e-5 * abs(float(ref_loss))


def test_make_mesh_validates_sizes():
    with pytest.raises(ValueError, match="data=3 x model=3"):
        sharding.make_mesh(3, 3)
    mesh = sharding.make_mesh(4, 1)
    assert mesh.axis_names == ("data", "model") and dict(mesh.shape) == {"data": 4, "model": 1}


def test_a_mesh_with_explicit_axes_is_refused_with_a_clear_error():
    cfg = PalmConfig.palm_tiny()
    model = Palm(cfg, rngs=nnx.Rngs(0))
    explicit = jax.make_mesh((2, 2), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    with jax.set_mesh(explicit), pytest.raises(ValueError, match="Auto"):
        model(jnp.zeros((2, 4), jnp.int32))


def test_optimizer_state_is_sharded_like_the_parameters(mesh):
    from pathways_lite.model.optim import OptimConfig, make_optimizer

    model = Palm(PalmConfig.palm_tiny(), rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    opt = make_optimizer(OptimConfig())
    for params in (
        state,
        jax.tree.map(lambda v: v.get_value(), state, is_leaf=lambda x: isinstance(x, nnx.Variable)),
    ):
        opt_shapes = jax.eval_shape(opt.init, params)
        specs = [
            s.spec
            for s in jax.tree.leaves(sharding.tree_shardings_like_params(opt_shapes, state, mesh))
        ]
        shapes = [x.shape for x in jax.tree.leaves(opt_shapes)]
        by_shape = dict(zip(shapes, specs, strict=True))
        # The second moment and momentum of the embedding and the MLP kernels are split.
        assert by_shape[(512, 64)] == P("model", "data")
        assert by_shape[(64, 256)] == P("data", "model")
        assert specs.count(P("data", "model")) == 2 * 2 * 2  # gate, up; 2 layers; nu, mu
        assert P() in specs  # counters and unused factored slots are replicated
