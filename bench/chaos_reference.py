"""The chaos benchmark's uninterrupted reference run, cached on disk by what determines its losses.

bench/chaos.py checks that a job SIGKILLed many times loses nothing: its losses must be bitwise
those of the same job run without interruption. That reference costs as much time as the chaos
run itself (minutes of steps), and its losses are a pure function of the job and the code that
runs it: the spec (model, optimizer, mesh, batch, data, seed; not its name), the cluster's
island layout, the Python, JAX and library versions, the machine's CPU (XLA's CPU code
generation), the XLA/JAX environment flags, and the sources of model/, workers/, controller/,
pathways_lite/ and protos/. Nor do they depend on the job's total step count: the learning rate
schedule has no horizon (model/optim.py) and each step's batch is a pure function of (seed,
step, batch size) (model/data.py), so a reference of N steps serves every run of at most N.

So the reference's losses (float64 repr in JSON: exact) and its wall time per step are kept in
`$PATHWAYS_LITE_CACHE/chaos-reference/<key>.json`, the key a SHA-256 over all of the above;
a rerun with nothing changed reads them instead of training again, and says so in its output
(`reference`). Any change of code, versions or machine is a new key: a stale reference cannot
be used. A cached reference cannot make a wrong run pass either: the comparison is still
bitwise, against losses an uninterrupted run produced.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE_DIRS = ("model", "workers", "controller", "pathways_lite", "protos")
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "pyarrow", "sentencepiece", "ml_dtypes")
# Environment variables that do not change a step's numbers.
ENV_IGNORED = ("JAX_COMPILATION_CACHE_DIR", "JAX_PLATFORMS")


def _sources_hash() -> str:
    digest = hashlib.sha256()
    for folder in SOURCE_DIRS:
        for path in sorted((REPO / folder).rglob("*")):
            if path.suffix in (".py", ".proto") and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(REPO)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()


def _cpu() -> str:
    """The CPU model and feature flags (XLA's CPU backend compiles for them)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    wanted = [line for line in lines if line.startswith(("model name", "flags"))]
    return hashlib.sha256("\n".join(sorted(set(wanted))).encode()).hexdigest()[:16]


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "absent"


def determinants(spec_without_name_and_steps: str, island_specs: list[str]) -> dict:
    """Everything the reference's losses depend on (the cache key is their hash)."""
    return {
        "spec": spec_without_name_and_steps,
        "island_specs": island_specs,
        "python": sys.version,
        "machine": platform.machine(),
        "cpu": _cpu(),
        "packages": {p: _version(p) for p in PACKAGES},
        "env": {
            k: v
            for k, v in sorted(os.environ.items())
            if k.startswith(("XLA_", "JAX_")) and k not in ENV_IGNORED
        },
        "sources": _sources_hash(),
    }


def cache_path(key_fields: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:32]
    root = Path(os.environ.get("PATHWAYS_LITE_CACHE", str(REPO / ".cache" / "pathways_lite")))
    return root / "chaos-reference" / f"{key}.json"


def load(path: Path, steps_needed: int | None = None) -> dict | None:
    """The cached reference, if there is one with at least `steps_needed` steps."""
    try:
        entry = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if steps_needed is not None and len(entry.get("losses", ())) < steps_needed:
        return None
    return entry


def save(path: Path, key_fields: dict, losses: list[float], **figures) -> None:
    """Keep a reference run's losses (one per step from 0) and figures (atomic replace)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    entry = {
        "determinants": key_fields,
        "losses": losses,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **figures,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(entry))
    os.replace(tmp, path)
