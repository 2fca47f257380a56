"""The PaLM job runtime of an island host: the reference trainer's step on the island's mesh.

The runtime builds the job's configs from the decoded LoadJob request, opens (or prepares, from
the on-disk cache) the tokenized dataset and checks its hash, checks the memory estimate, and
then keeps the parameters and optimizer state resident on a (`data`, `model`) mesh over the
island's devices (every host's devices in a multi-host island).

The step is `pathways_lite.model.train.StepFunctions`, the very functions the reference trainer
runs, lowered and compiled once at load: that is what makes distributed == reference. Its two
halves stay separate calls here (`grad_fn`, then `apply_fn`) because data parallelism across
islands exchanges gradients between them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
import typing
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .runtime import (
    Digest,
    JobRuntime,
    JobSpec,
    JobSpecError,
    MemoryReport,
    RuntimeUnavailableError,
    StepResult,
    _fetch,
    _memory_report,
)

logger = logging.getLogger(__name__)

# Data sources of the wire's DataSpec: "dataset" is a folder written by prepare_dataset (the
# controller prepared it where every host can read it); the others are prepared here.
DATASET_SOURCE = "dataset"
# worker.proto's OptimizerConfig field -> OptimConfig field.
_OPTIM_FIELDS = {
    "learning_rate": "learning_rate",
    "constant_steps": "warmup_steps",
    "momentum": "beta1",
    "decay_rate": "decay_rate",
    "clip_norm": "clip_norm",
}

# Datasets opened by this process, by folder: jobs on one host share the memory maps.
_DATASETS: dict[str, Any] = {}
_DATASETS_LOCK = threading.Lock()


class DataMismatchError(RuntimeUnavailableError):
    """The data this host reads is not the data the job was given (FAILED_PRECONDITION)."""


def palm_presets() -> tuple[str, ...]:
    """The model presets this runtime serves."""
    from pathways_lite.model.config import PRESETS

    return tuple(PRESETS)


def model_config(preset: str, overrides: Mapping[str, Any], vocab_size: int | None = None):
    """The PalmConfig of a preset with wire overrides (Struct numbers arrive as floats).

    Args:
        preset: a model/ preset name.
        overrides: PalmConfig field -> value, as decoded from a protobuf Struct.
        vocab_size: the dataset tokenizer's size; replaces the preset's placeholder unless
            the overrides set vocab_size themselves (as controller/spec.py does).

    Raises:
        JobSpecError: an unknown field or a value of the wrong kind, naming it.
    """
    from pathways_lite.model.config import PRESETS, PalmConfig

    if preset not in PRESETS:
        raise JobSpecError(
            f"model.preset={preset!r} is not a known preset; known presets: {', '.join(PRESETS)}."
        )
    hints = typing.get_type_hints(PalmConfig)
    values: dict[str, Any] = {}
    for key, value in sorted(overrides.items()):
        path = f"model.overrides.{key}"
        if key not in hints:
            raise JobSpecError(
                f"{path}: unknown field {key!r}; PalmConfig fields are: {', '.join(hints)}."
            )
        allowed = set(typing.get_args(hints[key])) or {hints[key]}
        if value is None and type(None) in allowed:
            values[key] = None
        elif int in allowed and isinstance(value, int | float) and not isinstance(value, bool):
            if not float(value).is_integer():
                raise JobSpecError(f"{path}={value!r} must be an integer.")
            values[key] = int(value)
        elif float in allowed and isinstance(value, int | float) and not isinstance(value, bool):
            values[key] = float(value)
        elif str in allowed and isinstance(value, str):
            values[key] = value
        else:
            raise JobSpecError(f"{path}={value!r} has the wrong kind for {hints[key]}.")
    if vocab_size is not None and "vocab_size" not in values:
        values["vocab_size"] = vocab_size
    try:
        return PalmConfig.from_preset(preset, **values)
    except (ValueError, TypeError) as e:
        raise JobSpecError(f"model (preset {preset!r}, overrides {values}): {e}") from None


def optim_config(optimizer: Mapping[str, Any]):
    """The OptimConfig of worker.proto's OptimizerConfig (as decoded JSON; unset = default).

    Raises:
        JobSpecError: a value out of range, or a weight_decay other than 0 or 1.
    """
    from pathways_lite.model.optim import OptimConfig

    values: dict[str, Any] = {}
    for key, value in optimizer.items():
        if key == "weight_decay":
            # The wire's weight_decay multiplies lr^2; OptimConfig has lr^2 ("dynamic") or none.
            if float(value) == 0:
                values["weight_decay"] = None
            elif float(value) == 1:
                values["weight_decay"] = "dynamic"
            else:
                raise JobSpecError(
                    f"optimizer.weight_decay={value!r} is not supported: use 1 for PaLM's "
                    "lr^2 decay or 0 for none."
                )
        elif key in _OPTIM_FIELDS:
            # uint64 fields arrive as JSON strings.
            number = float(value)
            values[_OPTIM_FIELDS[key]] = int(number) if key == "constant_steps" else number
        else:
            raise JobSpecError(f"optimizer.{key} is not an optimizer field this host knows.")
    try:
        return OptimConfig(**values)
    except (ValueError, TypeError) as e:
        raise JobSpecError(f"optimizer {dict(optimizer)}: {e}") from None


def open_dataset(data: Mapping[str, Any], seq_len: int, vocab_size: int):
    """The job's dataset: a prepared folder, or prepared here (from the on-disk cache).

    Args:
        data: the wire DataSpec as a dict (source, paths, tokenizer_hash).
        seq_len: tokens per example.
        vocab_size: tokenizer size for a corpus prepared here.

    Raises:
        JobSpecError: an unknown source or a folder that is not a dataset.
    """
    from pathways_lite.model.data import DataError, Dataset, DataSpec, prepare_dataset

    source = data.get("source", "")
    paths = tuple(data.get("paths", ()))
    try:
        if source == DATASET_SOURCE:
            if len(paths) != 1:
                raise JobSpecError(
                    f"data.paths={list(paths)!r} must name exactly one dataset folder for "
                    f"data.source={DATASET_SOURCE!r}."
                )
            key = paths[0]
            with _DATASETS_LOCK:
                if key not in _DATASETS:
                    _DATASETS[key] = Dataset.open(key)
                return _DATASETS[key]
        spec = DataSpec(source=source, paths=paths, vocab_size=vocab_size)
        return prepare_dataset(spec, seq_len=seq_len)
    except DataError as e:
        raise JobSpecError(f"data (source {source!r}, paths {list(paths)!r}): {e}") from None


@dataclasses.dataclass
class _Resident:
    """What a loaded job keeps: state on the mesh and the compiled halves of the step."""

    state: Any
    grad_exec: Any
    apply_exec: Any


class PalmRuntime(JobRuntime):
    """A PaLM job on an island: the reference trainer's StepFunctions on the island's mesh.

    Args:
        spec: the decoded LoadJob request.
        devices: the island's devices in mesh order (all hosts' devices in a multi-host
            island; every host runs the same SPMD program over them).
    """

    def __init__(self, spec: JobSpec, devices: Sequence[Any]) -> None:
        super().__init__(spec)
        from pathways_lite.model.train import TrainConfig

        self.devices = list(devices)
        if spec.mesh.size != len(self.devices):
            raise JobSpecError(
                f"mesh data={spec.mesh.data} x model={spec.mesh.model} = {spec.mesh.size} "
                f"devices does not match the island's {len(self.devices)} devices."
            )
        if spec.island_batch % spec.mesh.data:
            raise JobSpecError(
                f"island batch {spec.island_batch} (global_batch={spec.global_batch} / "
                f"num_islands={spec.num_islands}) is not divisible by mesh data="
                f"{spec.mesh.data}."
            )
        self.optim_cfg = optim_config(spec.optimizer)
        try:
            # The host runs whichever step the controller sends: `steps` is not used here.
            self.train_cfg = TrainConfig(
                steps=1, global_batch=spec.global_batch, seq_len=spec.seq_len, seed=spec.seed
            )
        except ValueError as e:
            raise JobSpecError(str(e)) from None
        # Validates preset and overrides now; the vocabulary may still come from the data.
        model_config(spec.preset, spec.overrides)
        self.dataset: Any = None
        self.model_cfg: Any = None
        self.fns: Any = None
        self._resident: _Resident | None = None

    # ---- checks before anything is allocated ------------------------------------------

    def _open_data(self) -> None:
        if self.dataset is not None:
            return
        # A corpus prepared here gets the model's vocabulary size (overridden or preset).
        vocab = model_config(self.spec.preset, self.spec.overrides).vocab_size
        dataset = open_dataset(self.spec.data, self.spec.seq_len, vocab)
        if dataset.seq_len != self.spec.seq_len:
            raise JobSpecError(
                f"seq_len={self.spec.seq_len} does not match the dataset's seq_len "
                f"{dataset.seq_len} at {str(dataset.path)!r}."
            )
        want_tok = self.spec.data.get("tokenizer_hash", "")
        if want_tok and want_tok != dataset.tokenizer.hash:
            raise DataMismatchError(
                f"data.tokenizer_hash={want_tok!r} does not match the hash "
                f"{dataset.tokenizer.hash!r} of the dataset's tokenizer."
            )
        cfg = model_config(self.spec.preset, self.spec.overrides, dataset.tokenizer.vocab_size)
        if cfg.vocab_size < dataset.tokenizer.vocab_size:
            raise JobSpecError(
                f"model vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                f"{dataset.tokenizer.vocab_size}: the model could not embed every token."
            )
        self.dataset = dataset
        self.model_cfg = cfg

    def data_hash(self) -> str:
        self._open_data()
        return self.dataset.hash

    def estimate_bytes_per_device(self) -> int:
        """Parameters, optimizer state and one gradient copy per device, plus the batch."""
        from pathways_lite.model.estimates import memory_per_device

        self._open_data()
        mem = memory_per_device(
            self.model_cfg,
            {"data": self.spec.mesh.data, "model": self.spec.mesh.model},
            self.optim_cfg,
        )
        batch_bytes = 4 * (self.spec.seq_len + 1) * self.spec.island_batch // self.spec.mesh.data
        # Gradients live between grad_fn and apply_fn (and cross islands later): one more copy
        # of the parameters. Activations are not estimated; the compiled step reports them.
        return int(mem["total_bytes"] + mem["params_bytes"] + batch_bytes)

    # ---- load, step, digest --------------------------------------------------------------

    def load(self, *, dry_run: bool) -> MemoryReport:

        from pathways_lite.model.train import StepFunctions, make_mesh

        self._open_data()
        started = time.perf_counter()
        mesh = make_mesh(self.spec.mesh.data, self.spec.mesh.model, devices=self.devices)
        fns = StepFunctions(self.model_cfg, self.optim_cfg, mesh)
        # StepFunctions' own programs, compiled from abstract shapes: nothing is allocated.
        compiled = fns.compile(self.spec.island_batch, self.spec.seq_len)
        grad_exec, apply_exec = compiled.grad, compiled.apply
        grad_mem, apply_mem = _memory_report(grad_exec), _memory_report(apply_exec)
        # The step's peak is the larger of its two programs.
        report = max(grad_mem, apply_mem, key=lambda r: r.total_bytes)
        logger.info(
            "job %s compiled on mesh %s in %.1f s: grad %d B, apply %d B per device",
            self.spec.job_id,
            dict(mesh.shape),
            time.perf_counter() - started,
            grad_mem.total_bytes,
            apply_mem.total_bytes,
        )
        if dry_run:
            return report
        self.fns = fns
        self._resident = _Resident(fns.init(self.spec.seed), grad_exec, apply_exec)
        return report

    def place_batch(self, tokens_bt1: np.ndarray) -> Any:
        """This island's batch on its mesh, split over `data`, from this host's copy of it.

        Every host of the island reads the same island slice, and each supplies the rows of
        its own devices' shards, so this builds the global array on a multi-host island too.
        """
        import jax

        tokens_bt1 = np.ascontiguousarray(tokens_bt1, dtype=np.int32)
        return jax.make_array_from_callback(
            tokens_bt1.shape, self.fns.batch_sharding, lambda index: tokens_bt1[index]
        )

    def read_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This island's slice of the global batch of `step`: tokens (B_i, T + 1), ids (B_i,)."""
        return self.dataset.replica_batch(
            step,
            self.spec.global_batch,
            self.spec.seed,
            self.spec.island_index,
            self.spec.num_islands,
        )

    def run_step(self, step: int) -> StepResult:
        from pathways_lite.model.train import TrainState

        resident = self._loaded()
        t0 = time.perf_counter()
        tokens_bt1, ids = self.read_batch(step)
        batch = self.place_batch(tokens_bt1)
        t1 = time.perf_counter()
        state = resident.state
        loss, _, grads = resident.grad_exec(state.params, batch)
        # Data parallelism across islands exchanges `grads` here (a later issue).
        params, opt_state = resident.apply_exec(state.params, state.opt_state, grads)
        resident.state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
        t2 = time.perf_counter()
        loss_value = float(_fetch(loss))
        t3 = time.perf_counter()
        if not math.isfinite(loss_value):
            logger.warning("job %s step %d: loss is %s", self.spec.job_id, step, loss_value)
        return StepResult(
            loss=loss_value,
            example_ids=[int(i) for i in ids],
            phase_s={"read": t1 - t0, "dispatch": t2 - t1, "wait": t3 - t2},
        )

    def _loaded(self) -> _Resident:
        if self._resident is None:
            raise RuntimeUnavailableError(f"job {self.spec.job_id!r} is not loaded.")
        return self._resident

    def _param_leaves(self) -> list[tuple[str, Any]]:
        import jax

        leaves = jax.tree_util.tree_flatten_with_path(self._loaded().state.params)[0]
        return [(jax.tree_util.keystr(path), leaf) for path, leaf in leaves]

    def digest(self) -> Digest:
        """SHA-256 over (path, dtype, shape, bytes) of every parameter, in tree order."""
        h = hashlib.sha256()
        count = 0
        for name, leaf in self._param_leaves():
            value = np.ascontiguousarray(_fetch(leaf))
            h.update(f"{name}|{value.dtype.str}|{value.shape}|".encode())
            h.update(value.tobytes())
            count += value.size
        return Digest(
            sha256=h.digest(), steps_applied=int(self._loaded().state.step), num_params=count
        )

    def param_layout(self) -> dict[str, dict[str, Any]]:
        """Each parameter's global shape, partition spec, and this host's shards.

        Returns:
            path -> {"shape", "spec", "shards": [(device id, shard shape, index)]}, where
            index is the shard's (start, stop) per dimension in the global array.
        """
        layout = {}
        for name, leaf in self._param_leaves():
            shards = []
            for shard in leaf.addressable_shards:
                index = tuple(
                    (s.start or 0, s.stop if s.stop is not None else dim)
                    for s, dim in zip(shard.index, leaf.shape, strict=True)
                )
                shards.append((int(shard.device.id), tuple(shard.data.shape), index))
            layout[name] = {
                "shape": tuple(leaf.shape),
                "spec": str(leaf.sharding.spec),
                "shards": shards,
            }
        return layout

    def unload(self) -> None:
        import jax

        if self._resident is not None:
            for leaf in jax.tree_util.tree_leaves(
                (self._resident.state.params, self._resident.state.opt_state)
            ):
                if hasattr(leaf, "delete") and not leaf.is_deleted():
                    leaf.delete()
        self._resident = None
        self.fns = None
