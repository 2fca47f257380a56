"""A job resolved once: the typed configs, figures and dataset every other part reads.

A spec is turned into a `ResolvedJob` at submit (model, optimizer, train and data configs;
an upper bound of the bytes per device it holds on each island; FLOPs per token for MFU) and
the job's runner keeps it. Data preparation, which may tokenize a corpus and so never runs on
the submit path, adds the dataset (`with_dataset`): the model's vocabulary becomes the trained
tokenizer's. Nothing re-validates a spec after that. `MemoryFigures` keeps what the compiled
steps of loaded jobs really hold, by (model, mesh, batch), for admission.

`load_request` is the one function that builds a host's `LoadJobRequest`: the job's placement
on that host (`HostLoad`: generation, epoch, island index, peers, checkpoint folder and
restore point, dry run) plus the resolved job's configs. The benchmarks and tests that load
other runtimes start from `placement_request`, the placement part alone.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import threading
from typing import Any

from google.protobuf import struct_pb2

from pathways_lite.v1 import common_pb2, worker_pb2

from . import spec as spec_lib
from .program import HostLoad, StepProgram, placement_request

logger = logging.getLogger(__name__)

# Parameter digests are compared every step below this many parameters, else every
# DIGEST_EVERY_LARGE steps (a digest reads every parameter back to the host).
DIGEST_EVERY_STEP_MAX_PARAMS = 200_000_000
DIGEST_EVERY_LARGE = 100
# One lock per (data, seq_len, tokenizer) being prepared in this process.
_PREPARING: dict[tuple, threading.Lock] = {}
_PREPARING_LOCK = threading.Lock()


@dataclasses.dataclass(frozen=True)
class DatasetRef:
    """A prepared dataset every host can read, identified by content hash."""

    path: str
    hash: str
    tokenizer_hash: str
    num_examples: int
    # A mixture's sources (names and normalised weights), mixture order; empty otherwise.
    source_names: tuple[str, ...] = ()
    source_weights: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class InitRef:
    """The checkpoint a job's parameters start from (`init_from`), and the tokenizer file of
    the dataset it was trained on (the new job tokenizes its data with it)."""

    path: str
    step: int
    source_id: str
    tokenizer_path: str
    # The source's pipeline.stages when it is a pipeline job (its checkpoint is split by
    # stage; the hosts read the whole model from the parts); 0 otherwise.
    stages: int = 0


@dataclasses.dataclass(frozen=True)
class ResolvedJob:
    """A job spec resolved into what the controller and the hosts use.

    Attributes:
        spec: the JobSpec proto as submitted.
        configs: model, optimizer, train and data configs (controller/spec.py's JobConfigs).
        bytes_per_device: an upper bound of the device memory its compiled step will hold on
            each of its islands (model/estimates.py), used until one is measured.
        flops_per_token: training FLOPs per token (PaLM's 6N + attention), for MFU.
        digest_every: steps between parameter digest comparisons.
        kv_bytes_per_device: a serve job's slot KV cache on each device (0 for other
            kinds); part of bytes_per_device, and held beside the compiled step's figure
            measured at load.
        dataset: the prepared dataset, once data preparation has ended.
        init: the init_from checkpoint, once resolved (when the job starts).
    """

    spec: Any
    configs: spec_lib.JobConfigs
    bytes_per_device: int
    flops_per_token: float
    digest_every: int
    kv_bytes_per_device: int = 0
    dataset: DatasetRef | None = None
    init: InitRef | None = None

    @classmethod
    def resolve(
        cls, spec: Any, *, vocab_size: int | None = None, validated: bool = False
    ) -> ResolvedJob:
        """Resolve a spec (blocking only on config arithmetic, never on data); `validated`:
        the caller has just validated this very spec (not validated again).

        Raises:
            SpecError: the spec does not validate.
        """
        from pathways_lite.model import estimates

        configs = spec_lib.to_configs(spec, vocab_size=vocab_size, validated=validated)
        train = configs.train
        try:
            bytes_per_device = _training_bytes_per_device(
                configs.model,
                (spec.mesh.data, spec.mesh.model),
                configs.optim,
                train.global_batch // max(1, spec.islands * spec.mesh.data),
                train.seq_len,
            )
            flops_per_token = estimates.flops_per_token(configs.model, train.seq_len)
            pipe = spec_lib.pipeline_settings(spec)
            if pipe is not None:  # admitted by its largest stage (controller/pipeline.py)
                from .pipeline import stage_bytes_per_device

                bytes_per_device = stage_bytes_per_device(
                    pipe, spec, configs, _training_bytes_per_device
                )
        except ValueError as e:
            raise spec_lib.SpecError("model", spec.model.preset, str(e)) from None
        kv = 0
        if spec_lib.job_kind(spec) == "serve":  # its slot KV cache, beside the parameters
            from pathways_lite.model.decode import SlotDecoder

            serve = spec_lib.serve_settings(spec, configs.model.max_seq_len)
            # The slot cache carries no sharding: counted whole on every device (an upper
            # bound, as the rest of the estimate).
            kv = SlotDecoder.kv_bytes(configs.model, serve.max_batch, serve.max_seq_len)
            bytes_per_device += kv
        digest_every = spec_lib.digest_every(spec)
        if digest_every is None:
            digest_every = default_digest_every(configs.model)
        return cls(
            spec, configs, int(bytes_per_device), float(flops_per_token), digest_every, int(kv)
        )

    def with_dataset(self, job_id: str = "") -> ResolvedJob:
        """This job with its dataset prepared (or opened from the cache) where every host can
        read it; the model embeds exactly the tokenizer's vocabulary unless the spec overrides
        it. Blocking: it may tokenize a corpus; run it off the event loop."""
        from pathways_lite.model.data import prepare_dataset
        from pathways_lite.model.tokenizer import Tokenizer

        tokenizer = None if self.init is None else Tokenizer.load(self.init.tokenizer_path)
        key = (self.configs.data, self.configs.train.seq_len, tokenizer and tokenizer.hash)
        with _PREPARING_LOCK:
            lock = _PREPARING.setdefault(key, threading.Lock())
        # Jobs of the same data wait for one preparation and open its cache (a chain's
        # fine-tuning jobs often start together).
        with lock:
            dataset = prepare_dataset(
                self.configs.data, seq_len=self.configs.train.seq_len, tokenizer=tokenizer
            )
        logger.info(
            "job %s reads dataset %s (%d examples)",
            job_id,
            dataset.hash[:12],
            dataset.num_examples,
            extra={"job_id": job_id} if job_id else None,
        )
        resolved = self
        if dataset.tokenizer.vocab_size != self.configs.model.vocab_size:
            # The model embeds the trained vocabulary: resolve its figures again.
            resolved = dataclasses.replace(
                self.resolve(self.spec, vocab_size=dataset.tokenizer.vocab_size), init=self.init
            )
        ref = DatasetRef(
            str(dataset.path),
            dataset.hash,
            dataset.tokenizer.hash,
            dataset.num_examples,
            tuple(getattr(dataset, "source_names", ())),
            tuple(float(w) for w in getattr(dataset, "base_weights", ())),
        )
        return dataclasses.replace(resolved, dataset=ref)

    @functools.cached_property  # asked at every scheduling pass of a queued job
    def memory_key(self) -> tuple | None:
        """What its compiled step's memory depends on: model, optimizer, mesh, and the
        batch one island runs (examples x tokens); None without configs."""
        if self.configs is None:
            return None
        spec, train = self.spec, self.configs.train
        return (
            # A serve job's figure holds its KV cache too: never a training job's figure.
            spec_lib.job_kind(spec),
            self.configs.model,
            self.configs.optim,
            spec.mesh.data,
            spec.mesh.model,
            train.global_batch // max(1, spec.islands),
            train.seq_len,
            spec_lib.pipeline_settings(spec),
        )

    @property
    def steps(self) -> int:
        return self.configs.train.steps

    @property
    def tokens_per_step(self) -> int:
        return self.configs.train.global_batch * self.configs.train.seq_len

    @property
    def devices(self) -> int:
        return self.spec.islands * self.spec.devices_per_island


class MemoryFigures:
    """Bytes per device jobs really hold, measured from their compiled steps at load, by
    `ResolvedJob.memory_key`: a job whose (model, mesh, batch) has loaded before is admitted
    by the measured figure, any other by the estimator's upper bound."""

    def __init__(self) -> None:
        self._measured: dict[tuple, int] = {}
        # Bumped at every change, so a cache of demands knows when to read again.
        self.version = 0

    def bytes_per_device(self, job: ResolvedJob) -> int:
        """The measured figure of the job's kind (plus a serve job's own KV cache, which
        its serve settings size), else its estimate (an upper bound)."""
        measured = self._measured.get(job.memory_key)
        if measured is None:
            return job.bytes_per_device
        return measured + job.kv_bytes_per_device

    def measured(self, job: ResolvedJob) -> int | None:
        """The measured figure of the job's kind (its compiled step), if one has loaded."""
        return self._measured.get(job.memory_key)

    def record(self, job: ResolvedJob, bytes_per_device: int) -> None:
        """Keep what a loaded job of this kind holds at its compiled step's peak (the
        largest over its hosts; a serve job's KV cache apart)."""
        if bytes_per_device > job.bytes_per_device - job.kv_bytes_per_device:
            logger.warning(
                "the compiled step holds %d bytes per device, above the estimate of %d: "
                "the estimator is not an upper bound for this model and mesh",
                bytes_per_device,
                job.bytes_per_device - job.kv_bytes_per_device,
            )
        key = job.memory_key
        if key is not None and self._measured.get(key) != int(bytes_per_device):
            self._measured[key] = int(bytes_per_device)
            self.version += 1  # only when a figure changed: demands cached stay good


@functools.lru_cache(maxsize=1024)
def _training_bytes_per_device(
    model: Any, mesh: tuple[int, int], optim: Any, examples_per_device: int, seq_len: int
) -> int:
    """The estimator's figure, once per (model, mesh, optimizer, batch, length): it traces
    the optimizer's state shapes (~0.1 s), too slow to repeat at every submit of a queue of
    alike jobs on the controller's loop."""
    from pathways_lite.model import estimates

    return estimates.training_bytes_per_device(
        model,
        {"data": mesh[0], "model": mesh[1]},
        optim,
        examples_per_device=examples_per_device,
        seq_len=seq_len,
    )


def default_digest_every(model_cfg: Any) -> int:
    """Every step for small models; every DIGEST_EVERY_LARGE steps for large ones."""
    from pathways_lite.model.estimates import param_count

    return 1 if param_count(model_cfg) <= DIGEST_EVERY_STEP_MAX_PARAMS else DIGEST_EVERY_LARGE


def config_struct(values: dict[str, Any]) -> struct_pb2.Struct:
    """A config dataclass's field dict as a protobuf Struct (what the hosts rebuild from)."""
    struct = struct_pb2.Struct()
    struct.update(values)
    return struct


def config_protos(
    preset: str, model_cfg: Any, optim_cfg: Any
) -> tuple[common_pb2.ModelConfig, common_pb2.OptimizerConfig]:
    """The model and optimizer as hosts load them: the preset's name and every resolved field
    of the PalmConfig and OptimConfig (hosts never resolve a preset themselves)."""
    return (
        common_pb2.ModelConfig(preset=preset, config=config_struct(model_cfg.to_dict())),
        common_pb2.OptimizerConfig(config=config_struct(dataclasses.asdict(optim_cfg))),
    )


def load_request(job: ResolvedJob, at: HostLoad) -> worker_pb2.LoadJobRequest:
    """The LoadJobRequest of a PaLM job on one host: its placement, its resolved model and
    optimizer, and the dataset the hosts verify by hash and read their slices of.

    Raises:
        ValueError: the job's dataset is not prepared yet (`with_dataset`).
    """
    if job.dataset is None:
        raise ValueError(f"job {at.job_id!r} is loaded before its dataset was prepared.")
    spec, configs = job.spec, job.configs
    model, optimizer = config_protos(spec.model.preset, configs.model, configs.optim)
    request = placement_request(at)
    request.model.CopyFrom(model)
    request.optimizer.CopyFrom(optimizer)
    request.mesh.CopyFrom(common_pb2.MeshShape(data=spec.mesh.data, model=spec.mesh.model))
    request.data.CopyFrom(
        common_pb2.DataSpec(
            source="dataset", paths=[job.dataset.path], tokenizer_hash=job.dataset.tokenizer_hash
        )
    )
    request.data_hash = job.dataset.hash
    request.seed = configs.train.seed
    request.global_batch = configs.train.global_batch
    request.seq_len = configs.train.seq_len
    request.digest_every = job.digest_every
    if job.init is not None:
        request.init_from = job.init.path
        if job.init.stages:  # a pipeline job's checkpoint: read whole from its stage parts
            from .pipeline import flat_bounds

            request.init_stage_bounds.extend(flat_bounds(configs.model, job.init.stages))
    pipe = spec_lib.pipeline_settings(spec)
    if pipe is None and at.num_islands > 1 and spec_lib.job_kind(spec) == "train":
        # Data parallel across islands: gradient buckets leave during the backward pass where
        # the dispatcher's setting says so (controller/dispatch.overlap_for;
        # workers/exchange_overlap.py; the host keeps the exchange after the backward pass
        # for a mixture or an island of several processes).
        request.exchange_overlap = at.exchange_overlap
    if pipe is not None:
        from .pipeline import place_stage, stage_layout

        place_stage(request, at, pipe, stage_layout(pipe, at.num_islands, configs.model))
    return request


def step_program(job_id: str, generation: int, job: ResolvedJob) -> StepProgram:
    """The step program of a resolved PaLM job (its dataset prepared)."""
    from .mixture_weights import MixtureSchedule

    mixture = None
    if job.dataset is not None and job.dataset.source_names:
        data = job.configs.data
        mixture = MixtureSchedule(
            job.dataset.source_names,
            job.dataset.source_weights,
            dynamic=data.mixture_weights == "dynamic",
            every=data.mixture_every,
        )
    return StepProgram(
        mixture=mixture,
        job_id=job_id,
        generation=generation,
        # An eval job takes no step: it loads, evaluates and ends.
        steps=job.steps if spec_lib.job_kind(job.spec) == "train" else 0,
        tokens_per_step=job.tokens_per_step,
        load=functools.partial(load_request, job),
        checkpoint_every=max(0, job.spec.train.checkpoint_every),
        checkpoint_every_s=spec_lib.checkpoint_every_s(job.spec),
        eval_every=max(0, job.spec.train.eval_every),
        checkpoint_islands=checkpoint_islands(job.spec),
    )


def checkpoint_islands(spec: Any) -> tuple[int, ...]:
    """Positions of the job's islands that write its checkpoints: island 0, or a pipeline's
    replica 0 of every stage (islands are stage-major: island k is stage k // replicas)."""
    pipe = spec_lib.pipeline_settings(spec)
    if pipe is None:
        return (0,)
    replicas = spec.islands // pipe.stages
    return tuple(range(0, spec.islands, replicas))


def palm_program(record: Any) -> StepProgram:
    """A job record's step program, its spec resolved and its dataset prepared (blocking).

    Raises:
        SpecError: the spec does not validate.
    """
    job = ResolvedJob.resolve(record.spec).with_dataset(record.id)
    return step_program(record.id, record.generation, job)
