"""Peer restore: a restarted island loads a data-parallel job's state from a surviving replica.

In a data-parallel job host i of every island holds bitwise the same shards of the parameters
and optimizer state after every step (workers/exchange.py). When an island dies, its
replacement's host i asks the surviving island's hosts for the state (ExchangeService's
FetchState) instead of reading the last checkpoint: nothing is rolled back.

The protocol, state larger than one gRPC message included:

1. The receiver lists, per leaf of the flattened (params, opt_state), the boxes its devices
   need (`[start, stop)` per dimension of the global array, one per distinct shard) from its
   own shardings: the new island's mesh has the job's shape, but may have another host count.
2. It sends the boxes to a survivor host; the survivor answers, for every box, the parts it
   holds (the intersection of the box with each of its distinct shards) in C order, cut into
   chunks of `chunk_bytes` (default 4 MiB, far below the 64 MiB message limit). Boxes a
   survivor host does not hold are asked of the survivor's other hosts in turn; a box is
   done when every element arrived (a coverage mask), so a reshard onto a different host
   count works and replicated shards are not double counted.
3. The receiver builds each leaf on its mesh with its own sharding
   (`jax.make_array_from_callback`): the bytes are the survivor's, so the digest equals.

What a survivor serves is the state after `steps_applied` steps: its current one, or the one
before its last step (`keep_pre_step`, kept once per step while the job spans islands), so a
step that one island applied and another did not (a peer died mid-exchange) is rolled back to
its start on every survivor (`rollback`) and run again by all: never half applied. The price
is one more copy of the state per device while the job spans islands.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np

from pathways_lite.v1 import worker_pb2

from .runtime import RuntimeUnavailableError

logger = logging.getLogger(__name__)

DEFAULT_CHUNK_BYTES = 4 << 20
FETCH_TIMEOUT_S = 120.0

Box = tuple[tuple[int, int], ...]


class PeerRestoreError(RuntimeError):
    """The state could not be loaded from the survivors (a survivor died, a box is missing)."""


def _box(index: tuple, shape: tuple[int, ...]) -> Box:
    return tuple(
        (s.start or 0, s.stop if s.stop is not None else dim)
        for s, dim in zip(index, shape, strict=True)
    )


def leaf_boxes(leaf: Any, devices: Any = None) -> dict[Box, Any]:
    """This host's distinct shards of a state leaf: box -> values (a scalar or numpy leaf is
    one box of everything). `devices`: only the shards on these (a host of a simulated
    multi-host island in one process); None: every addressable shard."""
    import jax

    if not isinstance(leaf, jax.Array):
        value = np.asarray(leaf)
        return {tuple((0, d) for d in value.shape): value}
    held: dict[Box, Any] = {}
    for shard in leaf.addressable_shards:
        if devices is None or shard.device in devices:
            held.setdefault(_box(shard.index, leaf.shape), shard.data)
    return held


def wanted_boxes(shape: tuple[int, ...], sharding: Any) -> list[Box]:
    """The distinct boxes of a leaf this process's devices hold under `sharding`."""
    if sharding is None:
        return [tuple((0, d) for d in shape)]
    indices = sharding.addressable_devices_indices_map(tuple(shape))
    return sorted({_box(index, tuple(shape)) for index in indices.values()})


def _intersect(a: Box, b: Box) -> Box | None:
    out = tuple((max(a0, b0), min(a1, b1)) for (a0, a1), (b0, b1) in zip(a, b, strict=True))
    return None if any(lo >= hi for lo, hi in out) else out


def _proto_box(leaf: int, box: Box) -> worker_pb2.StateBox:
    return worker_pb2.StateBox(leaf=leaf, start=[b[0] for b in box], stop=[b[1] for b in box])


def _local(box: Box, within: Box) -> tuple[slice, ...]:
    return tuple(slice(b0 - w0, b1 - w0) for (b0, b1), (w0, _) in zip(box, within, strict=True))


# ---- the survivor's side ---------------------------------------------------------------


def state_pieces(
    leaves: Sequence[Any], request: worker_pb2.FetchStateRequest, devices: Any = None
) -> list[tuple[int, Box, np.ndarray]]:
    """The parts of the wanted boxes this host holds (on `devices`, default all of its own),
    as host arrays: (leaf, box, values). Runs on the runtime thread (it reads device
    buffers).

    Raises:
        ValueError: a box names a leaf or a dimension the state does not have.
    """
    import jax

    held = [leaf_boxes(leaf, devices) for leaf in leaves]
    pieces = []
    for want in request.boxes:
        if want.leaf >= len(leaves):
            raise ValueError(f"boxes.leaf={want.leaf} is out of range for {len(leaves)} leaves.")
        box = tuple(zip(want.start, want.stop, strict=True))
        for shard_box, data in held[want.leaf].items():
            if len(box) != len(shard_box):
                raise ValueError(
                    f"box {box!r} of leaf {want.leaf} does not have its {len(shard_box)} dims."
                )
            part = _intersect(box, shard_box)
            if part is None:
                continue
            values = np.asarray(jax.device_get(data))[_local(part, shard_box)]
            pieces.append((want.leaf, part, np.ascontiguousarray(values)))
    return pieces


def state_chunks(
    pieces: Sequence[tuple[int, Box, np.ndarray]], num_leaves: int, chunk_bytes: int = 0
) -> Iterator[worker_pb2.StateChunk]:
    """The stream of FetchState: every piece cut into chunks of at most `chunk_bytes`."""
    chunk_bytes = chunk_bytes or DEFAULT_CHUNK_BYTES
    for leaf, box, values in pieces:
        data = memoryview(values.reshape(-1).view(np.uint8))
        size = len(data)
        head = {
            "box": _proto_box(leaf, box),
            "dtype": values.dtype.str,
            "piece_bytes": size,
            "num_leaves": num_leaves,
        }
        for offset in range(0, max(size, 1), chunk_bytes):
            yield worker_pb2.StateChunk(
                **head, offset=offset, data=bytes(data[offset : offset + chunk_bytes])
            )


# ---- the restarted host's side ---------------------------------------------------------


@dataclasses.dataclass
class _Target:
    """One wanted box of one leaf: its values and which elements arrived (`whole`: the box
    came as one piece; else a mask of the elements the pieces covered)."""

    box: Box
    values: np.ndarray
    whole: bool = False
    have: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.whole or (self.have is not None and bool(self.have.all()))

    def put(self, box: Box, values: np.ndarray) -> None:
        """Copy a piece's values into the box (the part of it inside)."""
        part = _intersect(box, self.box)
        if part is None:
            return
        at = _local(part, self.box)
        self.values[at] = values[_local(part, box)]
        if self.have is None:
            self.have = np.zeros(self.values.shape, bool)
        self.have[at] = True


@dataclasses.dataclass(frozen=True)
class Fetched:
    """The state fetched from the survivors: per leaf, box -> values; and the traffic."""

    boxes: list[dict[Box, np.ndarray]]
    bytes: int
    seconds: float


async def fetch_state(
    stubs: Sequence[Any],
    job_id: str,
    steps_applied: int,
    like: Sequence[tuple[tuple[int, ...], np.dtype, Any]],
    *,
    metadata: tuple[tuple[str, str], ...] = (),
    chunk_bytes: int = 0,
    timeout_s: float = FETCH_TIMEOUT_S,
) -> Fetched:
    """Fetch a job's state from the hosts of a surviving island (ExchangeService stubs, in
    host order; the first holds host i's shards when the host counts match).

    Args:
        like: per leaf (global shape, dtype, this host's sharding; None: a host value).

    Raises:
        PeerRestoreError: a survivor failed (gRPC error) or the survivors together do not
            hold every box.
    """
    import grpc

    started = time.perf_counter()
    targets: list[list[_Target]] = []
    for shape, dtype, sharding in like:
        row = []
        for box in wanted_boxes(shape, sharding):
            dims = tuple(hi - lo for lo, hi in box)
            row.append(_Target(box, np.empty(dims, dtype)))
        targets.append(row)
    by_box = [{t.box: t for t in row} for row in targets]
    received = 0
    for stub in stubs:
        missing = [(i, t) for i, row in enumerate(targets) for t in row if not t.done]
        if not missing:
            break
        request = worker_pb2.FetchStateRequest(
            job_id=job_id,
            steps_applied=steps_applied,
            boxes=[_proto_box(i, t.box) for i, t in missing],
            chunk_bytes=chunk_bytes,
        )
        try:
            stream: AsyncIterator[worker_pb2.StateChunk] = stub.FetchState(
                request, timeout=timeout_s, metadata=metadata
            )
            # The piece being received: written straight into its target when it is one
            # whole wanted box (host counts equal), else gathered and then spread.
            piece: np.ndarray | None = None
            exact: _Target | None = None
            async for chunk in stream:
                if chunk.num_leaves != len(like):
                    raise PeerRestoreError(
                        f"the survivor's state has {chunk.num_leaves} leaves, this host's "
                        f"{len(like)}: not the same job."
                    )
                box = tuple(zip(chunk.box.start, chunk.box.stop, strict=True))
                if chunk.offset == 0:
                    exact = by_box[chunk.box.leaf].get(box)
                    if exact is not None and exact.values.nbytes == chunk.piece_bytes:
                        piece = exact.values.reshape(-1).view(np.uint8)
                    else:
                        exact, piece = None, np.empty(chunk.piece_bytes, np.uint8)
                assert piece is not None
                size = len(chunk.data)
                piece[chunk.offset : chunk.offset + size] = np.frombuffer(chunk.data, np.uint8)
                received += size
                if chunk.offset + size < chunk.piece_bytes:
                    continue
                if exact is not None:
                    exact.whole = True
                else:
                    dims = tuple(hi - lo for lo, hi in box)
                    values = piece.view(np.dtype(chunk.dtype)).reshape(dims)
                    for target in by_box[chunk.box.leaf].values():
                        if not target.whole:
                            target.put(box, values)
                piece, exact = None, None
        except grpc.aio.AioRpcError as e:
            raise PeerRestoreError(
                f"FetchState of job {job_id!r} from a survivor failed: {e.code().name} "
                f"{e.details()}"
            ) from e
    absent = sum(1 for row in targets for t in row if not t.done)
    if absent:
        raise PeerRestoreError(
            f"the survivors of job {job_id!r} do not hold {absent} of the boxes this host needs."
        )
    return Fetched(
        [{t.box: t.values for t in row} for row in targets],
        received,
        time.perf_counter() - started,
    )


def assemble(fetched: Fetched, like: Sequence[tuple[tuple[int, ...], np.dtype, Any]]) -> list:
    """The fetched leaves on this host's devices with their shardings (runtime thread)."""
    import jax

    leaves = []
    for boxes, (shape, _, sharding) in zip(fetched.boxes, like, strict=True):
        if sharding is None:
            leaves.append(next(iter(boxes.values())))
            continue
        leaves.append(
            jax.make_array_from_callback(
                tuple(shape), sharding, lambda index, b=boxes, s=shape: b[_box(index, tuple(s))]
            )
        )
    return leaves


# ---- a runtime's state: what is served, kept, rolled back and installed -----------------


def _tree(state: Any) -> tuple[list[Any], Any]:
    import jax

    return jax.tree_util.tree_flatten((state.params, state.opt_state))


def abstract_like(runtime: Any) -> tuple[list[tuple[tuple[int, ...], np.dtype, Any]], Any]:
    """(shape, dtype, sharding) of every state leaf of a compiled, not yet loaded PaLM
    runtime, and the state's treedef: what a restarted host fetches without first building
    the seed's state."""
    import jax

    fns = runtime._compiled[0]
    abstract = jax.eval_shape(lambda: fns._init_impl(0))
    leaves, treedef = jax.tree_util.tree_flatten(abstract)
    shardings = jax.tree_util.tree_leaves((fns.param_shardings, fns.opt_shardings))
    if len(shardings) != len(leaves):
        raise PeerRestoreError(
            f"the state has {len(leaves)} leaves but {len(shardings)} shardings."
        )
    like = [
        (tuple(a.shape), np.dtype(a.dtype), sharding)
        for a, sharding in zip(leaves, shardings, strict=True)
    ]
    return like, treedef


def train_state(leaves: list[Any], treedef: Any, steps_applied: int) -> Any:
    """The TrainState of fetched leaves (abstract_like's treedef)."""
    from pathways_lite.model.train import TrainState

    params, opt_state = treedef.unflatten(leaves)
    return TrainState(params=params, opt_state=opt_state, step=steps_applied)


def keep_pre_step(state: Any) -> Any:
    """A copy of a TrainState on its devices, kept before the step's (donating) update: one
    compiled program copies every leaf (one dispatch per step, not one per leaf)."""
    params, opt_state = _copy_tree()((state.params, state.opt_state))
    return dataclasses.replace(state, params=params, opt_state=opt_state)


def compile_pre_step(runtime: Any) -> None:
    """Compile `keep_pre_step`'s program for a compiled, not loaded PaLM runtime's state
    (from its shapes: nothing is allocated), as a warm spare does ahead of its first step."""
    import jax

    like, treedef = abstract_like(runtime)
    abstract = [jax.ShapeDtypeStruct(shape, dtype, sharding=s) for shape, dtype, s in like]
    _copy_tree().lower(treedef.unflatten(abstract)).compile()


@functools.cache
def _copy_tree() -> Any:
    import jax
    import jax.numpy as jnp

    return jax.jit(lambda tree: jax.tree.map(jnp.copy, tree))


def served_leaves(runtime: Any, steps_applied: int) -> list[Any]:
    """The state leaves after `steps_applied` steps: the current state or the kept one.

    Raises:
        RuntimeUnavailableError: the host holds neither.
    """
    state = runtime._loaded().state
    pre = getattr(runtime, "pre_step", None)
    if int(state.step) == steps_applied:
        return _tree(state)[0]
    if pre is not None and int(pre.step) == steps_applied:
        return _tree(pre)[0]
    raise RuntimeUnavailableError(
        f"job {runtime.spec.job_id!r} holds the state after {int(state.step)} steps"
        + (f" (and {int(pre.step)})" if pre is not None else "")
        + f", not after steps_applied={steps_applied}."
    )


def rollback(runtime: Any, steps_applied: int) -> bool:
    """Make the state after `steps_applied` steps the current one (runtime thread); returns
    whether it rolled back the last step.

    Raises:
        RuntimeUnavailableError: the host holds no state after that many steps.
    """
    resident = runtime._loaded()
    if int(resident.state.step) == steps_applied:
        return False
    leaves = served_leaves(runtime, steps_applied)
    old = _tree(resident.state)[0]
    _, treedef = _tree(resident.state)
    params, opt_state = treedef.unflatten(leaves)
    resident.state = dataclasses.replace(
        runtime.pre_step, params=params, opt_state=opt_state, step=steps_applied
    )
    runtime.pre_step = None
    for leaf in old:
        if hasattr(leaf, "delete") and not leaf.is_deleted():
            leaf.delete()
    logger.warning(
        "job %s: the interrupted step %d is rolled back", runtime.spec.job_id, steps_applied
    )
    return True
