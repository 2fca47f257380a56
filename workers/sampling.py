"""Text generation from a job resident on an island: the worker service's Sample rpc.

It decodes with `pathways_lite.model.sampling.generate` from the job's current parameters, on
the island's mesh, with the job's own tokenizer. Only runtimes that hold a PaLM model
(`PalmRuntime`) can sample; any other runtime is refused with a clear message.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

from .runtime import JobSpecError, RuntimeUnavailableError

logger = logging.getLogger(__name__)

MAX_NEW_TOKENS = 1024
MAX_PROMPT_CHARS = 10_000


@dataclasses.dataclass(frozen=True)
class Sample:
    """One generated continuation."""

    text: str
    tokens: list[int]
    steps_applied: int
    seconds: float


def _int64(seed: int) -> int:
    """A uint64 seed as the int64 of the same bits (`jax.random.key` takes an int64; 2**63
    and above overflowed): distinct seeds stay distinct."""
    return seed - 2**64 if seed >= 2**63 else seed


def sample(
    runtime: Any,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int = 0,
    seed: int = 0,
) -> Sample:
    """Continue `prompt` with a loaded job's current parameters (blocking: run it on the
    host's runtime thread, between steps).

    Args:
        runtime: the job's runtime; a `PalmRuntime` with resident parameters.
        prompt: the text to continue.
        max_new_tokens: tokens to generate.
        temperature: 0 for greedy decoding.
        top_k: 0 for the whole vocabulary.
        seed: seed of the sampling PRNG.

    Raises:
        JobSpecError: a bad prompt or setting (INVALID_ARGUMENT), naming the value.
        RuntimeUnavailableError: the runtime holds no model to sample from.
    """
    import jax

    from pathways_lite.model.sampling import generate

    if not prompt:
        raise JobSpecError("prompt is empty; give some text to continue.")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise JobSpecError(
            f"prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS} are allowed."
        )
    if not 1 <= max_new_tokens <= MAX_NEW_TOKENS:
        raise JobSpecError(f"max_new_tokens={max_new_tokens} must be in [1, {MAX_NEW_TOKENS}].")
    fns = getattr(runtime, "fns", None)
    dataset = getattr(runtime, "dataset", None)
    loaded = getattr(runtime, "_loaded", None)
    if fns is None or dataset is None or loaded is None:
        raise RuntimeUnavailableError(
            f"job {runtime.spec.job_id!r} (model {runtime.spec.preset!r}) has no language "
            "model to sample from."
        )
    state = loaded().state
    tokenizer = dataset.tokenizer
    prompt_ids = tokenizer.encode(prompt)
    started = time.perf_counter()
    try:
        # No mesh is set: the model's activation constraints stay off (a batch of one prompt
        # cannot be split over `data`); the parameters keep their shardings on the mesh.
        out = generate(
            fns.model(state),
            prompt_ids,
            max_new_tokens,
            temperature=float(temperature),
            top_k=int(top_k) or None,
            rng=jax.random.key(_int64(int(seed))),
        )
    except ValueError as e:
        raise JobSpecError(str(e)) from None
    tokens = [int(t) for t in out]
    seconds = time.perf_counter() - started
    logger.info("job %s: sampled %d tokens in %.2f s", runtime.spec.job_id, len(tokens), seconds)
    return Sample(
        text=tokenizer.decode(tokens),
        tokens=tokens,
        steps_applied=int(state.step),
        seconds=seconds,
    )
