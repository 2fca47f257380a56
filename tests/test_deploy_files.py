"""docker-compose.yml, docker-compose.gpu.yml and the Dockerfile, checked without a Docker engine.

The files parse, every build context and COPY source exists (and is not dropped by
.dockerignore), every service's command and health check parses with the argument parser of
the program it runs (Ray's `ray start`, the controller's, the `pathways-lite` CLI's), the
islands the nodes advertise are what discovery makes of them, ports, paths and
environment variables agree with the constants in the code, and every Ray process shares one
Ray auth token that a one-shot service creates once. One real check: the compose health
checks (grpc.health.v1 on the GCS and the raylets) answer under Ray token auth.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from pathways_lite import cli
from pathways_lite.controller import options as controller_options
from pathways_lite.local import STATE_ENV
from pathways_lite.model.tokenizer import default_cache_dir
from pathways_lite.workers.discovery import islands_from_nodes
from pathways_lite.workers.ray_cluster import auth_env

REPO = Path(__file__).resolve().parent.parent
BASE = REPO / "docker-compose.yml"
GPU = REPO / "docker-compose.gpu.yml"
# `make deploy-test`'s override: host network, one loopback address per service.
LOOPBACK = REPO / "deploy" / "docker-compose.loopback.yml"
ISLAND_NODES = ("island-a", "island-b")
TOKEN_SERVICE = "ray-token"
# Every service that runs a Ray process (the controller: its driver and --join-ray-node node).
RAY_SERVICES = ("ray-head", *ISLAND_NODES, "controller")
VOLUMES = {"state": "/state", "datasets": "/datasets", "checkpoints": "/checkpoints"}


def _load(path: Path) -> dict:
    return yaml.safe_load(path.read_text())


def _merge(base: dict, override: dict) -> dict:
    """Compose's merge of an override file: mappings merge, everything else is replaced."""
    out = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _compose_variants() -> dict[str, dict]:
    base = _load(BASE)
    return {"cpu": base, "gpu": _merge(base, _load(GPU))}


def _ray_start(argv: list[str]) -> dict:
    """The options of a `ray start` command line, parsed by Ray's own click command."""
    from ray.scripts.scripts import start

    assert argv[:2] == ["ray", "start"], argv
    context = start.make_context("ray start", list(argv[2:]))
    return context.params


def _option(argv: list[str], name: str) -> str:
    for arg in argv:
        if arg.startswith(f"{name}="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {argv}")


def _health_argv(service: dict) -> list[str]:
    test = service["healthcheck"]["test"]
    if test[0] == "CMD-SHELL":
        test = ["CMD", *shlex.split(test[1])]
    assert test[0] == "CMD", test
    return list(test[1:])


def _health_port(service: dict) -> int:
    argv = _health_argv(service)
    assert argv[:2] == ["pathways-lite", "health"], argv
    args = cli.build_parser().parse_args(argv[1:])
    host, port = args.address.rsplit(":", 1)
    assert host == "127.0.0.1", args.address
    return int(port)


def test_compose_files_parse_and_name_the_services() -> None:
    for name, compose in _compose_variants().items():
        services = compose["services"]
        assert set(services) == {TOKEN_SERVICE, *RAY_SERVICES}, name
        assert set(compose["volumes"]) == set(VOLUMES)
        # Debian's docker-compose 1.29 (what `make deploy-test` runs) rejects a top-level name.
        assert set(compose) <= {"services", "volumes"} | {k for k in compose if k[:2] == "x-"}


def test_build_contexts_and_every_copy_source_exist() -> None:
    ignored = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for name, compose in _compose_variants().items():
        for service_name, service in compose["services"].items():
            build = service["build"]
            context = (REPO / build["context"]).resolve()
            assert context.is_dir(), (name, service_name, context)
            dockerfile = context / build.get("dockerfile", "Dockerfile")
            assert dockerfile.is_file(), dockerfile
    copies = [
        line.split()[1:]
        for line in (REPO / "Dockerfile").read_text().splitlines()
        if line.startswith("COPY ")
    ]
    assert copies
    for words in copies:
        assert not any(w.startswith("--from") for w in words), words
        for source in words[:-1]:
            assert (REPO / source).exists(), f"COPY source {source!r} does not exist"
            top = source.rstrip("/")
            assert not any(fnmatch.fnmatch(top, pattern) for pattern in ignored), (
                f"COPY source {source!r} is excluded by .dockerignore"
            )
    # The generated protobuf code is never copied: the wheel build makes it from protos/.
    assert "pathways_lite/v1" in ignored


def test_ray_nodes_commands_parse_and_advertise_the_islands() -> None:
    for name, compose in _compose_variants().items():
        services = compose["services"]
        head = _ray_start(services["ray-head"]["command"])
        assert head["head"] and head["block"]
        assert head["port"] == controller_options.RAY_PORT
        assert _health_port(services["ray-head"]) == controller_options.RAY_PORT
        nodes = []
        for node_name in ISLAND_NODES:
            service = services[node_name]
            params = _ray_start(service["command"])
            assert params["block"], node_name
            assert params["address"] == f"ray-head:{controller_options.RAY_PORT}"
            assert params["node_manager_port"] == controller_options.RAY_NODE_MANAGER_PORT
            assert _health_port(service) == controller_options.RAY_NODE_MANAGER_PORT
            resources = json.loads(params["resources"])
            gpus = 0
            if name == "gpu":
                (device,) = service["deploy"]["resources"]["reservations"]["devices"]
                assert device["capabilities"] == ["gpu"] and device["driver"] == "nvidia"
                gpus = len(device["device_ids"])
            else:
                assert "deploy" not in service, "the CPU variant reserves no GPUs"
            nodes.append(
                {
                    "NodeManagerAddress": node_name,
                    "Resources": {"CPU": float(params["num_cpus"]), "GPU": gpus, **resources},
                }
            )
        islands = islands_from_nodes(nodes)
        assert [i.name for i in islands] == ["a", "b"], name
        for island in islands:
            assert island.num_hosts == 1
            assert island.platform == name
            assert island.devices_per_host == (1 if name == "gpu" else 2)


def test_controller_command_parses_and_agrees_with_the_ports() -> None:
    for name, compose in _compose_variants().items():
        service = compose["services"]["controller"]
        argv = service["command"]
        assert argv[:3] == ["python", "-m", "pathways_lite.controller"], argv
        args = controller_options.build_parser().parse_args(argv[3:])
        assert args.host == "0.0.0.0", "the controller listens on every interface of its container"
        assert args.port == controller_options.CONTROLLER_PORT
        # The published dashboard port is one the dashboard really listens on, on every
        # interface of the container (its default port 0 would pick a random one).
        assert args.dashboard_port == controller_options.DASHBOARD_PORT
        assert args.dashboard_host in (None, "0.0.0.0")
        assert args.ray_address == f"ray-head:{controller_options.RAY_PORT}"
        assert args.discover and args.join_ray_node
        assert args.node_ip == controller_options.AUTO_NODE_IP
        assert args.min_islands == len(ISLAND_NODES)
        assert args.state_dir == VOLUMES["state"]
        assert _health_port(service) == controller_options.CONTROLLER_PORT
        published = {}
        for mapping in service["ports"]:
            host_ip, host_port, container_port = str(mapping).split(":")
            assert host_ip == "127.0.0.1", f"{mapping!r} must publish on the host's localhost"
            published[int(container_port)] = int(host_port)
        assert published == {
            controller_options.CONTROLLER_PORT: controller_options.CONTROLLER_PORT,
            controller_options.DASHBOARD_PORT: controller_options.DASHBOARD_PORT,
        }, name
        # Only the controller publishes ports.
        others = [s for n, s in compose["services"].items() if n != "controller"]
        assert not any("ports" in s for s in others)


def test_volumes_and_environment_agree_with_the_code(monkeypatch) -> None:
    for compose in _compose_variants().values():
        for service_name, service in compose["services"].items():
            mounts = dict(v.split(":", 1) for v in service["volumes"])
            assert mounts == VOLUMES, service_name
            env = service["environment"]
            assert env[STATE_ENV] == VOLUMES["state"]
            # The tokenizer and dataset cache: read by the model package through this name.
            monkeypatch.setenv("PATHWAYS_LITE_CACHE", env["PATHWAYS_LITE_CACHE"])
            assert default_cache_dir() == Path(VOLUMES["datasets"])
            assert env["JAX_COMPILATION_CACHE_DIR"].startswith(VOLUMES["datasets"] + "/")
            unknown = {k for k in env if k.startswith("PATHWAYS_LITE_")} - {
                STATE_ENV,
                "PATHWAYS_LITE_CACHE",
            }
            assert not unknown, f"{service_name}: environment variables no code reads: {unknown}"


def _token_path(compose: dict) -> str:
    return compose["services"][TOKEN_SERVICE]["environment"]["RAY_AUTH_TOKEN_PATH"]


def test_every_ray_service_uses_the_same_ray_token() -> None:
    for name, compose in _compose_variants().items():
        services = compose["services"]
        path = _token_path(compose)
        for service_name in RAY_SERVICES:
            env = services[service_name]["environment"]
            # The same variables, with the same values, as LocalRayCluster's nodes get.
            assert {k: env.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")} == auth_env(
                path
            ), (name, service_name)
        controller = controller_options.build_parser().parse_args(
            services["controller"]["command"][3:]
        )
        assert controller.ray_token_file == path, "the controller's driver and node use it too"
        # The token lives on a named volume that the token service and every Ray service mount.
        (volume,) = [v for v, target in VOLUMES.items() if path.startswith(target + "/")]
        assert volume in compose["volumes"]
        for service_name in (TOKEN_SERVICE, *RAY_SERVICES):
            mounts = dict(v.split(":", 1) for v in services[service_name]["volumes"])
            assert mounts.get(volume) == VOLUMES[volume], (name, service_name)


def test_the_token_service_runs_once_before_every_ray_service() -> None:
    for name, compose in _compose_variants().items():
        services = compose["services"]
        token = services[TOKEN_SERVICE]
        # A one-shot: with the nodes' `unless-stopped` it would be restarted after it exits.
        assert token["restart"] == "no", name
        assert "depends_on" not in token and "healthcheck" not in token
        for service_name in RAY_SERVICES:
            depends = services[service_name]["depends_on"]
            assert depends[TOKEN_SERVICE] == {"condition": "service_completed_successfully"}, (
                name,
                service_name,
            )


def test_the_token_service_creates_the_token_if_missing_and_keeps_it(tmp_path) -> None:
    argv = _load(BASE)["services"][TOKEN_SERVICE]["command"]
    assert argv[:2] == ["python", "-c"], argv
    # Compose would interpolate `$...` in the script.
    assert not any("$" in arg for arg in argv)
    path = tmp_path / "state" / "ray_auth_token"
    env = {**os.environ, "RAY_AUTH_TOKEN_PATH": str(path)}

    def run() -> None:
        subprocess.run([sys.executable, *argv[1:]], env=env, check=True, timeout=60)

    run()
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) >= 0
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    run()
    assert path.read_text() == token, "an existing token is never overwritten"
    path.write_text("kept-as-is")
    run()
    assert path.read_text() == "kept-as-is"
    assert os.listdir(path.parent) == [path.name], "no temporary file is left behind"


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_health_checks_answer_under_ray_token_auth(ray_cluster) -> None:
    """The compose health checks, for real, against a token-auth GCS and its raylets.

    Ray (2.60) refuses its own RPCs without the token but serves grpc.health.v1 to anyone, so
    `pathways-lite health` needs no token, with or without RAY_AUTH_* in its environment.
    """
    import grpc
    import ray
    from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

    with grpc.insecure_channel(ray_cluster.address) as channel:
        with pytest.raises(grpc.RpcError) as refused:
            gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetAllNodeInfo(
                gcs_service_pb2.GetAllNodeInfoRequest(), timeout=10
            )
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, "token auth is on"
    raylets = [
        f"{n['NodeManagerAddress']}:{n['NodeManagerPort']}" for n in ray.nodes() if n["Alive"]
    ]
    assert len(raylets) == 3
    bare = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_")}
    with_token = {**bare, **auth_env(ray_cluster.token_path)}
    for env in (bare, with_token):
        for address in (ray_cluster.address, *raylets):
            result = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import sys; from pathways_lite.cli import main; sys.exit(main())",
                    "health",
                    "--address",
                    address,
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert result.returncode == 0, result.stdout + result.stderr
            assert result.stdout.strip() == f"{address} (server): SERVING"


def test_the_loopback_override_changes_only_what_a_loopback_machine_requires() -> None:
    """deploy/docker-compose.loopback.yml: each service on the host network at its own
    loopback address, a locally built base, builds on the host network; nothing else."""
    base = _load(BASE)["services"]
    override = _load(LOOPBACK)["services"]
    assert set(override) == set(base)
    own_ip = dict(entry.split(":") for entry in override["ray-head"]["extra_hosts"])
    for service_name, service in override.items():
        assert set(service) <= {
            "network_mode",
            "build",
            "extra_hosts",
            "command",
            "healthcheck",
        }, service_name
        assert service["build"] == {
            "network": "host",
            "args": {"BASE": "${PATHWAYS_LITE_BASE_IMAGE:-pathways-lite-base:bookworm}"},
        }
        hosts = dict(entry.split(":") for entry in service["extra_hosts"])
        assert hosts == own_ip, service_name
        assert set(hosts) == set(RAY_SERVICES), "every compose hostname resolves to loopback"
        assert all(ip.startswith("127.") and ip != "127.0.0.1" for ip in hosts.values())
        assert len(set(hosts.values())) == len(hosts), "one address per service"
        expected_mode = "none" if service_name == TOKEN_SERVICE else "host"
        assert service["network_mode"] == expected_mode, service_name
    assert "command" not in override[TOKEN_SERVICE]

    # Ray nodes: the base command plus the node's own loopback address; a node manager port
    # already taken on the shared network moves to a free one (and its health check with it).
    taken: set[int] = set()
    for service_name in ("ray-head", *ISLAND_NODES):
        argv, base_argv = override[service_name]["command"], base[service_name]["command"]
        params, base_params = _ray_start(argv), _ray_start(base_argv)
        assert params["node_ip_address"] == own_ip[service_name]
        changed = {k for k in params if params[k] != base_params[k]}
        assert changed <= {"node_ip_address", "node_manager_port"}, (service_name, changed)
        if service_name in ISLAND_NODES:
            port = params["node_manager_port"]
            assert port not in taken, f"{service_name}: node manager port {port} is taken"
            taken.add(port)
            health = override[service_name].get("healthcheck", base[service_name]["healthcheck"])
            assert _health_port({"healthcheck": health}) == port
        rest = [a for a in argv if not a.startswith(("--node-ip-address=", "--node-manager-port="))]
        assert rest == [a for a in base_argv if not a.startswith("--node-manager-port=")], (
            service_name
        )
    assert override["ray-head"].get("healthcheck") is None

    # The controller: its own Ray node address, and it listens exactly where
    # docker-compose.yml publishes its ports (the host network has nothing to publish).
    argv = override["controller"]["command"]
    assert argv[:3] == base["controller"]["command"][:3]
    args = controller_options.build_parser().parse_args(argv[3:])
    base_args = controller_options.build_parser().parse_args(base["controller"]["command"][3:])
    changed = {k for k, v in vars(args).items() if v != vars(base_args)[k]}
    assert changed == {"node_ip", "host", "dashboard_host"}, changed
    assert args.node_ip == own_ip["controller"]
    published = {}
    for mapping in base["controller"]["ports"]:
        host_ip, host_port, container_port = str(mapping).split(":")
        published[int(container_port)] = (host_ip, int(host_port))
    assert published[args.port] == (args.host, args.port)
    assert published[args.dashboard_port] == (args.dashboard_host, args.dashboard_port)
    assert "healthcheck" not in override["controller"]


def test_the_dockerfile_takes_its_base_as_a_build_argument() -> None:
    lines = (REPO / "Dockerfile").read_text().splitlines()
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms == ["FROM ${BASE}"]
    # The default for users with a registry is unchanged.
    assert "ARG BASE=python:3.11-slim" in lines[: lines.index(froms[0])]


def test_ci_runs_the_deployment_after_the_tests() -> None:
    ci = (REPO / ".ci" / "run").read_text()
    assert ci.index("make lint test") < ci.index("make deploy-test")
    script = REPO / "deploy" / "deploy-test.sh"
    assert os.access(script, os.X_OK) and os.access(REPO / "deploy" / "base-image.sh", os.X_OK)
    assert "deploy/deploy-test.sh" in (REPO / "Makefile").read_text()


def test_gpu_variant_builds_jax_for_cuda() -> None:
    gpu = _compose_variants()["gpu"]
    for service_name, service in gpu["services"].items():
        assert service["build"]["args"]["EXTRAS"] == "gpu", service_name
        assert service["image"] != _load(BASE)["services"][service_name]["image"]
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert any(req.startswith("jax[cuda12]") for req in extras["gpu"]), extras["gpu"]
    dockerfile = (REPO / "Dockerfile").read_text()
    assert "ARG EXTRAS" in dockerfile and "${EXTRAS:+[$EXTRAS]}" in dockerfile


@pytest.mark.parametrize("argv", [["up", "--ray-address", "ray-head:6379"], ["health"]])
def test_cli_parses_the_deployment_commands(argv) -> None:
    args = cli.build_parser().parse_args(argv)
    assert args.func is not None


def test_a_relative_state_dir_is_made_absolute(tmp_path, monkeypatch) -> None:
    """Checkpoint folders under the state directory are named to island hosts, whose
    working directories are their own: `--state-dir ./s` means this directory's `s`."""
    monkeypatch.chdir(tmp_path)
    args = controller_options.build_parser().parse_args(["--state-dir", "./s"])
    assert args.state_dir == str(tmp_path.resolve() / "s")
