"""pathways_lite: a single-controller orchestration platform for distributed JAX training.

The SDK's names load on first use, so `import pathways_lite` stays light (no JAX, gRPC or
Ray until they are needed)::

    from pathways_lite import Client, JobSpec, LocalCluster
"""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the subpackages model/, controller/ and workers/ sit beside this folder
# at the top level of the repo; installed (wheel), the build maps them under pathways_lite/.
# Adding the repo root to the package path makes `pathways_lite.model` resolve the same way in
# both cases, from any working directory and inside Ray workers.
_here = _Path(__file__).resolve().parent
if not (_here / "model").is_dir() and (_here.parent / "model" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)

# name -> the module (under pathways_lite) that defines it.
_LAZY = {
    "Client": "sdk",
    "Job": "sdk",
    "JobSpec": "sdk",
    "JobStatus": "sdk",
    "LocalCluster": "local",
    "ClientError": "sdk",
}
__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'pathways_lite' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f"pathways_lite.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
