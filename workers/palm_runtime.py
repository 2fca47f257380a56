"""The PaLM job runtime of an island host: the reference trainer's step on the island's mesh.

The runtime rebuilds the job's PalmConfig and OptimConfig from the field dicts the controller
resolved (`PalmConfig.from_dict`, `OptimConfig.from_dict`: the model owns its configs), opens
the dataset folder the controller prepared and checks its hash, checks the memory estimate,
and then keeps the parameters and optimizer state resident on a (`data`, `model`) mesh over
the island's devices (every host's devices in a multi-host island).

The step is `pathways_lite.model.train.StepFunctions`, the very functions the reference trainer
runs, lowered and compiled once at load: that is what makes distributed == reference. Its two
halves stay separate calls here (`grad_fn`, then `apply_fn`) because data parallelism across
islands exchanges gradients between them (workers/exchange.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from .exchange import DEFAULT_BUCKET_BYTES as DEFAULT_BUCKET
from .runtime import (
    Digest,
    IslandJobSpec,
    JobRuntime,
    JobSpecError,
    MemoryReport,
    RuntimeUnavailableError,
    StepResult,
    fetch_global,
    memory_report,
)

logger = logging.getLogger(__name__)

# The wire's DataSpec source for a folder written by prepare_dataset: the controller prepared
# it where every host can read it, and sends its content hash.
DATASET_SOURCE = "dataset"

# Datasets opened by this process, by folder: jobs on one host share the memory maps.
_DATASETS: dict[str, Any] = {}
_DATASETS_LOCK = threading.Lock()


class DataMismatchError(RuntimeUnavailableError):
    """The data this host reads is not the data the job was given (FAILED_PRECONDITION)."""


def palm_presets() -> tuple[str, ...]:
    """The model presets this runtime serves."""
    from pathways_lite.model.config import PRESETS

    return tuple(PRESETS)


def _config(cls: type, values: Mapping[str, Any], path: str) -> Any:
    try:
        return cls.from_dict(values, path=path)
    except ValueError as e:  # the model's message names the field
        raise JobSpecError(str(e)) from None


def model_config(values: Mapping[str, Any]):
    """The PalmConfig of LoadJob's model.config (every field, resolved by the controller)."""
    from pathways_lite.model.config import PalmConfig

    return _config(PalmConfig, values, "model.config")


def optim_config(values: Mapping[str, Any]):
    """The OptimConfig of LoadJob's optimizer.config (absent keys take the defaults)."""
    from pathways_lite.model.optim import OptimConfig

    return _config(OptimConfig, values, "optimizer.config")


def open_dataset(data: Mapping[str, Any]):
    """The job's prepared dataset folder (opened once per process).

    Args:
        data: the wire DataSpec as a dict (source "dataset", paths [folder], tokenizer_hash).

    Raises:
        JobSpecError: another source, or a folder that is not a dataset.
    """
    from pathways_lite.model.data import DataError, Dataset

    source = data.get("source", "")
    paths = tuple(data.get("paths", ()))
    if source != DATASET_SOURCE or len(paths) != 1:
        raise JobSpecError(
            f"data (source {source!r}, paths {list(paths)!r}) must be source "
            f"{DATASET_SOURCE!r} with exactly one prepared dataset folder: the controller "
            "prepares the dataset where every host can read it."
        )
    key = paths[0]
    try:
        with _DATASETS_LOCK:
            if key not in _DATASETS:
                _DATASETS[key] = Dataset.open(key)
            return _DATASETS[key]
    except DataError as e:
        raise JobSpecError(f"data.paths[0]={key!r}: {e}") from None


def compiled_memory(fns: Any, compiled: Any) -> MemoryReport:
    """What a job holds per device at the peak of its compiled step (StepFunctions and its
    CompiledStep): the larger of the gradient program, with the optimizer state resident
    beside it, and the update program, which takes parameters, optimizer state and
    gradients as arguments (its outputs alias the donated state)."""
    _, opt_bytes = fns.state_bytes_per_device()
    grad = dataclasses.replace(memory_report(compiled.grad), resident_bytes=opt_bytes)
    return max(grad, memory_report(compiled.apply), key=lambda r: r.total_bytes)


@dataclasses.dataclass
class _Resident:
    """What a loaded job keeps: state on the mesh and the compiled halves of the step."""

    state: Any
    grad_exec: Any
    apply_exec: Any


class PalmRuntime(JobRuntime):
    """A PaLM job on an island: the reference trainer's StepFunctions on the island's mesh.

    With more than one island, `exchange` averages the gradients between `grad_fn` and
    `apply_fn`, and every `digest_every` steps the islands compare parameter digests.

    Args:
        spec: the decoded LoadJob request.
        devices: the island's devices in mesh order (all hosts' devices in a multi-host
            island; every host runs the same SPMD program over them).
    """

    supports_exchange = True

    def __init__(self, spec: IslandJobSpec, devices: Sequence[Any]) -> None:
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
        if spec.overrides:
            raise JobSpecError(
                f"model.overrides={dict(spec.overrides)!r} must be empty for PaLM: the "
                "controller sends the resolved config in model.config."
            )
        if not spec.model_config:
            raise JobSpecError("model.config is empty: send every PalmConfig field.")
        self.model_cfg = model_config(spec.model_config)
        self.optim_cfg = optim_config(spec.optim_config)
        try:
            # The host runs whichever step the controller sends: `steps` is not used here.
            self.train_cfg = TrainConfig(
                steps=1, global_batch=spec.global_batch, seq_len=spec.seq_len, seed=spec.seed
            )
        except ValueError as e:
            raise JobSpecError(str(e)) from None
        if spec.seq_len > self.model_cfg.max_seq_len:
            raise JobSpecError(
                f"seq_len={spec.seq_len} is longer than model.config.max_seq_len="
                f"{self.model_cfg.max_seq_len}."
            )
        self.dataset: Any = None
        self.fns: Any = None
        self._resident: _Resident | None = None
        # (step functions, grad and apply executables, memory report) once compiled.
        self._compiled: tuple[Any, Any, Any, MemoryReport] | None = None
        # The gradient program whose buckets leave during the backward pass, when the job
        # spans islands (workers/exchange_overlap.py).
        self._overlap: Any = None
        # While suspended: (treedef, [(host value, sharding)]) of the train state.
        self._suspended_state: Any = None
        # The state before the last step, kept while the job spans islands (peer_restore.py).
        self.pre_step: Any = None

    # ---- checks before anything is allocated ------------------------------------------

    def _open_data(self) -> None:
        if self.dataset is not None:
            return
        dataset = open_dataset(self.spec.data)
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
        if self.model_cfg.vocab_size < dataset.tokenizer.vocab_size:
            raise JobSpecError(
                f"model.config.vocab_size={self.model_cfg.vocab_size} is smaller than the "
                f"tokenizer's {dataset.tokenizer.vocab_size}: the model could not embed every "
                "token."
            )
        self.dataset = dataset

    @property
    def masked(self) -> bool:
        """Whether the job's data is a mixture (masked loss, (sum, count) exchange)."""
        self._open_data()
        return hasattr(self.dataset, "source_names")

    def data_hash(self) -> str:
        self._open_data()
        return self.dataset.hash

    def estimate_bytes_per_device(self) -> int:
        """An upper bound of what the compiled step will hold per device, before compiling
        (`training_bytes_per_device`: state, gradients, batch, activations, update
        temporaries)."""
        from pathways_lite.model.estimates import training_bytes_per_device

        self._open_data()
        return training_bytes_per_device(
            self.model_cfg,
            {"data": self.spec.mesh.data, "model": self.spec.mesh.model},
            self.optim_cfg,
            examples_per_device=self.spec.island_batch // self.spec.mesh.data,
            seq_len=self.spec.seq_len,
        )

    # ---- load, step, digest --------------------------------------------------------------

    def compile(self) -> MemoryReport:
        """Compile both halves of the step from abstract shapes: nothing is allocated on the
        devices, so this runs beside the island's other jobs' steps."""
        from pathways_lite.model.train import StepFunctions, make_mesh

        if self._compiled is not None:
            return self._compiled[3]
        self._open_data()
        started = time.perf_counter()
        mesh = make_mesh(self.spec.mesh.data, self.spec.mesh.model, devices=self.devices)
        masked = self.masked
        fns = StepFunctions(
            self.model_cfg,
            self.optim_cfg,
            mesh,
            num_sources=self.dataset.num_sources if masked else 0,
            segmented=bool(masked and self.dataset.segmented),
        )
        self._overlap = self._overlapped_grad(fns)
        if self._overlap is not None:
            # The tapped gradient program replaces the plain one (one compile, not two).
            compiled = self._overlap.compiled_step()
        else:
            compiled = fns.compile(self.spec.island_batch, self.spec.seq_len)
        grad_exec, apply_exec = compiled.grad, compiled.apply
        report = compiled_memory(fns, compiled)
        logger.info(
            "job %s compiled on mesh %s in %.1f s: %d bytes per device at the step's peak",
            self.spec.job_id,
            dict(mesh.shape),
            time.perf_counter() - started,
            report.total_bytes,
        )
        self._compiled = (fns, grad_exec, apply_exec, report)
        return report

    def _overlapped_grad(self, fns: Any) -> Any:
        """The bucketed, overlapped gradient program where it applies: a job on several
        islands, not a mixture, on devices all of this process (else None: the exchange
        runs after the backward pass)."""
        import jax

        spec = self.spec
        if spec.num_islands < 2 or not spec.peers or not spec.exchange_overlap or self.masked:
            return None
        if any(d.process_index != jax.process_index() for d in self.devices):
            return None
        from .exchange_overlap import OverlappedGrad

        return OverlappedGrad(
            fns, spec.island_batch, spec.seq_len, spec.exchange_bucket_bytes or DEFAULT_BUCKET
        )

    def load(self, *, dry_run: bool, state: Any = None) -> MemoryReport:
        """Compile, then hold the seed's state (or `state`: a peer's, workers/peer_restore.py)."""
        report = self.compile()
        if dry_run:
            return report
        fns, grad_exec, apply_exec, _ = self._compiled
        self.fns = fns
        state = fns.init(self.spec.seed) if state is None else state
        self._resident = _Resident(state, grad_exec, apply_exec)
        if self.spec.num_islands > 1:
            # The pre-step copy's program compiles here, not in the first step (a host
            # restarted after its island died is waited for by every island).
            from .peer_restore import keep_pre_step

            keep_pre_step(state)
        return report

    def place_batch(self, tokens_bt1: np.ndarray) -> Any:
        """This island's batch on its mesh, split over `data`, from this host's copy of it.

        Every host of the island reads the same island slice, and each supplies the rows of
        its own devices' shards, so this builds the global array on a multi-host island too.
        """
        import jax

        arrays = self.fns.batch_arrays(tokens_bt1)
        shardings = self.fns.batch_sharding_tree

        def place(array: np.ndarray, sharding: Any) -> Any:
            array = np.ascontiguousarray(array)
            return jax.make_array_from_callback(array.shape, sharding, lambda i: array[i])

        return jax.tree.map(place, arrays, shardings)

    def read_batch(self, step: int, weights: Sequence[float] | None = None) -> tuple[Any, Any]:
        """This island's slice of the global batch of `step`: tokens (B_i, T + 1) (a
        `model.mixture.Batch` for a mixture, drawn under `weights`), and the ids (B_i,)."""
        args = (
            step,
            self.spec.global_batch,
            self.spec.seed,
            self.spec.island_index,
            self.spec.num_islands,
        )
        if self.masked:
            batch = self.dataset.replica_batch(*args, weights=weights)
            return batch, batch.ids
        if weights:
            raise JobSpecError(
                f"step {step} carries mixture weights, but the job's data is not a mixture."
            )
        return self.dataset.replica_batch(*args)

    def run_step(self, step: int, weights: Sequence[float] | None = None) -> StepResult:
        from pathways_lite.model.train import TrainState

        from .exchange import flat_shards, unflatten_shards
        from .peer_restore import keep_pre_step

        if self.masked:
            return self._run_masked_step(step, weights)
        resident = self._loaded()
        t0 = time.perf_counter()
        tokens_bt1, ids = self.read_batch(step)
        batch = self.place_batch(tokens_bt1)
        t1 = time.perf_counter()
        state = resident.state
        exchange_s, sent = 0.0, 0
        if self._overlap is not None:
            if self.exchange is None:
                raise RuntimeUnavailableError(
                    f"job {self.spec.job_id!r} spans {self.spec.num_islands} islands but has "
                    "no exchange with its peers."
                )
            # Buckets exchanged while the backward pass runs; exchange_s is the wait after it.
            loss, grads, times = self._overlap.step(state.params, batch, step, self.exchange)
            exchange_s, sent = times.exposed_s, self.exchange.bytes_sent
        else:
            loss, _, grads = resident.grad_exec(state.params, batch)
        t2 = time.perf_counter()
        if self.exchange is not None and self._overlap is None:
            # Data parallelism across islands: this host's gradient shards, averaged with
            # host i of every other island (reduce-scatter + all-gather, island order).
            flat, layout = flat_shards(grads)
            t2 = time.perf_counter()
            reduced = self.exchange.allreduce_mean(step, flat)
            sent = self.exchange.bytes_sent
            exchange_s = time.perf_counter() - t2
            grads = unflatten_shards(reduced, layout, grads)
        if self.exchange is not None:
            self.pre_step = keep_pre_step(state)  # a step half applied is rolled back
        params, opt_state = resident.apply_exec(state.params, state.opt_state, grads)
        resident.state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
        digest, compare_s = self._step_digest(step)
        exchange_s += compare_s
        t3 = time.perf_counter()
        loss_value = float(fetch_global(loss))
        t4 = time.perf_counter()
        if not math.isfinite(loss_value):
            logger.warning("job %s step %d: loss is %s", self.spec.job_id, step, loss_value)
        return StepResult(
            loss=loss_value,
            example_ids=[int(i) for i in ids],
            phase_s={
                "read": t1 - t0,
                "compute": t3 - t1 - exchange_s,
                "exchange": exchange_s,
                "wait": t4 - t3,
            },
            param_digest=digest,
            exchange_s=exchange_s,
            exchange_bytes_sent=sent,
        )

    def _step_digest(self, step: int) -> tuple[bytes, float]:
        """The parameter digest after `step` when one is due (else b""), compared with the
        other islands'; and the seconds the comparison took."""
        every = self.spec.digest_every
        if not (every and (step + 1) % every == 0):
            return b"", 0.0
        digest = self.shard_digest()
        if self.exchange is None:
            return digest, 0.0
        t_d = time.perf_counter()
        self.exchange.compare_digest(step, digest)
        return digest, time.perf_counter() - t_d

    def _run_masked_step(self, step: int, weights: Sequence[float] | None) -> StepResult:
        """A mixture step: gradients of the summed loss; the islands add (sum, count) and
        the gradients (as means over islands, whose ratio is the global one), then every
        island scales by 1 / (global count) inside the update."""
        from pathways_lite.model.train import TrainState

        from .exchange import flat_shards, unflatten_shards
        from .peer_restore import keep_pre_step

        resident = self._loaded()
        t0 = time.perf_counter()
        host_batch, ids = self.read_batch(step, weights)
        batch = self.place_batch(host_batch)
        t1 = time.perf_counter()
        state = resident.state
        _, stats, grads = resident.grad_exec(state.params, batch)
        stats_np = np.asarray(fetch_global(stats), dtype=np.float32)
        exchange_s, sent = 0.0, 0
        if self.exchange is not None:
            flat, layout = flat_shards(grads)
            t2 = time.perf_counter()
            # The stats ride at the end of the vector: means of sums over the islands.
            reduced = self.exchange.allreduce_mean(step, np.concatenate([flat, stats_np]))
            sent = self.exchange.bytes_sent
            exchange_s = time.perf_counter() - t2
            grads = unflatten_shards(reduced[: flat.size], layout, grads)
            stats_np = reduced[flat.size :]
            self.pre_step = keep_pre_step(state)  # a step half applied is rolled back
        # Means over islands of sums: their ratio is the global sum / global count.
        count = max(float(stats_np[1]), 1e-30)
        params, opt_state = resident.apply_exec(
            state.params, state.opt_state, grads, np.float32(1.0 / count)
        )
        resident.state = TrainState(params=params, opt_state=opt_state, step=state.step + 1)
        digest, compare_s = self._step_digest(step)
        exchange_s += compare_s
        t3 = time.perf_counter()
        loss_value = float(stats_np[0]) / count
        islands = self.spec.num_islands if self.exchange is not None else 1
        return StepResult(
            loss=loss_value,
            example_ids=[int(i) for i in ids],
            phase_s={"read": t1 - t0, "compute": t3 - t1 - exchange_s, "exchange": exchange_s},
            param_digest=digest,
            exchange_s=exchange_s,
            exchange_bytes_sent=sent,
            # Sums over every island (the exchange gave their means).
            loss_stats=[float(x) * islands for x in stats_np],
        )

    def shard_digest(self) -> bytes:
        """SHA-256 over this host's distinct parameter shards, in a fixed order: host i of
        every island holds the same shards, so equal digests mean bitwise-equal parameters."""
        import jax

        h = hashlib.sha256()
        for name, leaf in self._param_leaves():
            seen = set()
            for shard in sorted(leaf.addressable_shards, key=lambda s: str(s.index)):
                key = str(shard.index)
                if key in seen:
                    continue
                seen.add(key)
                value = np.ascontiguousarray(jax.device_get(shard.data))
                h.update(f"{name}|{key}|{value.dtype.str}|{value.shape}|".encode())
                h.update(value.tobytes())
        return h.digest()

    def _loaded(self) -> _Resident:
        if self._resident is None:
            raise RuntimeUnavailableError(f"job {self.spec.job_id!r} is not loaded.")
        if self.suspended and self._resident.state is None:
            raise RuntimeUnavailableError(
                f"job {self.spec.job_id!r} is suspended: its state is in host memory."
            )
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
            value = np.ascontiguousarray(fetch_global(leaf))
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

    # ---- suspend / resume (preemption by a higher-priority job) --------------------------

    def suspend(self) -> int:
        """Copy params and optimizer state to host numpy arrays and delete the device
        buffers; the compiled step functions stay (a resume needs no recompile)."""
        import jax

        resident = self._loaded()
        if self.suspended:
            return self.host_bytes()
        self.pre_step = None  # a suspended job is not rolled back
        state = resident.state
        # TrainState is a plain dataclass (not a pytree): flatten its arrays explicitly.
        leaves, treedef = jax.tree_util.tree_flatten((state.params, state.opt_state))
        host = []
        for leaf in leaves:
            if isinstance(leaf, jax.Array):
                host.append((np.asarray(jax.device_get(leaf)), leaf.sharding))
            else:
                host.append((leaf, None))
        for leaf in leaves:
            if isinstance(leaf, jax.Array) and not leaf.is_deleted():
                leaf.delete()
        self._suspended_state = (treedef, host, state.step)
        resident.state = None
        self.suspended = True
        logger.info(
            "job %s suspended: %d bytes to host memory", self.spec.job_id, self.host_bytes()
        )
        return self.host_bytes()

    def resume(self) -> None:
        """Put the host copy back on the mesh with the shardings it had (bitwise)."""
        import jax

        if not self.suspended:
            return
        from pathways_lite.model.train import TrainState

        treedef, host, step = self._suspended_state
        leaves = [
            jax.device_put(value, sharding) if sharding is not None else value
            for value, sharding in host
        ]
        params, opt_state = jax.tree_util.tree_unflatten(treedef, leaves)
        assert self._resident is not None
        self._resident.state = TrainState(params=params, opt_state=opt_state, step=step)
        self._suspended_state = None
        self.suspended = False
        logger.info("job %s resumed", self.spec.job_id)

    def host_bytes(self) -> int:
        state = getattr(self, "_suspended_state", None)
        if not state:
            return 0
        return int(sum(v.nbytes for v, s in state[1] if isinstance(v, np.ndarray)))

    def device_arrays(self) -> list[Any]:
        import jax

        if self._resident is None or self._resident.state is None:
            return []
        return [
            leaf
            for leaf in jax.tree_util.tree_leaves(
                (self._resident.state.params, self._resident.state.opt_state)
            )
            if isinstance(leaf, jax.Array) and not leaf.is_deleted()
        ]

    # ---- checkpoints (workers/checkpoint.py; the worker service owns the writer) ----------

    def checkpoint_state(self) -> tuple[Any, Any, int]:
        """(params, opt_state, steps applied) of the loaded job, as they are on the mesh."""
        state = self._loaded().state
        return state.params, state.opt_state, int(state.step)

    def restore_checkpoint(self, path: str) -> int:
        """Replace the loaded state by a committed checkpoint, read onto this island's mesh
        with its own shardings; returns the checkpoint's step.

        Raises:
            CheckpointError: the checkpoint is missing, half-written or corrupt.
        """
        import jax

        from pathways_lite.model.train import TrainState

        from .checkpoint import restore

        resident = self._loaded()
        old = resident.state
        params_like, opt_like = jax.eval_shape(lambda: (old.params, old.opt_state))
        if self.spec.restore_stage_bounds:  # a pipeline job's, split by stage
            from .pipeline import read_stage_parts

            params, opt_state, step = read_stage_parts(
                path,
                self.spec.restore_stage_bounds,
                self.model_cfg,
                self.optim_cfg,
                params_like,
                opt_like,
                self.fns.param_shardings,
                self.fns.opt_shardings,
            )
        else:
            params, opt_state, step = restore(
                path, params_like, opt_like, self.fns.param_shardings, self.fns.opt_shardings
            )
        resident.state = TrainState(params=params, opt_state=opt_state, step=step)
        for leaf in jax.tree_util.tree_leaves((old.params, old.opt_state)):
            if hasattr(leaf, "delete") and not leaf.is_deleted():
                leaf.delete()
        logger.info("job %s restored %s (step %d)", self.spec.job_id, path, step)
        return step

    def init_params_from(self, path: str) -> int:
        """Fine-tuning (LoadJob's init_from): replace the seed's parameters by a committed
        checkpoint's, read onto this island's mesh with its own shardings; the optimizer
        state stays fresh and the step 0. Returns the checkpoint's step.

        Raises:
            CheckpointError: the checkpoint is missing, half-written, corrupt, or holds
                parameters of another shape.
        """
        import jax

        from .checkpoint import restore_params

        resident = self._loaded()
        old = resident.state
        params_like = jax.eval_shape(lambda: old.params)
        if self.spec.init_stage_bounds:  # a pipeline job's, split by stage
            from .pipeline import read_stage_parts

            opt_like = jax.eval_shape(lambda: old.opt_state)
            params, _, step = read_stage_parts(
                path,
                self.spec.init_stage_bounds,
                self.model_cfg,
                self.optim_cfg,
                params_like,
                opt_like,
                self.fns.param_shardings,
                self.fns.opt_shardings,
                params_only=True,
            )
        else:
            params, step = restore_params(path, params_like, self.fns.param_shardings)
        for leaf in jax.tree_util.tree_leaves(old.params):
            if hasattr(leaf, "delete") and not leaf.is_deleted():
                leaf.delete()
        resident.state = dataclasses.replace(old, params=params)
        logger.info(
            "job %s starts from the parameters of %s (step %d)", self.spec.job_id, path, step
        )
        return step

    def unload(self) -> None:
        import jax

        self._suspended_state = None
        self.suspended = False
        self.pre_step = None
        if self._resident is not None and self._resident.state is not None:
            for leaf in jax.tree_util.tree_leaves(
                (self._resident.state.params, self._resident.state.opt_state)
            ):
                if hasattr(leaf, "delete") and not leaf.is_deleted():
                    leaf.delete()
        self._resident = None
        self.fns = None
        self._compiled = None
        self._overlap = None
