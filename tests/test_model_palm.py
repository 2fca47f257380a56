"""The PaLM architecture, one property per test: MQA, no biases, tied embedding, rotary,
the parallel block, initialisation, and KV-cache decoding equal to the full forward pass."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pathways_lite.model.config import PalmConfig
from pathways_lite.model.layers import Norm, apply_rotary
from pathways_lite.model.palm import Palm, ParallelBlock
from pathways_lite.model.sampling import generate, sample_logits
from pathways_lite.model.sharding import logical_names

B, T = 2, 12


@pytest.fixture(scope="module")
def cfg() -> PalmConfig:
    return PalmConfig.palm_tiny()


@pytest.fixture(scope="module")
def model(cfg) -> Palm:
    return Palm(cfg, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def tokens(cfg) -> jax.Array:
    return jax.random.randint(jax.random.key(1), (B, T), 0, cfg.vocab_size, jnp.int32)


@pytest.fixture(scope="module")
def full_logits(model, tokens) -> np.ndarray:
    forward = nnx.jit(lambda m, t: m(t))
    return np.asarray(forward(model, tokens))


def _params(model) -> dict[str, jax.Array]:
    """Flat {"blocks/0/attention/q_kernel": array} view of the parameters."""
    flat = nnx.to_flat_state(nnx.state(model, nnx.Param))
    return {"/".join(map(str, path)): var.get_value() for path, var in flat}


def test_forward_shapes_and_dtype(cfg, full_logits):
    assert full_logits.shape == (B, T, cfg.vocab_size)
    assert full_logits.dtype == np.float32
    assert np.all(np.isfinite(full_logits))


def test_attention_has_one_shared_key_value_head(cfg, model):
    attn = model.blocks[0].attention
    d, h, q = cfg.d_model, cfg.n_heads, cfg.head_dim
    assert attn.q_kernel.shape == (d, h, q)  # a query projection per head
    assert attn.k_kernel.shape == (d, 1, q)  # one key head
    assert attn.v_kernel.shape == (d, 1, q)  # one value head
    assert attn.o_kernel.shape == (h, q, d)
    cache = model.init_cache(3, 7)
    assert len(cache.layers) == cfg.n_layers
    for layer in cache.layers:
        assert layer.k_btkq.shape == (3, 7, 1, q) and layer.v_btkq.shape == (3, 7, 1, q)


def test_no_bias_anywhere_in_the_parameter_tree(cfg, model):
    params = _params(model)
    assert not [p for p in params if "bias" in p]
    leaf_names = {p.rsplit("/", 1)[-1] for p in params}
    assert leaf_names == {
        "embedding",
        "scale",
        "q_kernel",
        "k_kernel",
        "v_kernel",
        "o_kernel",
        "gate_kernel",
        "up_kernel",
        "down_kernel",
    }
    # Exactly REFERENCE.md's count: 3 MLP kernels, q/o per head, one k/v, one norm per layer.
    d, h, q, f, v, n = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.mlp_dim, cfg.vocab_size, 0
    n = cfg.n_layers * (3 * d * f + 2 * d * h * q + 2 * d * q + d) + v * d + d
    assert sum(x.size for x in params.values()) == n


def test_every_parameter_carries_logical_axis_names(model):
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = logical_names(var)
        assert names is not None and len(names) == var.get_value().ndim, path


def test_input_and_output_embedding_are_one_matrix(cfg, model, tokens, full_logits):
    params = _params(model)
    vocab_shaped = [p for p, x in params.items() if cfg.vocab_size in x.shape]
    assert vocab_shaped == ["embed/embedding"]
    emb_vd = params["embed/embedding"]
    # Input: token rows of the matrix. Output: the same matrix, scaled by 1/sqrt(d_model).
    np.testing.assert_array_equal(model.embed(tokens), emb_vd[tokens])

    @nnx.jit
    def final_hidden(m, tokens_bt):
        x_btd = m.embed(tokens_bt)
        for block in m.blocks:
            x_btd = block(x_btd)
        return m.final_norm(x_btd)

    h_btd = final_hidden(model, tokens)
    manual_btv = jnp.einsum("btd,vd->btv", h_btd, emb_vd, precision="highest")
    np.testing.assert_allclose(
        full_logits, manual_btv / math.sqrt(cfg.d_model), rtol=1e-5, atol=1e-5
    )


def test_rotary_scores_depend_only_on_the_offset():
    q_d, k_d = jax.random.normal(jax.random.key(2), (2, 32))

    def score(m: int, n: int) -> float:
        q = apply_rotary(q_d[None, None, None, :], jnp.array([[m]]))
        k = apply_rotary(k_d[None, None, None, :], jnp.array([[n]]))
        return float(jnp.sum(q * k))

    for offset in (0, 3, 17):
        same = [score(p + offset, p) for p in (0, 5, 100, 1000)]
        np.testing.assert_allclose(same, same[0], rtol=1e-4, atol=1e-4)
    assert abs(score(5, 2) - score(5, 4)) > 1e-3  # and the offset does matter
    # Position 0 is the identity; rotation preserves the norm.
    np.testing.assert_allclose(apply_rotary(q_d[None, None, None], jnp.array([[0]]))[0, 0, 0], q_d)
    rotated = apply_rotary(q_d[None, None, None], jnp.array([[37]]))
    np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q_d), rtol=1e-5)


def test_rotary_is_half_split_with_base_10000():
    d = 8
    x = jnp.zeros((1, 1, 1, d)).at[..., 1].set(1.0)  # unit vector on pair (1, 1 + d/2)
    out = apply_rotary(x, jnp.array([[3]]))[0, 0, 0]
    angle = 3 * 10_000.0 ** (-1 / (d // 2))  # pair i=1 rotates at base^(-2i/d)
    np.testing.assert_allclose(out[1], math.cos(angle), rtol=1e-5)
    np.testing.assert_allclose(out[1 + d // 2], math.sin(angle), rtol=1e-5)
    assert float(jnp.sum(jnp.abs(out))) == pytest.approx(
        abs(math.cos(angle)) + abs(math.sin(angle)), rel=1e-5
    )


def test_parallel_block_is_x_plus_attention_plus_mlp(cfg):
    block = ParallelBlock(cfg, rngs=nnx.Rngs(3))
    x_btd = jax.random.normal(jax.random.key(4), (B, 6, cfg.d_model))
    params = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(block, nnx.Param))}
    assert [p for p in params if p.endswith("scale")] == ["norm/scale"]  # one norm per layer

    @nnx.jit
    def run(blk, x_btd):
        h_btd = blk.norm(x_btd)
        attn_btd, mlp_btd = blk.attention(h_btd), blk.mlp(h_btd)
        # The serial form, for contrast: the MLP would read norm(x + attention).
        serial_btd = x_btd + attn_btd + blk.mlp(blk.norm(x_btd + attn_btd))
        return blk(x_btd), attn_btd, mlp_btd, serial_btd

    y_btd, attn_btd, mlp_btd, serial_btd = run(block, x_btd)
    np.testing.assert_allclose(y_btd, x_btd + attn_btd + mlp_btd, rtol=1e-6, atol=1e-6)
    assert float(jnp.max(jnp.abs(serial_btd - y_btd))) > 1e-3
    assert float(jnp.std(attn_btd)) > 1e-3 and float(jnp.std(mlp_btd)) > 1e-3


def test_rms_and_layer_norm_are_scale_only_and_bias_free():
    x = jax.random.normal(jax.random.key(5), (3, 4, 16)) * 3 + 1
    rms = Norm(16, kind="rms", eps=1e-6)
    ln = Norm(16, kind="layernorm", eps=1e-6)
    xn = np.asarray(x, np.float64)
    expect_rms = xn / np.sqrt(np.mean(xn**2, -1, keepdims=True) + 1e-6)
    centred = xn - xn.mean(-1, keepdims=True)
    expect_ln = centred / np.sqrt(np.mean(centred**2, -1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(rms(x), expect_rms, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ln(x), expect_ln, rtol=1e-5, atol=1e-5)
    for norm in (rms, ln):
        leaves = nnx.to_flat_state(nnx.state(norm, nnx.Param))
        assert [p for p, _ in leaves] == [("scale",)]


def test_initialisation_statistics():
    cfg = PalmConfig.palm_tiny(d_model=128, n_heads=4, head_dim=32)
    model = Palm(cfg, rngs=nnx.Rngs(7))
    emb = np.asarray(model.embed.embedding[...])
    assert abs(emb.std() - 1.0) < 0.02 and abs(emb.mean()) < 0.02  # N(0, 1)
    attn, mlp = model.blocks[0].attention, model.blocks[0].mlp
    fan_ins = {
        "q_kernel": (attn.q_kernel, cfg.d_model),
        "k_kernel": (attn.k_kernel, cfg.d_model),
        "o_kernel": (attn.o_kernel, cfg.n_heads * cfg.head_dim),
        "gate_kernel": (mlp.gate_kernel, cfg.d_model),
        "up_kernel": (mlp.up_kernel, cfg.d_model),
        "down_kernel": (mlp.down_kernel, cfg.mlp_dim),
    }
    for name, (kernel, fan_in) in fan_ins.items():
        w = np.asarray(kernel[...])
        expected = 1 / math.sqrt(fan_in)
        assert abs(w.std() / expected - 1) < 0.06, (name, w.std(), expected)
        assert abs(w.mean()) < 0.1 * expected, name
    np.testing.assert_array_equal(model.blocks[0].norm.scale[...], 1.0)
    # Layers are drawn independently.
    assert not np.allclose(model.blocks[0].mlp.up_kernel[...], model.blocks[1].mlp.up_kernel[...])


def test_kv_cache_decoding_equals_full_forward(model, tokens, full_logits):
    cache = model.init_cache(B, T + 4)  # a cache longer than the sequence
    step = nnx.jit(lambda m, tok, c, pos: m.decode_step(tok, c, pos))
    per_step = []
    for pos in range(T):
        logits_b1v, cache = step(model, tokens[:, pos : pos + 1], cache, pos)
        assert logits_b1v.shape == (B, 1, model.cfg.vocab_size)
        per_step.append(np.asarray(logits_b1v))
    np.testing.assert_allclose(np.concatenate(per_step, axis=1), full_logits, rtol=1e-5, atol=1e-5)
    # A prefill of 5 tokens, then single steps, agrees too.
    prefill = nnx.jit(lambda m, tok, c: m.decode_step(tok, c, 0))
    logits_b5v, cache = prefill(model, tokens[:, :5], model.init_cache(B, T))
    np.testing.assert_allclose(logits_b5v, full_logits[:, :5], rtol=1e-5, atol=1e-5)
    logits_b1v, _ = step(model, tokens[:, 5:6], cache, 5)
    np.testing.assert_allclose(logits_b1v[:, 0], full_logits[:, 5], rtol=1e-5, atol=1e-5)


def test_causality_future_tokens_do_not_change_past_logits(model, tokens, full_logits):
    changed = tokens.at[:, -3:].set((tokens[:, -3:] + 1) % model.cfg.vocab_size)
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, changed))
    np.testing.assert_allclose(logits[:, :-3], full_logits[:, :-3], rtol=1e-5, atol=1e-5)
    assert np.max(np.abs(logits[:, -3:] - full_logits[:, -3:])) > 1e-3


def test_greedy_generation_follows_the_full_forward_argmax(model):
    prompt = [5, 17, 3, 99]
    new = generate(model, prompt, 6)
    assert len(new) == 6 and all(isinstance(t, int) for t in new)
    seq = jnp.asarray([prompt + new], jnp.int32)
    logits = np.asarray(nnx.jit(lambda m, t: m(t))(model, seq))
    expected = np.argmax(logits[0, len(prompt) - 1 : -1], axis=-1)
    assert new == expected.tolist()
    batch = generate(model, np.asarray([prompt, prompt]), 6)
    assert batch.shape == (2, 6) and batch[1].tolist() == new


def test_sampling_is_reproducible_and_respects_top_k(model):
    a = generate(model, [1, 2, 3], 5, temperature=1.0, top_k=4, rng=jax.random.key(9))
    b = generate(model, [1, 2, 3], 5, temperature=1.0, top_k=4, rng=jax.random.key(9))
    assert a == b
    logits_bv = jnp.tile(jnp.arange(10.0)[None], (4000, 1))
    picks = np.asarray(sample_logits(logits_bv, jax.random.key(0), temperature=1.0, top_k=3))
    assert set(picks.tolist()) == {7, 8, 9}  # only the top 3, and all of them
    top1 = sample_logits(logits_bv[:5], jax.random.key(1), temperature=2.0, top_k=1)
    assert np.asarray(top1).tolist() == [9] * 5
    # Temperature sampling follows softmax: p(1) = 0.75 for logits [0, log 3].
    two_bv = jnp.tile(jnp.array([[0.0, math.log(3.0)]]), (4000, 1))
    freq = np.mean(np.asarray(sample_logits(two_bv, jax.random.key(2), temperature=1.0)))
    assert abs(freq - 0.75) < 0.03


def test_a_new_temperature_does_not_compile_the_decode_step_again(model):
    """Each temperature value compiled the step again (it was a static argument): on a host,
    on its runtime thread, holding the job's lock, the cache growing with each value."""
    from pathways_lite.model.sampling import _decode_and_sample

    generate(model, [1, 2, 3], 2, temperature=0.5, top_k=4)
    compiled = _decode_and_sample._cache_size()
    for temperature in (0.6, 0.7001, 1.3):
        generate(model, [1, 2, 3], 2, temperature=temperature, top_k=4)
    assert _decode_and_sample._cache_size() == compiled


def test_generate_rejects_bad_arguments(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [model.cfg.vocab_size], 2)
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(model, [1], model.cfg.max_seq_len)
    with pytest.raises(ValueError, match="top_k=0"):
        generate(model, [1], 2, temperature=1.0, top_k=0)
    with pytest.raises(ValueError, match="non-empty"):
        generate(model, [], 2)
