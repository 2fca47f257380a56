"""The face imports only the wire and the small shared modules: importing `pathways_lite`, its
client, SDK or CLI loads neither the controller's server (service, store) nor JAX, and no
import changes the process's environment (JAX_PLATFORMS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

# What the face must never pull in: the server's code and the accelerator runtime.
FORBIDDEN = ("pathways_lite.controller.service", "pathways_lite.controller.store", "jax")
PROBE = """
import json, os, sys
before = dict(os.environ)
import {module}
print(json.dumps({{
    "loaded": [m for m in {forbidden!r} if m in sys.modules],
    "env": {{k: os.environ.get(k) for k in set(before) | set(os.environ)
             if before.get(k) != os.environ.get(k)}},
}}))
"""


def _probe(module: str, **env: str) -> dict:
    code = PROBE.format(module=module, forbidden=FORBIDDEN)
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        env={k: v for k, v in {**os.environ, **env}.items() if v is not None},
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize(
    "module",
    [
        "pathways_lite",
        "pathways_lite.client",
        "pathways_lite.cli",
        "pathways_lite.sdk",
        "pathways_lite.local",
        "pathways_lite.controller",
        "pathways_lite.controller.states",
        "pathways_lite.controller.options",
    ],
)
def test_face_modules_load_neither_the_server_nor_jax(module: str) -> None:
    result = _probe(module)
    assert result["loaded"] == [], f"import {module} loaded {result['loaded']}"
    assert result["env"] == {}, f"import {module} changed the environment: {result['env']}"


def test_no_import_touches_jax_platforms_of_a_gpu_notebook() -> None:
    # A notebook that chose its accelerator keeps it, whatever of ours it imports.
    for module in ("pathways_lite.local", "pathways_lite.controller.__main__"):
        result = _probe(module, JAX_PLATFORMS="cuda")
        assert result["env"] == {}, f"import {module} changed the environment: {result['env']}"


def test_sdk_names_are_defined_once() -> None:
    import pathways_lite
    from pathways_lite import client, local, sdk

    assert pathways_lite.LocalCluster is local.LocalCluster is sdk.LocalCluster
    assert pathways_lite.Client is sdk.Client and not hasattr(client, "Client")
    assert pathways_lite.JobSpec.DESCRIPTOR.full_name == "pathways_lite.v1.JobSpec"
