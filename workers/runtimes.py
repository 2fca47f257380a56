"""The runtime registry: which `JobRuntime` an island host builds for a model preset.

Each kind of runtime names the presets it serves and a factory; the worker service asks
`make_runtime` and never imports a runtime itself. Runtimes import only workers/runtime.py
(the interface), so no runtime imports another or the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .palm_runtime import PalmRuntime, palm_presets
from .probe_runtime import PROBE_PRESET, LinearProbeRuntime
from .runtime import IslandJobSpec, JobRuntime, JobSpecError

RuntimeFactory = Callable[[IslandJobSpec, Sequence[Any]], JobRuntime]


@dataclass(frozen=True)
class RuntimeKind:
    """One kind of runtime: its name, the presets it serves, and how to build it."""

    name: str
    presets: Callable[[], tuple[str, ...]]
    factory: RuntimeFactory


KINDS: tuple[RuntimeKind, ...] = (
    RuntimeKind("probe", lambda: (PROBE_PRESET,), LinearProbeRuntime),
    RuntimeKind("palm", palm_presets, PalmRuntime),
)


def known_presets() -> tuple[str, ...]:
    """Every model preset some runtime serves, in registry order."""
    return tuple(preset for kind in KINDS for preset in kind.presets())


def make_runtime(spec: IslandJobSpec, devices: Sequence[Any]) -> JobRuntime:
    """The runtime for `spec.preset` on `devices` (the island's devices, mesh order).

    Raises:
        JobSpecError: an unknown preset, or a field the runtime cannot accept.
        RuntimeUnavailableError: no runtime for this model on this host yet.
    """
    if spec.pipeline is not None and spec.preset in palm_presets():
        from .pipeline import PipelineRuntime

        return PipelineRuntime(spec, devices)
    for kind in KINDS:
        if spec.preset in kind.presets():
            return kind.factory(spec, devices)
    raise JobSpecError(
        f"model.preset={spec.preset!r} is not a model this host runs; known presets: "
        f"{', '.join(known_presets())}."
    )
