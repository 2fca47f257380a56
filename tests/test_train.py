"""The reference trainer: it learns, it is deterministic, and a device mesh does not change it."""

from __future__ import annotations

import numpy as np
import pytest

from pathways_lite.model.config import PalmConfig
from pathways_lite.model.optim import OptimConfig
from pathways_lite.model.train import ReferenceTrainer, StepFunctions, TrainConfig, make_mesh

BATCH, SEQ = 8, 64


def _cfg(dataset) -> PalmConfig:
    return PalmConfig.from_preset("palm-tiny", vocab_size=dataset.tokenizer.vocab_size)


def _batches(dataset, seed: int = 0):
    return lambda step: dataset.global_batch(step, BATCH, seed)[0]


def _max_rel_diff(a: list[float], b: list[float]) -> float:
    a_, b_ = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(np.max(np.abs(a_ - b_) / np.abs(b_)))


@pytest.fixture(scope="module")
def dataset(stdlib_dataset):
    assert stdlib_dataset.seq_len == SEQ, "the shared test dataset is built for seq_len 64"
    return stdlib_dataset


def test_loss_goes_well_below_its_start_on_the_default_corpus(dataset) -> None:
    trainer = ReferenceTrainer(
        _cfg(dataset), OptimConfig(), TrainConfig(steps=200, global_batch=BATCH, seq_len=SEQ)
    )
    losses = trainer.losses(_batches(dataset))
    start, end = np.mean(losses[:5]), np.mean(losses[-10:])
    assert end < 0.6 * start, f"loss went from {start:.3f} to only {end:.3f}"


def test_two_runs_with_the_same_seed_are_bitwise_identical(dataset) -> None:
    train_cfg = TrainConfig(steps=6, global_batch=BATCH, seq_len=SEQ, seed=3)
    a = ReferenceTrainer(_cfg(dataset), OptimConfig(), train_cfg).losses(_batches(dataset, 3))
    b = ReferenceTrainer(_cfg(dataset), OptimConfig(), train_cfg).losses(_batches(dataset, 3))
    assert a == b


def test_a_different_seed_gives_different_losses(dataset) -> None:
    cfg = _cfg(dataset)
    a = ReferenceTrainer(cfg, OptimConfig(), TrainConfig(steps=2, seed=0)).losses(_batches(dataset))
    b = ReferenceTrainer(cfg, OptimConfig(), TrainConfig(steps=2, seed=1)).losses(_batches(dataset))
    assert a != b


@pytest.mark.parametrize("data,model", [(2, 2), (4, 1), (1, 4)])
def test_mesh_layouts_match_the_single_device_reference(dataset, data: int, model: int) -> None:
    train_cfg = TrainConfig(steps=10, global_batch=BATCH, seq_len=SEQ)
    ref = ReferenceTrainer(_cfg(dataset), OptimConfig(), train_cfg).losses(_batches(dataset))
    sharded = ReferenceTrainer(
        _cfg(dataset), OptimConfig(), train_cfg, mesh=make_mesh(data, model)
    ).losses(_batches(dataset))
    assert _max_rel_diff(sharded, ref) <= 1e-5


def test_mlp_kernels_are_split_across_model_devices(dataset) -> None:
    fns = StepFunctions(_cfg(dataset), OptimConfig(), make_mesh(1, 4))
    state = fns.init(0)
    split = []
    for leaf in __import__("jax").tree_util.tree_leaves(state.params):
        shard_shapes = {s.data.shape for s in leaf.addressable_shards}
        if len(leaf.shape) == 2 and leaf.shape[-1] == 4 * fns.model_cfg.d_model:
            split.append((leaf.shape, shard_shapes))
    assert split, "found no MLP kernel of shape (d_model, d_ff)"
    for shape, shard_shapes in split:
        assert shard_shapes == {(shape[0], shape[1] // 4)}, (shape, shard_shapes)


def test_a_wrong_batch_shape_is_named(dataset) -> None:
    trainer = ReferenceTrainer(_cfg(dataset), OptimConfig(), TrainConfig(steps=1))
    with pytest.raises(ValueError, match=r"shape \(2, 3\)"):
        trainer.losses(lambda step: np.zeros((2, 3), np.int32))


def test_a_mesh_larger_than_the_devices_is_refused() -> None:
    with pytest.raises(ValueError, match="needs 64 devices"):
        make_mesh(8, 8)
