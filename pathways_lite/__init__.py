"""pathways_lite: a single-controller orchestration platform for distributed JAX training."""

from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout the subpackages model/, controller/ and workers/ sit beside this folder
# at the top level of the repo; installed (wheel), the build maps them under pathways_lite/.
# Adding the repo root to the package path makes `pathways_lite.model` resolve the same way in
# both cases, from any working directory and inside Ray workers.
_here = _Path(__file__).resolve().parent
if not (_here / "model").is_dir() and (_here.parent / "model" / "__init__.py").is_file():
    __path__.append(str(_here.parent))  # noqa: F821 (a package's __path__)
