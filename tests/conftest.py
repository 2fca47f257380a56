"""Test-wide settings: CPU devices, JAX's persistent compilation cache, shared fixtures.

The environment is set before anything imports JAX, and it is inherited by every process a
test starts (island hosts, Ray workers), so they share the same compilation cache.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache"

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Four virtual CPU devices in the test process: enough for every in-process mesh we test.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(CACHE / "jax"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("PATHWAYS_LITE_CACHE", str(CACHE / "pathways_lite"))
# Our test processes stay on loopback and never phone home.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
