"""Pipeline stages of PaLM: the block split and each stage's compiled step pieces.

A pipeline of S stages cuts the stack of parallel blocks into S contiguous ranges
(`stage_split`, balanced by parameters and FLOPs per token). Stage 0 also embeds the tokens;
stage S - 1 also applies the final norm and the output projection with the *shared* embedding,
so the embedding matrix lives on two stages (Megatron's embedding group):

    stage 0:      x_1 = blocks[0:b1](embed(tokens))
    stage s:      x_{s+1} = blocks[b_s:b_{s+1}](x_s)
    stage S - 1:  loss = lm_loss(embed.attend(final_norm(blocks[..](x_{S-1}))), targets)

Each stage's parameters are cut out of the reference model's initialisation (`Palm` built
from the same seed, under jit, so XLA keeps only this stage's draws): a pipeline starts from
bitwise the reference's parameters. The forward of a non-last stage returns the residuals of
its VJP that are not parameters (the activations its backward needs, XLA's choice), and the
backward (`bwd`) takes them: what a stage stashes per microbatch is those residuals, and the
forward runs once. With `recompute` (the spec's pipeline.recompute) a stage stashes only its
input (B_m, T, D) and the backward runs the forward again: far less memory (palm-small's
blocks keep ~36 MB of residuals per block at 16 x 64 tokens against the 1 MB input), about a
third more work on the non-last stages (bench/pipeline.py, S=2, M=4: 5% fewer tokens/s).

One step on one replica's batch of M microbatches: every stage sums its microbatch gradients
in microbatch order 0..M-1 (both schedules run the backwards in that order, so GPipe and 1F1B
give bitwise the same sums) and divides by M; the first and last stage add their two
embedding contributions (each computes `first + last`, the same bytes on both); the replicas
of a stage average (workers/exchange.py); the global gradient norm is the sum of the stages'
squares (the embedding counted once) in stage order; `apply` clips by it exactly as
`optax.clip_by_global_norm` does and runs the same Adafactor as the reference.

The stage boundary is float32 (`LINK_DTYPE`, what workers/stage_link.py carries) whatever the
compute dtype: a stage casts its output to float32 and the next casts it back to the compute
dtype at its entry; the VJPs of those casts carry the gradient the same way. bfloat16 and
float16 are exact in float32, so a bf16 pipeline's stages compute on the reference's bf16
residual stream, and in float32 the casts are no-ops.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from .config import PalmConfig
from .loss import lm_loss
from .optim import OptimConfig, make_optimizer
from .palm import Palm
from .sharding import logical_to_spec, make_mesh, state_shardings, tree_shardings_like_params

logger = logging.getLogger(__name__)

SCHEDULES = ("gpipe", "1f1b")
MATMUL_PRECISION = "highest"  # as model/train.py: compared with the reference at 1e-5
LINK_DTYPE = jnp.float32  # activations and their gradients between stages (the module doc)


def stage_costs(cfg: PalmConfig) -> tuple[float, float, float]:
    """(block, embedding-on-stage-0, head-on-last-stage) costs: the mean of the shares of
    parameters and of FLOPs per token each part has in the whole model."""
    d, v = cfg.d_model, cfg.vocab_size
    block_params = d * (cfg.n_heads * cfg.head_dim) * 2 + 2 * d * cfg.head_dim + 3 * d * cfg.mlp_dim
    embed_params = v * d
    params_total = cfg.n_layers * block_params + embed_params
    flops_total = cfg.n_layers * block_params + embed_params  # the lookup costs ~0
    block = 0.5 * block_params / params_total + 0.5 * block_params / flops_total
    first = 0.5 * embed_params / params_total  # holds the table, computes a gather
    last = 0.5 * embed_params / params_total + 0.5 * embed_params / flops_total
    return block, first, last


def stage_split(cfg: PalmConfig, stages: int) -> tuple[tuple[int, int], ...]:
    """The contiguous block range [lo, hi) of every stage, each non-empty, minimising the
    largest stage cost (`stage_costs`); ties go to the split with earlier cuts.

    Raises:
        ValueError: fewer blocks than stages, or fewer than 2 stages.
    """
    n = cfg.n_layers
    if stages < 2 or stages > n:
        raise ValueError(f"pipeline.stages={stages} must be in [2, n_layers={n}].")
    block, first, last = stage_costs(cfg)

    def cost(s: int, lo: int, hi: int) -> float:
        return (hi - lo) * block + (first if s == 0 else 0.0) + (last if s == stages - 1 else 0.0)

    # best[s][i]: (max cost, cuts) of stages s.. over blocks i..n.
    memo: dict[tuple[int, int], tuple[float, tuple[int, ...]]] = {}

    def best(s: int, i: int) -> tuple[float, tuple[int, ...]]:
        if (s, i) in memo:
            return memo[(s, i)]
        if s == stages - 1:
            out = (cost(s, i, n), ())
        else:
            out = (float("inf"), ())
            for hi in range(i + 1, n - (stages - 1 - s) + 1):
                rest, cuts = best(s + 1, hi)
                value = max(cost(s, i, hi), rest)
                if value < out[0] - 1e-12:
                    out = (value, (hi, *cuts))
        memo[(s, i)] = out
        return out

    cuts = (0, *best(0, 0)[1], n)
    return tuple((cuts[s], cuts[s + 1]) for s in range(stages))


class StageModel(nnx.Module):
    """One stage's modules, taken from a whole `Palm` (shared, not copied)."""

    def __init__(self, full: Palm, lo: int, hi: int, *, first: bool, last: bool):
        self.embed = full.embed if (first or last) else None
        self.blocks = nnx.List([full.blocks[i] for i in range(lo, hi)])
        self.final_norm = full.final_norm if last else None


@dataclasses.dataclass(frozen=True)
class StagePlan:
    """A stage's place: its index, the stage count and the block ranges of all stages; and
    whether its backward runs the forward again from the stage input (`recompute`) instead of
    taking the forward's residuals."""

    stage: int
    stages: int
    bounds: tuple[tuple[int, int], ...]
    recompute: bool = False

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.stages - 1


def schedule_order(schedule: str, stage: int, stages: int, microbatches: int) -> list[tuple]:
    """The actions of one stage for one step: ("F", m) and ("B", m), in execution order.

    GPipe: every forward, then every backward. 1F1B (PipeDream flush): stage s runs
    min(S - s, M) warm-up forwards, then alternates one backward and one forward, then the
    remaining backwards: at most S - s microbatches of activations are stashed at once. The
    backwards run in microbatch order 0..M-1 in both (the gradient sums are bitwise equal).
    The last stage's forward and backward are one fused action ("FB", m).
    """
    m_all = range(microbatches)
    if stage == stages - 1:
        return [("FB", m) for m in m_all]
    if schedule == "gpipe":
        return [("F", m) for m in m_all] + [("B", m) for m in m_all]
    if schedule != "1f1b":
        raise ValueError(f"pipeline.schedule={schedule!r} is not one of {', '.join(SCHEDULES)}.")
    warm = min(stages - stage, microbatches)
    order: list[tuple] = [("F", m) for m in range(warm)]
    nxt = warm
    for m in m_all:
        order.append(("B", m))
        if nxt < microbatches:
            order.append(("F", nxt))
            nxt += 1
    return order


def peak_stash(schedule: str, stage: int, stages: int, microbatches: int) -> int:
    """Most microbatches a stage holds stashed at once under the schedule (their forwards'
    residuals, or with `recompute` their inputs)."""
    live = peak = 0
    for kind, _ in schedule_order(schedule, stage, stages, microbatches):
        live += {"F": 1, "B": -1, "FB": 0}[kind]
        peak = max(peak, live)
    return peak


def _save_all_but_casts(prim: Any, *_: Any, **__: Any) -> bool:
    """A `jax.checkpoint` policy: keep every intermediate for the backward except the
    results of dtype conversions (cheap to redo; the weights' casts would be stashed)."""
    return prim is not jax.lax.convert_element_type_p


class StageFunctions:
    """The compiled pieces of one stage's step on an island's mesh.

    Args:
        model_cfg, optim_cfg: the model and optimizer (the reference's).
        plan: this stage.
        mesh: the island's devices; None: one device.
    """

    def __init__(
        self,
        model_cfg: PalmConfig,
        optim_cfg: OptimConfig,
        plan: StagePlan,
        mesh: Mesh | None = None,
    ):
        self.model_cfg = model_cfg
        self.optim_cfg = optim_cfg
        self.plan = plan
        self.mesh = mesh if mesh is not None else make_mesh(1, 1)
        self.clip_norm = optim_cfg.clip_norm
        # Clipping needs the norm of the whole model's gradients: applied here, by hand.
        self.tx = make_optimizer(dataclasses.replace(optim_cfg, clip_norm=None))
        lo, hi = plan.bounds[plan.stage]
        self.lo, self.hi = lo, hi

        abstract = nnx.eval_shape(lambda: self._stage(Palm(model_cfg, rngs=nnx.Rngs(0))))
        self.graphdef, abstract_params = nnx.split(abstract, nnx.Param)
        self.param_shardings = state_shardings(abstract_params, self.mesh)
        abstract_opt = jax.eval_shape(self.tx.init, abstract_params)
        self.opt_shardings = tree_shardings_like_params(abstract_opt, abstract_params, self.mesh)
        self.tokens_sharding = NamedSharding(self.mesh, logical_to_spec(("batch", None)))
        self.act_sharding = NamedSharding(
            self.mesh, logical_to_spec(("batch", "length", "act_embed"))
        )
        self.replicated = NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        p, r = self.param_shardings, self.replicated
        x_in = self.tokens_sharding if plan.first else self.act_sharding
        self._init = jax.jit(
            self._init_impl, static_argnums=0, out_shardings=(p, self.opt_shardings)
        )
        # (batch, length) of a microbatch -> how the forward's VJP flattens: its treedef and,
        # per leaf, the index of the parameter it is (-1: a residual `fwd` returns).
        self._vjp_layouts: dict[tuple[int, int], tuple[Any, list[int]]] = {}
        # The forward returns its output and the residuals its backward needs (the stash);
        # the backward takes them, with the parameters, as committed arrays.
        self.fwd = jax.jit(
            self._fwd_impl, in_shardings=(p, x_in), out_shardings=(self.act_sharding, None)
        )
        self.bwd = jax.jit(
            self._bwd_impl, out_shardings=(p, None if plan.first else self.act_sharding)
        )
        self.fwdbwd = jax.jit(
            self._fwdbwd_impl,
            in_shardings=(p, self.act_sharding, self.tokens_sharding),
            out_shardings=(r, p, self.act_sharding),
        )
        self.add = jax.jit(lambda a, b: jax.tree.map(jnp.add, a, b), donate_argnums=0)
        self.scale = jax.jit(
            lambda g, s: jax.tree.map(lambda x: x * s.astype(x.dtype), g), donate_argnums=0
        )
        self.sumsq = jax.jit(self._sumsq_impl, out_shardings=r)
        self.apply = jax.jit(
            self._apply_impl,
            in_shardings=(p, self.opt_shardings, p, r),
            out_shardings=(p, self.opt_shardings),
            donate_argnums=(0, 1),
        )

    def _stage(self, full: Palm) -> StageModel:
        return StageModel(full, self.lo, self.hi, first=self.plan.first, last=self.plan.last)

    # -- pure functions (traced under jit) ---------------------------------------------------

    def _init_impl(self, seed: int):
        _, params = nnx.split(self._stage(Palm(self.model_cfg, rngs=nnx.Rngs(seed))), nnx.Param)
        return params, self.tx.init(params)

    def _run_blocks(self, model: StageModel, x_btd):
        for block in model.blocks:
            x_btd = block(x_btd)
        return x_btd

    def _stage_out(self, params, x_in):
        """The stage's output (B, T, D) in LINK_DTYPE from its input: tokens (B, T + 1) on
        stage 0, the previous stage's output elsewhere (in the compute dtype from here on)."""
        model = nnx.merge(self.graphdef, params)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            if self.plan.first:
                x_btd = model.embed(x_in[:, :-1])
            else:
                x_btd = x_in.astype(self.model_cfg.compute_dtype)
            return self._run_blocks(model, x_btd).astype(LINK_DTYPE)

    def _vjp(self, stage_out, params, x_in):
        """`jax.vjp` of `stage_out` at (params, x_in): with respect to the parameters only on
        stage 0 (its input is tokens), to both elsewhere."""
        if self.plan.first:
            return jax.vjp(lambda p: stage_out(p, x_in), params)
        return jax.vjp(stage_out, params, x_in)

    def _grads(self, vjp, g_btd):
        """(parameter gradients, input gradient or None on stage 0) of a `_vjp` function."""
        grads = vjp(g_btd)
        return (grads[0], None) if self.plan.first else grads

    def _fwd_impl(self, params, x_in):
        """(the stage's output, what its backward takes: the residuals of its VJP that are not
        parameters, or with `recompute` the stage input alone)."""
        if self.plan.recompute:
            return self._stage_out(params, x_in), [x_in]
        # Every intermediate is saved except dtype conversions, which the backward redoes:
        # with bf16 compute the parameters' bf16 casts would otherwise be stashed per
        # microbatch (copies of the weights the identity match below cannot see).
        stage_out = jax.checkpoint(self._stage_out, policy=_save_all_but_casts)
        y, vjp = self._vjp(stage_out, params, x_in)
        leaves, treedef = jax.tree.flatten(vjp)
        param_leaves = jax.tree.leaves(params)
        where = [next((i for i, p in enumerate(param_leaves) if leaf is p), -1) for leaf in leaves]
        self._vjp_layouts[tuple(y.shape[:2])] = (treedef, where)
        return y, [leaf for leaf, i in zip(leaves, where, strict=True) if i < 0]

    def _bwd_impl(self, params, residuals, g_btd):
        """The gradients of the parameters (and of the stage input, None on stage 0) from
        the forward's residuals (the forward is not run again), or with `recompute` from the
        stage input (the forward runs again)."""
        if self.plan.recompute:
            (x_in,) = residuals
            return self._grads(self._vjp(self._stage_out, params, x_in)[1], g_btd)
        key = tuple(g_btd.shape[:2])
        if key not in self._vjp_layouts:  # traced before any forward of this shape
            b, t = key
            x_in = (
                jax.ShapeDtypeStruct((b, t + 1), jnp.int32)
                if self.plan.first
                else jax.ShapeDtypeStruct(g_btd.shape, LINK_DTYPE)
            )
            abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), params)
            jax.eval_shape(self._fwd_impl, abstract, x_in)
        treedef, where = self._vjp_layouts[key]
        if len(residuals) != where.count(-1):
            raise ValueError(
                f"{len(residuals)} residuals for a stage forward of {key} that stashes "
                f"{where.count(-1)}."
            )
        param_leaves, rest = jax.tree.leaves(params), iter(residuals)
        vjp = jax.tree.unflatten(
            treedef, [param_leaves[i] if i >= 0 else next(rest) for i in where]
        )
        return self._grads(vjp, g_btd)

    def _loss(self, params, x_btd, tokens_bt1):
        model = nnx.merge(self.graphdef, params)
        with jax.default_matmul_precision(MATMUL_PRECISION):
            y_btd = self._run_blocks(model, x_btd.astype(self.model_cfg.compute_dtype))
            logits_btv = model.embed.attend(model.final_norm(y_btd))
            loss, _ = lm_loss(logits_btv, tokens_bt1[:, 1:], z_loss=self.model_cfg.z_loss)
        return loss

    def _fwdbwd_impl(self, params, x_btd, tokens_bt1):
        loss, (g_params, g_x) = jax.value_and_grad(self._loss, argnums=(0, 1))(
            params, x_btd, tokens_bt1
        )
        return loss, g_params, g_x

    def _sumsq_impl(self, grads, skip_embed: bool = False):
        leaves = jax.tree_util.tree_flatten_with_path(grads)[0]
        total = jnp.float32(0.0)
        for path, leaf in leaves:
            if skip_embed and "embed" in jax.tree_util.keystr(path):
                continue
            total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
        return total

    def _apply_impl(self, params, opt_state, grads, g_norm):
        with jax.default_matmul_precision(MATMUL_PRECISION):
            if self.clip_norm is not None:
                # optax.clip_by_global_norm, with the whole model's norm.
                trigger = jnp.squeeze(g_norm < self.clip_norm)
                grads = jax.tree.map(
                    lambda t: jax.lax.select(
                        trigger, t, (t / g_norm.astype(t.dtype)) * self.clip_norm
                    ),
                    grads,
                )
            updates, opt_state = self.tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state

    # -- the public API ----------------------------------------------------------------------

    def init(self, seed: int) -> tuple[Any, Any]:
        """This stage's (params, opt_state) of the reference model's initialisation."""
        with jax.set_mesh(self.mesh):
            return self._init(seed)

    def grads_sumsq(self, grads) -> float:
        """Sum of squares of this stage's gradients; the last stage leaves out the embedding
        (stage 0 counts it), so the stages' sums add up to the whole model's once."""
        skip = self.plan.last and not self.plan.first
        fn = self._sumsq_skip if skip else self.sumsq
        return float(np.asarray(jax.device_get(fn(grads))))

    @property
    def _sumsq_skip(self):
        if not hasattr(self, "_skip_fn"):
            self._skip_fn = jax.jit(
                lambda g: self._sumsq_impl(g, True), out_shardings=self.replicated
            )
        return self._skip_fn

    def embed_path(self) -> str:
        return "embed"

    def state_bytes_per_device(self) -> tuple[int, int]:
        """(parameter bytes, optimizer-state bytes) one device holds for this stage."""
        params_abs, opt_abs = jax.eval_shape(lambda: self._init_impl(0))

        def per_device(tree: Any, shardings: Any) -> int:
            total = 0
            for leaf, sh in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings), strict=True):
                shard = sh.shard_shape(leaf.shape)
                total += int(np.prod(shard, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
            return total

        return per_device(params_abs, self.param_shardings), per_device(opt_abs, self.opt_shardings)

    def activation_shape(self, microbatch: int, seq_len: int) -> tuple[int, int, int]:
        """(B_m, T, D): what goes between stages per microbatch (in LINK_DTYPE)."""
        return (microbatch, seq_len, self.model_cfg.d_model)


# -- the whole model from its stages' parts (sampling a pipeline job, init_from one) --------

_BLOCK_RE = re.compile(r"\['blocks'\]\[(\d+)\]")


def _stage_trees(model_cfg: PalmConfig, optim_cfg: OptimConfig, lo: int, hi: int, first, last):
    """(params, optimizer state) of one stage, abstract, as StageFunctions holds them."""
    tx = make_optimizer(dataclasses.replace(optim_cfg, clip_norm=None))
    model = nnx.eval_shape(
        lambda: StageModel(Palm(model_cfg, rngs=nnx.Rngs(0)), lo, hi, first=first, last=last)
    )
    params = nnx.split(model, nnx.Param)[1]
    return params, jax.eval_shape(tx.init, params)


def _keys(tree: Any) -> list[str]:
    return [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def whole_from_stages(
    model_cfg: PalmConfig,
    optim_cfg: OptimConfig,
    bounds: tuple[tuple[int, int], ...],
    params_like: Any,
    opt_like: Any,
) -> tuple[list[tuple[int, list[int], list[int]]], int, int]:
    """Where every leaf of the whole model's state lives in a pipeline's stage checkpoints.

    A stage's tree is the whole model's with only its blocks (renumbered from 0; stage 0
    also the embedding, the last stage the final norm and its copy of the embedding); its
    optimizer state is Adafactor's alone (the stages clip by hand), where the whole model's
    sits behind the global-norm clip as the second element of a chain. Every whole leaf is
    taken from the first stage that holds it (the embedding and its optimizer state from
    stage 0: the two copies are bitwise equal).

    Args:
        bounds: the block range [lo, hi) of every stage (`stage_split`).
        params_like, opt_like: the whole model's (abstract) parameters and optimizer state.

    Returns:
        (for each stage: (stage, whole parameter index of each of its parameter leaves,
        whole optimizer-state index of each of its optimizer leaves)), the whole model's
        parameter and optimizer leaf counts. Every whole leaf is the target of one stage
        leaf at least.

    Raises:
        ValueError: the stages do not make up the whole model (another model or split).
    """
    whole_p = {k: i for i, k in enumerate(_keys(params_like))}
    whole_o = {k: i for i, k in enumerate(_keys(opt_like))}
    opt_prefix = "[1]" if optim_cfg.clip_norm is not None else ""
    stages = len(bounds)
    out = []
    seen_p: set[int] = set()
    seen_o: set[int] = set()
    for s, (lo, hi) in enumerate(bounds):
        params, opt = _stage_trees(model_cfg, optim_cfg, lo, hi, s == 0, s == stages - 1)

        def renumber(key: str, lo: int = lo) -> str:
            return _BLOCK_RE.sub(lambda m: f"['blocks'][{lo + int(m.group(1))}]", key)

        try:
            p_idx = [whole_p[renumber(k)] for k in _keys(params)]
            o_idx = [whole_o[opt_prefix + renumber(k)] for k in _keys(opt)]
        except KeyError as e:
            raise ValueError(
                f"stage {s} (blocks {lo}..{hi - 1}) has a leaf {e} the whole model lacks."
            ) from None
        seen_p.update(p_idx)
        seen_o.update(o_idx)
        out.append((s, p_idx, o_idx))
    missing = (len(whole_p) - len(seen_p)) + (len(whole_o) - len(seen_o))
    if missing:
        raise ValueError(f"{missing} leaves of the whole model are in no stage: split {bounds}.")
    return out, len(whole_p), len(whole_o)
