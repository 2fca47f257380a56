"""Decoding the worker service's requests: job ids and LoadJob into an `IslandJobSpec`.

Every field is checked at the boundary; a bad one is refused with INVALID_ARGUMENT and a
sentence that names the field and quotes the value.
"""

from __future__ import annotations

import grpc
from google.protobuf import json_format

from pathways_lite.v1 import worker_pb2

from .exchange import DEFAULT_BUCKET_BYTES, DEFAULT_TIMEOUT_S
from .rpc import RpcRejection
from .runtime import JOB_ID_RE, IslandJobSpec, JobSpecError, MeshSpec


def _bad(message: str) -> RpcRejection:
    return RpcRejection(grpc.StatusCode.INVALID_ARGUMENT, message)


def check_job_id(job_id: str) -> None:
    """Refuse a job id that is not 1-128 characters of [A-Za-z0-9._-] (INVALID_ARGUMENT)."""
    if not JOB_ID_RE.match(job_id):
        raise _bad(f"job_id={job_id[:80]!r} must be 1-128 characters of [A-Za-z0-9._-].")


def decode_load(request: worker_pb2.LoadJobRequest, island_device_count: int) -> IslandJobSpec:
    """Decode and check a LoadJobRequest's fields for an island of `island_device_count`.

    Raises:
        RpcRejection: INVALID_ARGUMENT naming the field and its value.
    """
    check_job_id(request.job_id)
    if not request.model.preset:
        raise _bad("model.preset is empty; name a model preset.")
    mesh = MeshSpec(request.mesh.data, request.mesh.model)
    if mesh.data < 1 or mesh.model < 1:
        raise _bad(f"mesh data={mesh.data}, model={mesh.model} must both be positive.")
    if mesh.size != island_device_count:
        raise _bad(
            f"mesh data={mesh.data} x model={mesh.model} = {mesh.size} devices does not "
            f"match this island's {island_device_count} devices."
        )
    if request.num_islands < 1:
        raise _bad(f"num_islands={request.num_islands} must be at least 1.")
    if request.island_index >= request.num_islands:
        raise _bad(
            f"island_index={request.island_index} is out of range for "
            f"num_islands={request.num_islands}."
        )
    if request.global_batch < 1 or request.global_batch % request.num_islands:
        raise _bad(
            f"global_batch={request.global_batch} must be positive and divisible by "
            f"num_islands={request.num_islands}."
        )
    if request.seq_len < 1:
        raise _bad(f"seq_len={request.seq_len} must be positive.")
    if not request.data_hash:
        raise _bad("data_hash is empty; the host verifies the dataset against it.")
    peers = tuple(request.peers)
    if peers and len(peers) != request.num_islands:
        raise _bad(
            f"peers has {len(peers)} addresses but num_islands={request.num_islands}: give "
            "one per island (this host's own included) or none."
        )
    if not request.exchange_timeout_s >= 0:
        raise _bad(f"exchange_timeout_s={request.exchange_timeout_s!r} must be >= 0.")
    if request.exchange_bucket_bytes % 4:
        raise _bad(
            f"exchange_bucket_bytes={request.exchange_bucket_bytes} must be a whole number of "
            "float32 values (a multiple of 4)."
        )
    try:
        overrides = json_format.MessageToDict(request.model.overrides)
        model_config = json_format.MessageToDict(request.model.config)
        optim_config = json_format.MessageToDict(request.optimizer.config)
        data = json_format.MessageToDict(request.data, preserving_proto_field_name=True)
    except Exception as e:
        raise _bad(f"model, optimizer or data fields do not decode: {e}.") from e
    from .pipeline import decode_placement, decode_stage_bounds

    try:
        pipeline = decode_placement(request)
        restore_stages = decode_stage_bounds("restore_stage_bounds", request.restore_stage_bounds)
        init_stages = decode_stage_bounds("init_stage_bounds", request.init_stage_bounds)
    except JobSpecError as e:
        raise _bad(str(e)) from None
    return IslandJobSpec(
        pipeline=pipeline,
        restore_stage_bounds=restore_stages,
        init_stage_bounds=init_stages,
        job_id=request.job_id,
        generation=request.generation,
        preset=request.model.preset,
        overrides=overrides,
        mesh=mesh,
        model_config=model_config,
        optim_config=optim_config,
        data=data,
        data_hash=request.data_hash,
        seed=request.seed,
        global_batch=request.global_batch,
        seq_len=request.seq_len,
        island_index=request.island_index,
        num_islands=request.num_islands,
        peers=peers,
        digest_every=request.digest_every,
        exchange_timeout_s=request.exchange_timeout_s or DEFAULT_TIMEOUT_S,
        exchange_bucket_bytes=request.exchange_bucket_bytes or DEFAULT_BUCKET_BYTES,
        exchange_overlap=request.exchange_overlap,
    )
