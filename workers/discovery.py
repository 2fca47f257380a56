"""Islands from a Ray cluster's node resources: the one place that reads the convention.

A node says which island it serves through custom Ray resources given to `ray start`:

- `island_<name>`: H. This node runs H hosts of island `<name>` (normally 1). An island's
  host count is the sum over the nodes that advertise it; more than one host joins them into
  one JAX runtime (`jax.distributed`).
- `island_<name>:devices`: D. Devices of island `<name>` on this node, split evenly over its
  H hosts. Optional: a GPU node defaults to its GPU count, a CPU node to 1 device per host.
- Platform: `gpu` when the node advertises GPUs (Ray's `GPU` resource; the hosts then ask
  Ray for `num_gpus`), `cpu` otherwise (a host process with D simulated XLA CPU devices).
- One island per GPU node by default: a node that advertises GPUs and no `island_*`
  resource is an island of its own, named `gpu-<node ip, dots as dashes>`, with one host
  owning all the node's GPUs (placed through Ray's built-in `node:<ip>` resource).

Example: `ray start --address=HEAD:6379 --resources='{"island_a": 1, "island_a:devices": 8}'`
on two GPU nodes makes island `a` of 2 hosts x 8 GPUs. `node_resources()` writes that JSON.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .island_host import IslandSpec
from .ray_cluster import island_resource

logger = logging.getLogger(__name__)

ISLAND_PREFIX = island_resource("")  # "island_"
DEVICES_SUFFIX = ":devices"
GPU_RESOURCE = "GPU"
DEFAULT_GPU_ISLAND_PREFIX = "gpu-"


class DiscoveryError(RuntimeError):
    """The cluster's island resources are inconsistent, or too few islands appeared."""


def devices_resource(name: str) -> str:
    """The Ray resource whose amount on a node is its number of devices of island `name`."""
    return f"{ISLAND_PREFIX}{name}{DEVICES_SUFFIX}"


def node_resources(island: str, *, hosts: int = 1, devices: int | None = None) -> dict[str, float]:
    """The custom resources a node advertises to serve `hosts` hosts of island `island`.

    Args:
        island: The island's name (letters, digits, '-' and '_').
        hosts: Hosts of the island on this node.
        devices: Devices of the island on this node (all hosts together); None leaves the
            default (the node's GPUs, or 1 per host on a CPU node).

    Returns:
        The mapping to pass as `ray start --resources=<json>`.
    """
    IslandSpec(island, num_hosts=hosts)  # validates the name and the count
    out = {island_resource(island): float(hosts)}
    if devices is not None:
        if devices < hosts or devices % hosts:
            raise ValueError(f"devices={devices} must be a positive multiple of hosts={hosts}.")
        out[devices_resource(island)] = float(devices)
    return out


@dataclass(frozen=True)
class _NodeShare:
    """What one node contributes to one island."""

    node_ip: str
    hosts: int
    devices_per_host: int
    platform: str


def _count(value: Any, what: str, node_ip: str) -> int:
    number = float(value)
    if number < 1 or not number.is_integer():
        raise DiscoveryError(
            f"node {node_ip} advertises {what}={value!r}; it must be a positive whole number."
        )
    return int(number)


def islands_from_nodes(nodes: Iterable[Mapping[str, Any]]) -> list[IslandSpec]:
    """The islands the nodes advertise, sorted by name (the controller's island order).

    Args:
        nodes: Ray node records as `ray.nodes()` returns them (`Alive`,
            `NodeManagerAddress`, `Resources`); dead nodes are ignored.

    Raises:
        DiscoveryError: a resource names an invalid island, a count is not a positive whole
            number, or the nodes of one multi-host island disagree on devices or platform.
    """
    shares: dict[str, list[_NodeShare]] = {}
    placement: dict[str, str] = {}
    for node in nodes:
        if not node.get("Alive", True):
            continue
        ip = str(node.get("NodeManagerAddress", "?"))
        resources: Mapping[str, float] = node.get("Resources", {}) or {}
        gpus = int(float(resources.get(GPU_RESOURCE, 0)))
        platform = "gpu" if gpus > 0 else "cpu"
        names = [
            key[len(ISLAND_PREFIX) :]
            for key in resources
            if key.startswith(ISLAND_PREFIX) and not key.endswith(DEVICES_SUFFIX)
        ]
        for key in resources:
            if key.startswith(ISLAND_PREFIX) and key.endswith(DEVICES_SUFFIX):
                if key[len(ISLAND_PREFIX) : -len(DEVICES_SUFFIX)] not in names:
                    raise DiscoveryError(
                        f"node {ip} advertises {key!r} without {key[: -len(DEVICES_SUFFIX)]!r}."
                    )
        if not names and gpus > 0:
            name = DEFAULT_GPU_ISLAND_PREFIX + ip.replace(".", "-").replace(":", "-")
            shares.setdefault(name, []).append(_NodeShare(ip, 1, gpus, "gpu"))
            placement[name] = f"node:{ip}"
            continue
        for name in names:
            hosts = _count(resources[island_resource(name)], island_resource(name), ip)
            default_devices = gpus if gpus > 0 else hosts
            key = devices_resource(name)
            devices = _count(resources.get(key, default_devices), key, ip)
            if devices % hosts:
                raise DiscoveryError(
                    f"node {ip} advertises {key}={devices:g}, which is not divisible by its "
                    f"{hosts} host(s) of island {name!r}."
                )
            if platform == "gpu" and devices > gpus:
                raise DiscoveryError(
                    f"node {ip} advertises {key}={devices:g} but only {gpus} GPU(s)."
                )
            shares.setdefault(name, []).append(_NodeShare(ip, hosts, devices // hosts, platform))
    islands = []
    for name in sorted(shares):
        parts = shares[name]
        kinds = {(p.devices_per_host, p.platform) for p in parts}
        if len(kinds) > 1:
            seen = ", ".join(f"{p.node_ip}: {p.devices_per_host} {p.platform}" for p in parts)
            raise DiscoveryError(
                f"the nodes of island {name!r} disagree on devices per host ({seen}); every "
                "host of one island must own the same number of devices of one platform."
            )
        try:
            islands.append(
                IslandSpec(
                    name,
                    num_hosts=sum(p.hosts for p in parts),
                    devices_per_host=parts[0].devices_per_host,
                    platform=parts[0].platform,
                    ray_resource=placement.get(name, ""),
                )
            )
        except ValueError as e:
            raise DiscoveryError(f"Ray resource {island_resource(name)!r}: {e}") from None
    return islands


def discover_islands(*, min_islands: int = 1, timeout_s: float = 0.0) -> list[IslandSpec]:
    """The islands of the Ray cluster this process is connected to (`ray.init` first).

    Args:
        min_islands: Wait until at least this many islands are advertised (nodes may still
            be joining).
        timeout_s: How long to wait for them.

    Raises:
        DiscoveryError: fewer than `min_islands` islands within `timeout_s`, or an
            inconsistent cluster (see `islands_from_nodes`).
    """
    import ray

    deadline = time.monotonic() + timeout_s
    while True:
        nodes = ray.nodes()
        islands = islands_from_nodes(nodes)
        if len(islands) >= min_islands:
            logger.info("discovered islands: %s", describe(islands))
            return islands
        if time.monotonic() >= deadline:
            alive = [n.get("NodeManagerAddress") for n in nodes if n.get("Alive", True)]
            raise DiscoveryError(
                f"the Ray cluster advertises {len(islands)} island(s) "
                f"({describe(islands) or 'none'}) on nodes {alive}, fewer than "
                f"min_islands={min_islands} after {timeout_s:g} s; start island nodes with "
                f"`ray start --resources='{{\"{ISLAND_PREFIX}NAME\": 1}}'` or on GPU machines."
            )
        time.sleep(0.5)


def describe(islands: Iterable[IslandSpec]) -> str:
    """`a (2 hosts x 8 gpu), b (1 host x 2 cpu)`."""
    return ", ".join(
        f"{i.name} ({i.num_hosts} host{'s' if i.num_hosts > 1 else ''} x "
        f"{i.devices_per_host} {i.platform})"
        for i in islands
    )


def island_flag(island: IslandSpec) -> str:
    """The controller's `--island NAME:HOSTS:DEVICES_PER_HOST` value of an island."""
    return f"{island.name}:{island.num_hosts}:{island.devices_per_host}"


def driver_node_ip(address: str) -> str | None:
    """The node address a Ray driver joining cluster `address` should use.

    A cluster on loopback addresses (a local simulation, head on 127.0.0.2) needs the
    driver pinned to the head's address, which Ray would otherwise replace by the machine's
    interface address; on a real cluster Ray's own choice (None) is right.
    """
    host = address.rsplit(":", 1)[0]
    try:
        if ipaddress.ip_address(host).is_loopback:
            return host
    except ValueError:  # a host name
        pass
    return None


def address_towards(address: str) -> str:
    """This machine's IP address on the route to `address` (`host:port`), as Ray picks it."""
    host, port = address.rsplit(":", 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((socket.gethostbyname(host), int(port)))  # UDP: nothing is sent
        return s.getsockname()[0]
