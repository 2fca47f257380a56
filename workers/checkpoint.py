"""Orbax checkpoints of a job's training state, written and read by the island hosts.

A checkpoint holds the parameters, the optimizer state and the step count of a job, saved
with their global shapes, so any mesh restores it with its own shardings (a job saved on
2 islands x 2 devices resumes on 1 island x 4). The parameters are bitwise the same on every
island, so only island 0's hosts write, each host its own shards (orbax does the multi-host
part); the folder must be reachable by every host (a shared path locally: a folder in the
controller's state directory).

Saving is asynchronous: the state is copied off the devices and the step goes on while a
background thread writes it; the checkpoint counts once orbax has finalised it (renamed its
temporary folder), and only then is it reported as committed. Checkpoint n of generation g of
a job lives in `<checkpoint_dir>/g<g>-step<n>` (`checkpoint_path`): generations never write
into each other's folders, so a half-written folder of a dead generation is never mistaken
for a committed one.

The policy lives here too (`JobCheckpoints`): which hosts write a job's checkpoints, a save
asked for after a step (a failure is logged and never fails the step: that checkpoint is
simply never committed), and restoring a freshly loaded runtime (`restore_job`).
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path
from typing import Any

import numpy as np

from .runtime import JobRuntime, JobSpecError

logger = logging.getLogger(__name__)

_NAME_RE = re.compile(r"^g(\d+)-step(\d+)$")
# Committed steps remembered per writer (the controller keeps the registry).
_REMEMBERED = 64


class CheckpointError(Exception):
    """A checkpoint that cannot be restored (missing, half-written or corrupt)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (reported at the next save or wait)."""


# What a restore says of a checkpoint folder this host cannot find (or finds half written):
# the controller tells it apart from one that does not read back (controller/recovery.py).
MISSING = "is missing or was never committed"


def checkpoint_path(root: str | Path, generation: int, step: int) -> str:
    """The folder of the checkpoint of `step` applied steps of one generation of a job."""
    return str(Path(root) / f"g{int(generation)}-step{int(step)}")


def parse_checkpoint_name(name: str) -> tuple[int, int] | None:
    """(generation, step) of a checkpoint folder's name, or None for another name."""
    match = _NAME_RE.match(name)
    return None if match is None else (int(match.group(1)), int(match.group(2)))


def _flat(tree: Any) -> tuple[dict[str, Any], Any]:
    import jax

    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return {f"{i:05d}": leaf for i, leaf in enumerate(leaves)}, treedef


def state_tree(params: Any, opt_state: Any, step: int) -> dict[str, Any]:
    """What a checkpoint holds: the leaves of params and optimizer state, and the step."""
    return {
        "params": _flat(params)[0],
        "opt_state": _flat(opt_state)[0],
        "step": np.asarray(int(step), np.int64),
    }


def is_committed(path: str | Path) -> bool:
    """Whether orbax finalised the checkpoint folder (a half-written one is not)."""
    from orbax.checkpoint import path as ocp_path

    p = Path(path)
    return p.is_dir() and bool(ocp_path.step.is_path_finalized(p))


class CheckpointWriter:
    """Asynchronous orbax saves of one loaded job, one in progress at a time.

    `save` returns once the state is copied off the devices; a background thread waits for
    orbax to finalise it and then adds its step to `committed`. The writer belongs to one
    generation, so a step names one folder: a save of a step committed or being written
    returns at once (a drain's second SaveCheckpoint asks every writer again when only some
    of a pipeline's stages had the step; orbax refuses to write into an existing folder).
    """

    def __init__(self) -> None:
        import orbax.checkpoint as ocp

        self._checkpointer = ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
        self._lock = threading.Lock()
        self._committed: list[int] = []
        self._writing: int | None = None  # the step of the save in progress
        self._waiter: threading.Thread | None = None
        self._error: BaseException | None = None

    @property
    def committed(self) -> list[int]:
        """Steps of the checkpoints committed so far, oldest first."""
        with self._lock:
            return list(self._committed)

    def save(self, path: str, params: Any, opt_state: Any, step: int) -> None:
        """Start writing the state after `step` applied steps to `path` (blocks only while
        the state is copied off the devices, and for the previous save to finish, whether
        or not that one failed); nothing when this writer has committed that step or is
        writing it."""
        import orbax.checkpoint as ocp

        with self._lock:
            if step == self._writing or step in self._committed:
                logger.info("checkpoint %s: already written or being written", path)
                return
        try:
            self.wait()
        except CheckpointWriteError as e:
            # The previous save failed (logged as it did, never committed): this one is
            # written all the same. Before, its failure was raised here once more and the
            # save asked for now was dropped (a job's final checkpoint with it).
            logger.warning("%s; writing %s all the same", e, path)
        tree = state_tree(params, opt_state, step)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._checkpointer.save(path, args=ocp.args.StandardSave(tree))
        with self._lock:
            self._writing = int(step)

        def finish() -> None:
            try:
                self._checkpointer.wait_until_finished()
            except BaseException as e:  # reported at the next save or wait
                logger.exception("checkpoint %s failed", path)
                with self._lock:
                    self._error, self._writing = e, None
                return
            with self._lock:
                self._committed.append(int(step))
                del self._committed[:-_REMEMBERED]
                self._writing = None
            logger.info("checkpoint %s committed", path)

        self._waiter = threading.Thread(target=finish, name="checkpoint-commit", daemon=True)
        self._waiter.start()

    def wait(self) -> None:
        """Block until the save in progress is committed.

        Raises:
            CheckpointWriteError: the last save failed.
        """
        if self._waiter is not None:
            self._waiter.join()
            self._waiter = None
        if self._error is not None:
            error, self._error = self._error, None
            raise CheckpointWriteError(f"writing a checkpoint failed: {error!r}") from error

    def close(self) -> None:
        """Wait for the save in progress (a failure is logged), then release orbax."""
        try:
            self.wait()
        except CheckpointError:
            logger.exception("closing a checkpoint writer")
        self._checkpointer.close()


def restore(path: str, params_like: Any, opt_like: Any, param_shardings: Any, opt_shardings: Any):
    """Read a checkpoint onto this mesh: (params, opt_state, step).

    Args:
        path: a committed checkpoint folder.
        params_like: the (abstract) parameter tree of the job; gives structure, shapes, dtypes.
        opt_like: the (abstract) optimizer state tree.
        param_shardings: the parameters' shardings on this island's mesh.
        opt_shardings: the optimizer state's shardings.

    Raises:
        CheckpointError: the folder is missing, not finalised, or its contents do not read
            back as this job's state.
    """
    import jax
    import orbax.checkpoint as ocp

    if not is_committed(path):
        raise CheckpointError(f"checkpoint {path!r} {MISSING}.")

    def abstract(like: Any, shardings: Any) -> tuple[dict[str, Any], Any]:
        leaves, treedef = jax.tree_util.tree_flatten(like)
        sh = jax.tree_util.tree_leaves(shardings)
        if len(sh) != len(leaves):
            raise CheckpointError(f"{len(sh)} shardings for {len(leaves)} leaves.")
        flat = {
            f"{i:05d}": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)
            for i, (leaf, s) in enumerate(zip(leaves, sh, strict=True))
        }
        return flat, treedef

    p_abs, p_def = abstract(params_like, param_shardings)
    o_abs, o_def = abstract(opt_like, opt_shardings)
    target = {"params": p_abs, "opt_state": o_abs, "step": np.asarray(0, np.int64)}
    try:
        with ocp.StandardCheckpointer() as checkpointer:
            tree = checkpointer.restore(path, target)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} does not read back: {e!r}"[:2000]) from e
    try:
        params = jax.tree_util.tree_unflatten(p_def, [tree["params"][k] for k in sorted(p_abs)])
        opt = jax.tree_util.tree_unflatten(o_def, [tree["opt_state"][k] for k in sorted(o_abs)])
        step = int(np.asarray(tree["step"]))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path!r} is not this job's state: {e!r}") from e
    return params, opt, step


def restore_params(path: str, params_like: Any, param_shardings: Any) -> tuple[Any, int]:
    """Read only the parameters of a checkpoint onto this mesh (fine-tuning): (params, step).
    The optimizer state is not read, so the new job's optimizer may differ from the one that
    wrote it; a job of another mesh or island count reads it with its own shardings.

    Raises:
        CheckpointError: the folder is missing, not finalised, or holds parameters of other
            shapes (named by leaf and shape).
    """
    import jax
    import orbax.checkpoint as ocp

    if not is_committed(path):
        raise CheckpointError(f"checkpoint {path!r} {MISSING}.")
    leaves, treedef = jax.tree_util.tree_flatten(params_like)
    shardings = jax.tree_util.tree_leaves(param_shardings)
    if len(shardings) != len(leaves):
        raise CheckpointError(f"{len(shardings)} shardings for {len(leaves)} leaves.")
    try:
        with ocp.PyTreeCheckpointer() as checkpointer:
            meta = checkpointer.metadata(path)
            tree_meta = getattr(meta, "item_metadata", meta)
            tree_meta = getattr(tree_meta, "tree", tree_meta)
            stored = tree_meta["params"]
            if len(stored) != len(leaves):
                raise CheckpointError(
                    f"checkpoint {path!r} holds {len(stored)} parameter arrays; this model has "
                    f"{len(leaves)}: init_from needs a model of the same shape."
                )
            for i, leaf in enumerate(leaves):
                shape = tuple(stored[f"{i:05d}"].shape)
                if shape != tuple(leaf.shape):
                    raise CheckpointError(
                        f"checkpoint {path!r}: parameter {i} has shape {shape}, this model's "
                        f"{tuple(leaf.shape)}: init_from needs a model of the same shape."
                    )
            item = {
                "params": {
                    f"{i:05d}": jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s)
                    for i, (leaf, s) in enumerate(zip(leaves, shardings, strict=True))
                },
                "step": np.asarray(0, np.int64),
            }
            restore_args = {
                "params": {
                    f"{i:05d}": ocp.ArrayRestoreArgs(
                        sharding=s, global_shape=leaf.shape, dtype=leaf.dtype
                    )
                    for i, (leaf, s) in enumerate(zip(leaves, shardings, strict=True))
                },
                "step": ocp.RestoreArgs(restore_type=np.ndarray),
            }
            tree = checkpointer.restore(
                path,
                args=ocp.args.PyTreeRestore(
                    item=item, restore_args=restore_args, partial_restore=True
                ),
            )
    except CheckpointError:
        raise
    except Exception as e:
        raise CheckpointError(f"checkpoint {path!r} does not read back: {e!r}"[:2000]) from e
    params = jax.tree_util.tree_unflatten(
        treedef, [tree["params"][f"{i:05d}"] for i in range(len(leaves))]
    )
    return params, int(np.asarray(tree["step"]))


class JobCheckpoints:
    """The checkpoint policy of one loaded job on this host, and its writer.

    Island 0's hosts write a job's checkpoints (the parameters are the same on every island)
    when the job has a checkpoint folder and its runtime can. Methods that touch the state
    run on the host's runtime thread; the writer is made at the first save.

    Args:
        runtime: the job's runtime.
        checkpoint_dir: LoadJob's checkpoint_dir ("" when the job writes none).
    """

    def __init__(self, runtime: JobRuntime, checkpoint_dir: str) -> None:
        self.runtime = runtime
        self.checkpoint_dir = checkpoint_dir
        self.writes = (
            bool(checkpoint_dir)
            and runtime.spec.island_index == 0
            and hasattr(runtime, "checkpoint_state")
        )
        self.writer: CheckpointWriter | None = None

    @property
    def committed(self) -> list[int]:
        """Steps of the checkpoints this host committed in the loaded generation."""
        return [] if self.writer is None else self.writer.committed

    def save(self) -> tuple[int, str]:
        """Start an asynchronous save of the job's current state: (its step, its folder).
        A step this host committed or is writing in the loaded generation is not written
        again (the same reply: its step and folder).

        Raises:
            RuntimeUnavailableError: the job has no state on the mesh (suspended).
            CheckpointWriteError: the previous save failed.
        """
        params, opt_state, step = self.runtime.checkpoint_state()
        spec = self.runtime.spec
        path = checkpoint_path(self.checkpoint_dir, spec.generation, step)
        if self.writer is None:
            self.writer = CheckpointWriter()
        self.writer.save(path, params, opt_state, step)
        return step, path

    def save_after_step(self, step: int) -> None:
        """The save a RunStep asked for: a failure is logged, never fails the step."""
        if not self.writes:
            return
        try:
            self.save()
        except Exception:
            logger.exception(
                "checkpoint after step %d of job %s failed", step, self.runtime.spec.job_id
            )

    def wait(self) -> None:
        """Block until the checkpoints in progress are committed (CheckpointWriteError)."""
        if self.writer is not None:
            self.writer.wait()

    def close(self) -> None:
        """Wait for the save in progress (committing it), then release the writer."""
        if self.writer is not None:
            self.writer.close()


def restore_job(runtime: JobRuntime, path: str) -> int:
    """Restore a freshly loaded runtime from a checkpoint; on failure unload it and raise.

    Returns:
        The checkpoint's step.

    Raises:
        JobSpecError: the runtime has no checkpoints (INVALID_ARGUMENT).
        CheckpointError: the checkpoint is missing, half-written or corrupt (DATA_LOSS).
    """
    if not hasattr(runtime, "restore_checkpoint"):
        runtime.unload()
        raise JobSpecError(
            f"restore_from={path!r}: model.preset={runtime.spec.preset!r} has no checkpoints."
        )
    try:
        return runtime.restore_checkpoint(path)
    except CheckpointError:
        runtime.unload()
        raise


def init_job(runtime: JobRuntime, path: str) -> int:
    """Fine-tuning: replace a freshly loaded runtime's parameters by a checkpoint's (its
    optimizer state stays fresh); on failure unload it and raise. Returns the checkpoint's
    step.

    Raises:
        JobSpecError: the runtime has no checkpoints (INVALID_ARGUMENT).
        CheckpointError: the checkpoint is missing, half-written, corrupt or of another
            shape (DATA_LOSS).
    """
    if not hasattr(runtime, "init_params_from"):
        runtime.unload()
        raise JobSpecError(
            f"init_from={path!r}: model.preset={runtime.spec.preset!r} has no checkpoints."
        )
    try:
        return runtime.init_params_from(path)
    except CheckpointError:
        runtime.unload()
        raise
