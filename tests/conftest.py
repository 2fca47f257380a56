"""Test-wide settings: CPU devices, JAX's persistent compilation cache, shared fixtures.

The environment is set before anything imports JAX, and it is inherited by every process a
test starts (island hosts, Ray workers), so they share the same compilation cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

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


# --- Data fixtures (tokenizer and data pipeline) -------------------------------------------
# One small tokenizer and dataset on a capped stdlib corpus, shared by every test session and
# cached under PATHWAYS_LITE_CACHE: the first build takes about a second, later ones read it.
TEST_VOCAB_SIZE = 1024
TEST_MAX_BYTES = 1_000_000
TEST_SEQ_LEN = 64


@pytest.fixture(scope="session")
def stdlib_dataset():
    """The default (stdlib) corpus, capped at 1 MB, vocabulary 1024, seq_len 64."""
    from pathways_lite.model.data import DataSpec, prepare_dataset

    spec = DataSpec(source="stdlib", vocab_size=TEST_VOCAB_SIZE, max_bytes=TEST_MAX_BYTES)
    return prepare_dataset(spec, seq_len=TEST_SEQ_LEN)


@pytest.fixture(scope="session")
def tokenizer(stdlib_dataset):
    """The tokenizer of `stdlib_dataset`."""
    return stdlib_dataset.tokenizer


# --- end of data fixtures ------------------------------------------------------------------
