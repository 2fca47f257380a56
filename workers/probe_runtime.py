"""The linear probe job (`model.preset == "probe-linear"`): small, real, sharded JAX work.

A least-squares job with a (`data`, `model`)-sharded weight matrix and deterministic synthetic
data, used to check the wiring (service, ordering, multi-host islands, benchmarks of the
dispatch path) without the PaLM model.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

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

PROBE_PRESET = "probe-linear"
# The probe's data is a pure function of the seed; its "dataset" hash names that generator.
PROBE_DATA_HASH = hashlib.sha256(b"pathways_lite probe-linear synthetic data v1").hexdigest()


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
    an island sends its slice of ids (`IslandJobSpec.island_example_ids`), split over the
    mesh's `data` axis, and does no per-example work on the host, so a step is as trivial as the
    dispatch experiments need it to be.
    """

    def __init__(self, spec: IslandJobSpec, devices: Sequence[Any]) -> None:
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
        report = memory_report(compiled)
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
        return StepResult(loss=float(fetch_global(loss)), example_ids=example_ids)

    def digest(self) -> Digest:
        if self._w_dm is None:
            raise RuntimeUnavailableError(f"job {self.spec.job_id!r} is not loaded.")
        w_dm = fetch_global(self._w_dm)
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
