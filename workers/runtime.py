"""The per-job runtime interface of an island host, and the linear probe job behind it.

The worker service (workers/service.py) never touches JAX itself: it validates requests,
enforces ordering, and calls a `JobRuntime` from a worker thread. A runtime owns one job's
compiled step and its resident state on the island's mesh.

Two runtimes exist:
- `LinearProbeRuntime` (`model.preset == "probe-linear"`): a least-squares job with a
  (`data`, `model`)-sharded weight matrix and deterministic synthetic data. It is small,
  real JAX work used to check the wiring (service, ordering, multi-host islands, benchmarks
  of the dispatch path) without the PaLM model.
- `PalmRuntime` (workers/palm_runtime.py, every PaLM preset of model/config.py): the
  reference trainer's step functions on the island's mesh.
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

PROBE_PRESET = "probe-linear"
# The probe's data is a pure function of the seed; its "dataset" hash names that generator.
PROBE_DATA_HASH = hashlib.sha256(b"pathways_lite probe-linear synthetic data v1").hexdigest()
JOB_ID_RE = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


class RuntimeUnavailableError(Exception):
    """The host has no runtime for the requested model (a wrong state, not a bad request)."""


class JobSpecError(ValueError):
    """A job spec field has a value the runtime cannot accept; the message names it."""


@dataclass(frozen=True)
class MeshSpec:
    """Shape of the island's (`data`, `model`) mesh."""

    data: int
    model: int

    @property
    def size(self) -> int:
        return self.data * self.model


@dataclass(frozen=True)
class JobSpec:
    """Everything an island host needs to build one job (the decoded LoadJobRequest).

    Attributes:
        job_id: The controller's id of the job.
        generation: Restart generation of the job.
        preset: Model preset name (names the model family; PaLM reads `model_config`).
        overrides: Probe job only: its config overrides (field -> value).
        mesh: Mesh shape inside the island.
        model_config: PaLM: every PalmConfig field, resolved by the controller.
        optim_config: OptimConfig fields (absent ones take the defaults).
        data: Data spec (source, paths, tokenizer_hash).
        data_hash: Content hash of the prepared dataset.
        seed: Seed of initialisation and data order.
        global_batch: Examples per step over all islands.
        seq_len: Tokens per example.
        island_index: This island's index among the job's islands.
        num_islands: Islands the job spans.
        peers: host:port of this host's counterpart in every island (island order).
        digest_every: compare parameter digests with the peers every this many steps.
        exchange_timeout_s: deadline of one gradient exchange.
    """

    job_id: str
    generation: int
    preset: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    mesh: MeshSpec = MeshSpec(1, 1)
    model_config: Mapping[str, Any] = field(default_factory=dict)
    optim_config: Mapping[str, Any] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    data_hash: str = ""
    seed: int = 0
    global_batch: int = 1
    seq_len: int = 1
    island_index: int = 0
    num_islands: int = 1
    peers: tuple[str, ...] = ()
    digest_every: int = 0
    exchange_timeout_s: float = 0.0

    @property
    def island_batch(self) -> int:
        """Examples this island reads per step."""
        return self.global_batch // self.num_islands

    def island_example_ids(self, step: int) -> list[int]:
        """Ids of this island's examples of `step`: its contiguous slice of the global batch."""
        first = step * self.global_batch + self.island_index * self.island_batch
        return list(range(first, first + self.island_batch))


@dataclass(frozen=True)
class MemoryReport:
    """Device memory of a compiled step, bytes per device."""

    argument_bytes: int = 0
    output_bytes: int = 0
    temp_bytes: int = 0
    generated_code_bytes: int = 0
    alias_bytes: int = 0

    @property
    def total_bytes(self) -> int:
        return max(
            0,
            self.argument_bytes
            + self.output_bytes
            + self.temp_bytes
            + self.generated_code_bytes
            - self.alias_bytes,
        )


@dataclass(frozen=True)
class StepResult:
    """What one step reports: its loss, the example ids read, and host-side phase seconds."""

    loss: float
    example_ids: Sequence[int]
    phase_s: Mapping[str, float] = field(default_factory=dict)
    # Set by runtimes that exchange gradients between islands.
    param_digest: bytes = b""
    exchange_s: float = 0.0
    exchange_bytes_sent: int = 0


@dataclass(frozen=True)
class Digest:
    """A digest of a job's parameters."""

    sha256: bytes
    steps_applied: int
    num_params: int


class JobRuntime(abc.ABC):
    """One job resident on an island: its compiled step and its state on the mesh.

    Methods are blocking and are called from one worker thread at a time. A runtime that
    trains across islands gets its `exchange` (workers/exchange.py's JobExchange) from the
    service before `load`; `supports_exchange` says whether it can use one.
    """

    supports_exchange = False

    def __init__(self, spec: JobSpec) -> None:
        self.spec = spec
        self.exchange: Any = None

    @abc.abstractmethod
    def estimate_bytes_per_device(self) -> int:
        """Bytes per device the job will hold, computed without allocating anything."""

    @abc.abstractmethod
    def data_hash(self) -> str:
        """Content hash of the data this job reads; LoadJob's data_hash must equal it."""

    def compile(self) -> MemoryReport | None:
        """Compile the step without touching device state, ahead of `load`; the host runs it
        off its runtime thread, so the island's other jobs keep stepping meanwhile. Returns
        the compiled step's memory analysis, or None for a runtime that compiles in `load`."""
        return None

    @abc.abstractmethod
    def load(self, *, dry_run: bool) -> MemoryReport:
        """Build and compile the step (unless `compile` did); unless `dry_run`, initialise
        the state on the mesh."""

    @abc.abstractmethod
    def run_step(self, step: int) -> StepResult:
        """Run training step `step` on this island's slice of the global batch."""

    @abc.abstractmethod
    def digest(self) -> Digest:
        """Digest of the current parameters."""

    @abc.abstractmethod
    def unload(self) -> None:
        """Drop every device buffer of the job."""

    # Suspend/resume (multi-tenancy preemption): runtimes that support it override these.
    suspended = False

    def suspend(self) -> int:
        """Move the job's state off the devices into host memory; returns its host bytes."""
        raise RuntimeUnavailableError(f"job {self.spec.job_id!r}'s runtime cannot be suspended.")

    def resume(self) -> None:
        """Put the state `suspend` moved to the host back on the devices, bit for bit."""
        raise RuntimeUnavailableError(f"job {self.spec.job_id!r}'s runtime cannot be resumed.")

    def device_arrays(self) -> list[Any]:
        """The job's arrays resident on the devices (for live-array accounting)."""
        return []

    def host_bytes(self) -> int:
        """Bytes of the job's state held in host memory while suspended."""
        return 0


def _memory_report(compiled: Any) -> MemoryReport:
    """Read XLA's compiled memory analysis (absent on some backends: zeros then)."""
    analysis = compiled.memory_analysis()
    if analysis is None:
        return MemoryReport()
    return MemoryReport(
        argument_bytes=int(getattr(analysis, "argument_size_in_bytes", 0)),
        output_bytes=int(getattr(analysis, "output_size_in_bytes", 0)),
        temp_bytes=int(getattr(analysis, "temp_size_in_bytes", 0)),
        generated_code_bytes=int(getattr(analysis, "generated_code_size_in_bytes", 0)),
        alias_bytes=int(getattr(analysis, "alias_size_in_bytes", 0)),
    )


def _fetch(array: Any) -> np.ndarray:
    """The global value of a (possibly multi-host) array on this host."""
    if array.is_fully_addressable or array.is_fully_replicated:
        if array.is_fully_addressable:
            return np.asarray(array)
        return np.asarray(array.addressable_shards[0].data)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(array, tiled=True))


@dataclass(frozen=True)
class ProbeConfig:
    """Shape and learning rate of the linear probe job (set through model overrides)."""

    d_in: int = 8
    d_out: int = 8
    learning_rate: float = 0.05

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, Any]) -> ProbeConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise JobSpecError(
                f"model.overrides has unknown field(s) {unknown} for preset "
                f"{PROBE_PRESET!r}; known fields are {sorted(known)}."
            )
        values: dict[str, Any] = {}
        for name, value in overrides.items():
            if name in ("d_in", "d_out"):
                if float(value) != int(value) or int(value) <= 0:
                    raise JobSpecError(f"model.overrides.{name}={value!r} must be a positive int.")
                values[name] = int(value)
            else:
                values[name] = float(value)
        return cls(**values)


class LinearProbeRuntime(JobRuntime):
    """Least squares `y = x @ w` with `w` split over (`data`, `model`): real sharded JAX work.

    Example i is a deterministic function of (seed, i), generated inside the compiled step
    from the example ids alone (`x_i ~ N(0, 1)` from `fold_in(key_x, i)`, `y_i = x_i @ w_true`):
    an island sends its slice of ids (`JobSpec.island_example_ids`), split over the mesh's
    `data` axis, and does no per-example work on the host, so a step is as trivial as the
    dispatch experiments need it to be.
    """

    def __init__(self, spec: JobSpec, devices: Sequence[Any]) -> None:
        super().__init__(spec)
        self.cfg = ProbeConfig.from_overrides(spec.overrides)
        if self.cfg.d_out % spec.mesh.model or self.cfg.d_in % spec.mesh.data:
            raise JobSpecError(
                f"probe shape d_in={self.cfg.d_in}, d_out={self.cfg.d_out} is not divisible "
                f"by mesh data={spec.mesh.data}, model={spec.mesh.model}."
            )
        if spec.island_batch % spec.mesh.data:
            raise JobSpecError(
                f"island batch {spec.island_batch} (global_batch={spec.global_batch} / "
                f"num_islands={spec.num_islands}) is not divisible by mesh data="
                f"{spec.mesh.data}."
            )
        self.devices = list(devices)
        self._w_dm: Any = None
        self._step_fn: Any = None
        self._steps_applied = 0

    def estimate_bytes_per_device(self) -> int:
        n_dev = self.spec.mesh.size
        w_bytes = 4 * self.cfg.d_in * self.cfg.d_out // n_dev
        batch_bytes = 4 * self.spec.island_batch * (self.cfg.d_in + self.cfg.d_out)
        # The weights, their gradient and the updated copy, plus this device's batch slice.
        return 3 * w_bytes + batch_bytes // self.spec.mesh.data

    def data_hash(self) -> str:
        return PROBE_DATA_HASH

    def _shardings(self) -> tuple[Any, Any, Any]:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        dev_dm = np.asarray(self.devices).reshape(self.spec.mesh.data, self.spec.mesh.model)
        mesh = Mesh(dev_dm, ("data", "model"))
        w_sharding = NamedSharding(mesh, PartitionSpec("data", "model"))
        ids_sharding = NamedSharding(mesh, PartitionSpec("data"))
        loss_sharding = NamedSharding(mesh, PartitionSpec())
        return w_sharding, ids_sharding, loss_sharding

    def load(self, *, dry_run: bool) -> MemoryReport:
        import jax
        import jax.numpy as jnp

        w_sharding, ids_sharding, loss_sharding = self._shardings()
        lr = self.cfg.learning_rate
        d_in, d_out = self.cfg.d_in, self.cfg.d_out
        key_x, key_w = jax.random.split(jax.random.key(self.spec.seed))

        def example(i):  # () -> (D,)
            return jax.random.normal(jax.random.fold_in(key_x, i), (d_in,), jnp.float32)

        def step_fn(w_dm, ids_b):
            x_bd = jax.vmap(example)(ids_b)
            w_true_dm = jax.random.normal(key_w, (d_in, d_out), jnp.float32)
            y_bm = x_bd @ w_true_dm  # (B, D) @ (D, M) -> (B, M)

            def loss_fn(w):
                pred_bm = jnp.einsum("bd,dm->bm", x_bd, w)  # (B, D) x (D, M) -> (B, M)
                return jnp.mean((pred_bm - y_bm) ** 2)

            loss, grad_dm = jax.value_and_grad(loss_fn)(w_dm)
            return w_dm - lr * grad_dm, loss

        jitted = jax.jit(
            step_fn,
            in_shardings=(w_sharding, ids_sharding),
            out_shardings=(w_sharding, loss_sharding),
            donate_argnums=(0,),
        )
        b = self.spec.island_batch
        shapes = (
            jax.ShapeDtypeStruct((self.cfg.d_in, self.cfg.d_out), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
        )
        compiled = jitted.lower(*shapes).compile()
        report = _memory_report(compiled)
        if dry_run:
            return report
        w0_dm = (
            np.random.default_rng([self.spec.seed, 0])
            .standard_normal((self.cfg.d_in, self.cfg.d_out))
            .astype(np.float32)
        )
        self._w_dm = jax.make_array_from_callback(w0_dm.shape, w_sharding, lambda i: w0_dm[i])
        self._step_fn = compiled
        self._ids_sharding = ids_sharding
        return report

    def run_step(self, step: int) -> StepResult:
        import jax

        if self._step_fn is None:
            raise RuntimeUnavailableError(f"job {self.spec.job_id!r} is not loaded.")
        example_ids = self.spec.island_example_ids(step)
        ids_b = np.asarray(example_ids, dtype=np.int32)
        ids = jax.make_array_from_callback(ids_b.shape, self._ids_sharding, lambda i: ids_b[i])
        self._w_dm, loss = self._step_fn(self._w_dm, ids)
        self._steps_applied += 1
        return StepResult(loss=float(_fetch(loss)), example_ids=example_ids)

    def digest(self) -> Digest:
        if self._w_dm is None:
            raise RuntimeUnavailableError(f"job {self.spec.job_id!r} is not loaded.")
        w_dm = _fetch(self._w_dm)
        return Digest(
            sha256=hashlib.sha256(np.ascontiguousarray(w_dm).tobytes()).digest(),
            steps_applied=self._steps_applied,
            num_params=int(w_dm.size),
        )

    def unload(self) -> None:
        if self._w_dm is not None:
            self._w_dm.delete()
        self._w_dm = None
        self._step_fn = None


def make_runtime(spec: JobSpec, devices: Sequence[Any]) -> JobRuntime:
    """The runtime for `spec.preset` on `devices` (the island's devices, mesh order).

    Raises:
        JobSpecError: a field the runtime cannot accept.
        RuntimeUnavailableError: no runtime for this model on this host yet.
    """
    if spec.preset == PROBE_PRESET:
        return LinearProbeRuntime(spec, devices)
    from .palm_runtime import PalmRuntime, palm_presets

    if spec.preset in palm_presets():
        return PalmRuntime(spec, devices)
    raise JobSpecError(
        f"model.preset={spec.preset!r} is not a model this host runs; known presets: "
        f"{', '.join((PROBE_PRESET, *palm_presets()))}."
    )
