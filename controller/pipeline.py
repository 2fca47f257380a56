"""A pipeline job's islands: which stage and replica each island is, and its load fields.

The job's islands are laid out stage-major: island k holds stage k // R of replica k % R
(R = islands / stages). Each island loads as a data-parallel job among its stage's replicas
(island_index r, num_islands R, peers = host i of those R islands) plus its StagePlacement:
the stage, the split of the blocks, and host i of replica r's island of every stage (its
neighbours for activations and gradients, workers/stage_link.py). The dispatcher needs no
other change: every island runs one step of every slice, and the hosts run the schedule.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

from pathways_lite.v1 import worker_pb2

from .program import HostLoad
from .spec_configs import PipelineSettings

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class StageLayout:
    """Where each island of a pipeline job sits and which blocks each stage holds."""

    stages: int
    replicas: int
    bounds: tuple[tuple[int, int], ...]

    def stage_of(self, island: int) -> tuple[int, int]:
        """(stage, replica) of the job's island `island`."""
        return divmod(island, self.replicas)

    def describe(self) -> str:
        """One line per stage: its blocks and islands (what `status` and the logs show)."""
        rows = []
        for s, (lo, hi) in enumerate(self.bounds):
            islands = [s * self.replicas + r for r in range(self.replicas)]
            extra = " + embedding" if s == 0 else ""
            extra += " + final norm, shared-embedding head" if s == self.stages - 1 else ""
            rows.append(f"stage {s}: blocks {lo}..{hi - 1}{extra}; islands {islands}")
        return "\n".join(rows)


def stage_layout(pipe: PipelineSettings, islands: int, model_cfg: Any) -> StageLayout:
    """The layout of a validated pipeline job on `islands` islands."""
    from pathways_lite.model.pipeline import stage_split

    return StageLayout(pipe.stages, islands // pipe.stages, stage_split(model_cfg, pipe.stages))


def stage_lines(spec: Any, island_names: list[str], model_cfg: Any = None) -> list[str]:
    """The stage layout of a pipeline job's spec (islands by name once placed).

    Args:
        model_cfg: the job's resolved model (ResolvedJob.configs.model), whose split the
            hosts load; None resolves the spec as admission does (`to_configs`: the data's
            vocabulary, which weighs the embedding in `stage_split`), never the preset alone.
    """
    from . import spec as spec_lib

    try:
        pipe = spec_lib.pipeline_settings(spec)
        if model_cfg is None:
            model_cfg = spec_lib.to_configs(spec).model
        layout = stage_layout(pipe, spec.islands, model_cfg)
    except (spec_lib.SpecError, ValueError) as e:
        return [f"no layout: {e}"]
    lines = layout.describe().splitlines()
    if len(island_names) == spec.islands:
        for s in range(layout.stages):
            names = island_names[s * layout.replicas : (s + 1) * layout.replicas]
            lines[s] = lines[s].rsplit("; islands", 1)[0] + "; islands " + ", ".join(names)
    return lines


def place_stage(
    request: worker_pb2.LoadJobRequest, at: HostLoad, pipe: PipelineSettings, layout: StageLayout
) -> None:
    """Turn a data-parallel LoadJobRequest over all the job's islands (`at`) into the load of
    one stage's island: replica placement, and the StagePlacement."""
    stage, replica = layout.stage_of(at.island_index)
    if at.island_index == 0:
        logger.info(  # in the job's own logs too (`pathways-lite logs JOB`)
            "job %s pipeline layout:\n%s",
            at.job_id,
            layout.describe(),
            extra={"job_id": at.job_id},
        )
    r = layout.replicas
    peers = list(at.peers)
    request.island_index = replica
    request.num_islands = r
    del request.peers[:]
    if r > 1:
        request.peers.extend(peers[stage * r : (stage + 1) * r])
    # Each stage writes and restores its own checkpoints (replica 0 of every stage writes).
    if request.checkpoint_dir:
        root = request.checkpoint_dir.rstrip("/")
        request.checkpoint_dir = f"{root}/stage{stage}"
        if request.restore_from.startswith(root + "/"):
            rest = request.restore_from[len(root) + 1 :]
            request.restore_from = f"{root}/stage{stage}/{rest}"
    request.pipeline.CopyFrom(
        worker_pb2.StagePlacement(
            stages=pipe.stages,
            microbatches=pipe.microbatches,
            schedule=pipe.schedule,
            recompute=pipe.recompute,
            stage=stage,
            stage_peers=[peers[t * r + replica] for t in range(pipe.stages)] if peers else [],
            block_bounds=[b for pair in layout.bounds for b in pair],
        )
    )


def stage_bytes_per_device(
    pipe: PipelineSettings, spec: Any, configs: Any, training_bytes: Any
) -> int:
    """What the largest stage of a pipeline job holds per device (admission's figure).

    Each stage is estimated as a model of its own blocks (with the embedding: an upper bound
    for the middle stages) training on one microbatch, plus the gradient sum it keeps across
    the microbatches and what its schedule stashes for backward (the forwards' residuals, or
    with `recompute` their inputs only): M microbatches under GPipe, at most S - s under
    1F1B.

    Args:
        training_bytes: the estimator, (model, (data, model) mesh, optim, examples per
            device, seq_len) -> bytes (resolved.py's cached one).
    """
    from pathways_lite.model.estimates import memory_per_device, stash_bytes_per_microbatch
    from pathways_lite.model.pipeline import peak_stash

    model, optim, train = configs.model, configs.optim, configs.train
    layout = stage_layout(pipe, spec.islands, model)
    mesh = (spec.mesh.data, spec.mesh.model)
    examples = train.global_batch // (layout.replicas * pipe.microbatches * spec.mesh.data)
    worst = 0
    for s, (lo, hi) in enumerate(layout.bounds):
        stage_cfg = dataclasses.replace(model, n_layers=hi - lo)
        base = training_bytes(stage_cfg, mesh, optim, examples, train.seq_len)
        grad_sum = memory_per_device(stage_cfg, {"data": mesh[0], "model": mesh[1]}, optim)[
            "params_bytes"
        ]
        stash = peak_stash(pipe.schedule, s, pipe.stages, pipe.microbatches)
        per_microbatch = stash_bytes_per_microbatch(
            model,
            {"data": mesh[0], "model": mesh[1]},
            examples_per_device=examples,
            seq_len=train.seq_len,
            layers=hi - lo,
            recompute=pipe.recompute,
        )
        # One microbatch's residuals are its forward's own activations, already in `base`.
        stash_bytes = (stash if pipe.recompute else max(stash - 1, 0)) * per_microbatch
        worst = max(worst, int(base + grad_sum + stash_bytes))
    return worst


def flat_bounds(model_cfg: Any, stages: int) -> list[int]:
    """The block ranges of a pipeline of `stages` stages of the model, flat (lo, hi, ...): what
    LoadJobRequest.restore_stage_bounds / init_stage_bounds carry to read its checkpoints."""
    from pathways_lite.model.pipeline import stage_split

    return [b for pair in stage_split(model_cfg, stages) for b in pair]


def whole_model_job(job: Any) -> Any:
    """A pipeline job as one non-pipelined job on one island (its ResolvedJob, the dataset
    kept): what samples its checkpoints, read whole from the stage parts."""
    from .resolved import ResolvedJob

    spec = type(job.spec)()
    spec.CopyFrom(job.spec)
    spec.ClearField("pipeline")
    spec.islands = 1
    whole = ResolvedJob.resolve(spec, vocab_size=job.configs.model.vocab_size)
    return dataclasses.replace(whole, dataset=job.dataset, init=job.init)


def reading_stage_parts(load: Any, bounds: list[int]) -> Any:
    """A StepProgram's `load` whose hosts read `restore_from` from a pipeline job's stage
    parts (`bounds`: flat_bounds)."""

    def request(at: HostLoad) -> worker_pb2.LoadJobRequest:
        req = load(at)
        req.restore_stage_bounds.extend(bounds)
        return req

    return request
