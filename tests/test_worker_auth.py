"""Island hosts answer only the cluster: every WorkerService and ExchangeService call without
the cluster credential is UNAUTHENTICATED, a forged gradient chunk never reaches a mailbox, a
job keeps its losses while strangers call its hosts, and the secret leaks nowhere (issue 22).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import json
import secrets
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import jax
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways_lite.client import ControllerClient
from pathways_lite.controller import auth as controller_auth
from pathways_lite.controller import spec as spec_lib
from pathways_lite.controller.dispatch import Dispatcher
from pathways_lite.controller.islands import Island, connect_host
from pathways_lite.controller.resolved import palm_program
from pathways_lite.model.data import prepare_dataset
from pathways_lite.model.train import ReferenceTrainer
from pathways_lite.v1 import controller_pb2, worker_pb2, worker_pb2_grpc
from pathways_lite.workers.auth import Credential, host_channel
from pathways_lite.workers.host import HostMetadata
from pathways_lite.workers.island_host import IslandHostGroup, IslandSpec
from pathways_lite.workers.service import BackgroundServer, WorkerServicer
from pathways_lite.workers.tls import ClusterCA, TlsConfig
from pathways_lite.workers.tls import channel as tls_channel

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]

SERVICES = [
    worker_pb2.DESCRIPTOR.services_by_name["WorkerService"],
    worker_pb2.DESCRIPTOR.services_by_name["ExchangeService"],
]
# Every method of both services: (path, client streaming).
METHODS = [(f"/{s.full_name}/{m.name}", m.client_streaming) for s in SERVICES for m in s.methods]
STEPS, SEQ, BATCH = 4, 64, 4
FORGED_STEP = 10**6


def bad_credentials(secret: str) -> list[tuple[tuple[str, str], ...]]:
    """No metadata, a wrong secret, the right secret without its scheme, another scheme,
    the secret with a byte changed."""
    return [
        (),
        (("authorization", "Bearer " + secrets.token_urlsafe(32)),),
        (("authorization", secret),),
        (("authorization", "Basic " + secret),),
        (("authorization", "Bearer " + secret[:-1] + ("A" if secret[-1] != "A" else "B")),),
    ]


def forged_chunk(job_id: str, generation: int = 0) -> bytes:
    return worker_pb2.GradientChunk(
        job_id=job_id,
        generation=generation,
        step=FORGED_STEP,
        source_island=0,
        phase=1,
        part=1,
        offset=0,
        part_size=4,
        data=np.ones(4, "<f4").tobytes(),
    ).SerializeToString()


def call_raw(
    channel: grpc.Channel, path: str, streaming: bool, payload: bytes, metadata
) -> grpc.StatusCode:
    """The status of one call of `path` with raw request bytes (OK when it succeeded)."""
    try:
        if streaming:
            channel.stream_unary(path)(iter([payload]), metadata=metadata, timeout=10)
        else:
            channel.unary_unary(path)(payload, metadata=metadata, timeout=10)
    except grpc.RpcError as e:
        return e.code()
    return grpc.StatusCode.OK


def refused_round(
    address: str, secret: str, job_id: str, tls: TlsConfig | None = None
) -> collections.Counter:
    """Every method with every bad credential once (a forged chunk of `job_id` for the
    exchange; over TLS when `tls` wants it: the CA is no secret); the status codes seen."""
    codes: collections.Counter = collections.Counter()
    with tls_channel(address, tls) as channel:
        for path, streaming in METHODS:
            payload = forged_chunk(job_id) if streaming else b""
            for metadata in bad_credentials(secret):
                codes[call_raw(channel, path, streaming, payload, metadata)] += 1
    return codes


# ---- one in-process host --------------------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_host():
    """A worker service on 127.0.0.1 that requires a credential."""
    credential = Credential(secrets.token_urlsafe(32))
    devices = jax.devices()[:1]
    meta = HostMetadata.in_process("guarded", devices, 256 * 1024 * 1024)
    servicer = WorkerServicer(meta, devices, credential=credential)
    server = BackgroundServer(servicer, "127.0.0.1", 0)
    address = f"127.0.0.1:{server.start()}"
    try:
        yield servicer, address, credential
    finally:
        server.stop()


def test_every_method_without_the_credential_is_unauthenticated_and_health_stays_open(
    guarded_host,
) -> None:
    servicer, address, credential = guarded_host
    codes = refused_round(address, credential.secret, "ghost")
    assert codes == {grpc.StatusCode.UNAUTHENTICATED: len(METHODS) * 5}, codes
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "cluster credential" in err.value.details()
        assert credential.secret not in err.value.details()
    with host_channel(address, credential) as channel:
        info = worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest())
        assert info.island == "guarded"


def test_a_forged_chunk_is_refused_before_it_is_parsed_and_never_reaches_the_mailbox(
    guarded_host, monkeypatch
) -> None:
    servicer, address, credential = guarded_host
    delivered = []
    monkeypatch.setattr(servicer.exchange.mailbox, "deliver", delivered.append)
    (path,) = [p for p, _ in METHODS if p.endswith("/ExchangeGradients")]
    with grpc.insecure_channel(address) as channel:
        for metadata in bad_credentials(credential.secret):
            code = call_raw(channel, path, True, forged_chunk("ghost"), metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED
        assert delivered == []
        # Not even decoded: the byte counter, which parses every chunk it lets through, saw none.
        assert servicer.exchange.byte_counter.snapshot("ghost") == []
        # With the credential the same chunk gets past the door (to the job check).
        code = call_raw(channel, path, True, forged_chunk("ghost"), credential.metadata())
        assert code == grpc.StatusCode.NOT_FOUND
    assert servicer.exchange.byte_counter.snapshot("ghost") != []


def test_after_a_rotation_the_old_secret_is_accepted_for_the_grace_period_only(
    guarded_host,
) -> None:
    servicer, address, credential = guarded_host
    old = Credential(credential.secret)
    info = worker_pb2.InfoRequest()
    try:
        credential.rotate(secrets.token_urlsafe(32), grace_s=1.0)
        with host_channel(address, old) as stale, host_channel(address, credential) as fresh:
            assert worker_pb2_grpc.WorkerServiceStub(fresh).Info(info).island == "guarded"
            assert worker_pb2_grpc.WorkerServiceStub(stale).Info(info).island == "guarded"
            time.sleep(1.2)
            assert worker_pb2_grpc.WorkerServiceStub(fresh).Info(info).island == "guarded"
            with pytest.raises(grpc.RpcError) as err:
                worker_pb2_grpc.WorkerServiceStub(stale).Info(info)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        credential.update(old)
    assert "<hidden>" in repr(credential) and old.secret not in repr(credential)


# ---- two islands on two Ray nodes -----------------------------------------------------------


def job_spec() -> controller_pb2.JobSpec:
    spec = controller_pb2.JobSpec(
        name="guarded",
        islands=2,
        devices_per_island=1,
        mesh=controller_pb2.JobSpec.Mesh(data=1, model=1),
        train=controller_pb2.JobSpec.Train(steps=STEPS, global_batch=BATCH, seq_len=SEQ, seed=0),
        data=controller_pb2.JobSpec.Data(source="stdlib", vocab_size=1024, max_bytes=1_000_000),
    )
    spec.model.preset = "palm-tiny"
    spec.model.overrides.update({"n_layers": 1})
    return spec


class _Record:
    def __init__(self, id: str, spec) -> None:
        self.id, self.spec, self.generation = id, spec, 0


@pytest.fixture(scope="module")
def two_islands(ray_cluster, tmp_path_factory):
    """Islands east (node 127.0.0.3) and west (127.0.0.4), one host each, one credential,
    `--tls on`: loopback aliases stand for a network, every channel is TLS."""
    credential = Credential(secrets.token_urlsafe(32))
    ca = ClusterCA(tmp_path_factory.mktemp("tls"))
    groups = [
        IslandHostGroup(
            IslandSpec(name, devices_per_host=1),
            credential,
            issue_tls=lambda ip: ca.issue(ip, "on"),
        )
        for name in ("east", "west")
    ]
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            list(pool.map(lambda g: g.start(), groups))
        yield groups, credential, ray_cluster, ca
    finally:
        for g in groups:
            g.shutdown()


def test_over_tls_a_job_matches_the_reference_while_plaintext_and_strangers_are_refused(
    two_islands, tmp_path
) -> None:
    groups, credential, _, ca = two_islands
    tls = ca.client("on")
    addresses = [g.metadata[0].address for g in groups]
    assert [a.split(":")[0] for a in addresses] == ["127.0.0.3", "127.0.0.4"]
    # The channel is TLS: a plaintext client, or one trusting another CA, fails the handshake
    # (health included: it is open, but only over TLS).
    for wrong in (None, ClusterCA(tmp_path / "other").client("on")):
        with tls_channel(addresses[0], wrong) as channel:
            with pytest.raises(grpc.RpcError) as err:
                health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(), timeout=5
                )
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    with tls_channel(addresses[0], tls) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert reply.status == health_pb2.HealthCheckResponse.SERVING
    job_id = "guarded"
    spec = job_spec()
    stop = threading.Event()
    codes: collections.Counter = collections.Counter()
    rounds = [0]

    def strangers() -> None:
        while not stop.is_set() or rounds[0] < 2:
            for address in addresses:
                codes.update(refused_round(address, credential.secret, job_id, tls))
            rounds[0] += 1
            stop.wait(0.2)  # strangers, not a load test: leave the job its cores

    async def run() -> list:
        islands = [
            Island(g.island.name, [await connect_host(a, credential=credential, tls=tls)])
            for g, a in zip(groups, addresses, strict=True)
        ]
        try:
            dispatcher = Dispatcher(epoch=1)
            program = palm_program(_Record(job_id, spec))
            await dispatcher.load(program, islands)
            reports = []
            await dispatcher.run(program, islands, on_step=reports.append)
            await dispatcher.unload(job_id, islands)
            return reports
        finally:
            for island in islands:
                await island.close()

    thread = threading.Thread(target=strangers, daemon=True)
    thread.start()
    try:
        reports = asyncio.run(run())
    finally:
        stop.set()
        thread.join(120)
    assert set(codes) == {grpc.StatusCode.UNAUTHENTICATED}, codes
    assert rounds[0] >= 2 and sum(codes.values()) >= 2 * 2 * len(METHODS) * 5
    # The job's losses are the single-process reference's: no forged chunk was reduced in.
    configs = spec_lib.to_configs(spec)
    dataset = prepare_dataset(configs.data, seq_len=SEQ)
    trainer = ReferenceTrainer(configs.model, configs.optim, configs.train)
    reference = trainer.losses(lambda s: dataset.global_batch(s, BATCH, 0)[0])
    losses = np.asarray([r.loss for r in reports], np.float64)
    assert len(losses) == STEPS
    assert float(np.max(np.abs(losses - reference) / np.abs(reference))) <= 1e-5
    for report in reports:
        assert len({h.reply.param_digest for h in report.hosts}) == 1
    # No host ever counted (parsed) a chunk of the forged step.
    for address in addresses:
        with host_channel(address, credential, tls) as channel:
            stats = worker_pb2_grpc.WorkerServiceStub(channel).ExchangeStats(
                worker_pb2.ExchangeStatsRequest(job_id=job_id), timeout=30
            )
        steps = {s.step for s in stats.steps}
        assert FORGED_STEP not in steps and steps, steps


def _leaks(secret: str, *roots: Path, skip: tuple[Path, ...] = ()) -> list[str]:
    """Where `secret` appears: files below `roots`, process command lines and environments."""
    needle = secret.encode()
    found = []
    for root in roots:
        for path in root.rglob("*"):
            if path in skip or not path.is_file() or path.is_symlink():
                continue
            try:
                if needle in path.read_bytes():
                    found.append(str(path))
            except OSError:
                continue
    ps = subprocess.run(["ps", "-eww", "-o", "args"], capture_output=True, text=True).stdout
    if secret in ps:
        found.append("ps")
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            for name in ("cmdline", "environ"):
                try:
                    if needle in (proc / name).read_bytes():
                        found.append(f"{proc}/{name}")
                except OSError:
                    continue
    return found


def test_the_secret_is_in_no_ray_state_log_command_line_or_environment(two_islands) -> None:
    import ray
    from ray._private import state as ray_state

    _, credential, cluster, _ = two_islands
    secret = credential.secret
    accessor = ray_state.state._connect_and_get_accessor()
    actors = ray_state.actors()
    assert any(a["Name"] == "island-east-host-0" for a in actors.values())
    # What Ray's state API reads: the GCS actor table (raw, with each actor's creation task),
    # the task events, the nodes; none of them holds the secret.
    raw = [accessor.get_actor_info(ray.ActorID.from_hex(i)) or b"" for i in actors]
    raw += list(accessor.get_task_events())
    assert raw and not any(secret.encode() in blob for blob in raw)
    assert secret not in json.dumps([actors, ray.nodes()], default=str)
    assert _leaks(secret, Path(cluster.state_dir)) == []


def test_a_local_cluster_keeps_its_secret_out_of_logs_processes_and_the_dashboard(
    local_cluster,
) -> None:
    state_dir = Path(local_cluster.state_dir)
    path = controller_auth.cluster_secret_path(state_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    secret = controller_auth.read_cluster_credential(state_dir).secret
    assert secret != controller_auth.read_token(controller_auth.token_path(state_dir))
    token = controller_auth.read_token(controller_auth.token_path(state_dir))
    # The hosts require the secret: the API token does not open them.
    with ControllerClient(state_dir) as client:
        hosts = [h.address or f"{h.node}:{h.port}" for i in client.islands() for h in i.hosts]
    for address in hosts:
        with host_channel(address, Credential(token)) as channel:
            with pytest.raises(grpc.RpcError) as err:
                worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest())
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
    info = json.loads((state_dir / "controller.json").read_text())
    pages = ["", "api/overview", "api/jobs", "metrics"]
    for page in pages:
        request = urllib.request.Request(
            info["dashboard"] + page, headers={"Authorization": controller_auth.bearer(token)}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert secret.encode() not in response.read(), page
    assert _leaks(secret, state_dir, skip=(path,)) == []


ROTATE_SPEC = """\
name: rotate
model: {preset: palm-tiny}
islands: 1
devices_per_island: 2
mesh: {data: 1, model: 2}
train: {steps: 120, global_batch: 4, seq_len: 64, seed: 2}
data: {source: stdlib, vocab_size: 1024, max_bytes: 1000000}
"""


def _info(address: str, credential: Credential) -> grpc.StatusCode:
    with host_channel(address, credential) as channel:
        try:
            worker_pb2_grpc.WorkerServiceStub(channel).Info(worker_pb2.InfoRequest(), timeout=10)
        except grpc.RpcError as e:
            return e.code()
    return grpc.StatusCode.OK


def test_rotate_secret_keeps_a_job_running_and_old_secrets_work_only_for_the_grace(
    local_cluster, capsys
) -> None:
    from pathways_lite import cli
    from pathways_lite.client import ClientError, state_name
    from pathways_lite.spec import load_spec_text

    state = Path(local_cluster.state_dir)
    old_token = controller_auth.read_token(controller_auth.token_path(state))
    old_secret = controller_auth.read_cluster_credential(state).secret
    old_client = ControllerClient(state)
    try:
        hosts = [h.address for i in old_client.islands() for h in i.hosts]
        job = old_client.submit(load_spec_text(ROTATE_SPEC))
        deadline = time.monotonic() + 120
        while old_client.get(job.id).steps_completed < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        grace = 4.0
        rotated_at = time.monotonic()
        capsys.readouterr()
        code = cli.main(
            ["rotate-secret", "--grace", str(grace), "--state-dir", str(state), "--json"]
        )
        assert code == 0 and json.loads(capsys.readouterr().out)["rotated"] is True
        new_token = controller_auth.read_token(controller_auth.token_path(state))
        new_secret = controller_auth.read_cluster_credential(state).secret
        assert new_token != old_token and new_secret != old_secret
        for path in (controller_auth.token_path(state), controller_auth.cluster_secret_path(state)):
            assert path.stat().st_mode & 0o777 == 0o600
        # Mid-job, within the grace: old and new both open the API and the hosts.
        assert state_name(old_client.get(job.id).state) == "running"
        for secret in (old_secret, new_secret):
            assert {_info(a, Credential(secret)) for a in hosts} == {grpc.StatusCode.OK}
        with ControllerClient(state) as new_client:
            done = new_client.wait(job.id, timeout_s=240)
            assert state_name(done.state) == "succeeded", done.message
            time.sleep(max(0.0, rotated_at + grace + 0.5 - time.monotonic()))
            # After the grace: only the new ones.
            assert new_client.get(job.id).id == job.id
            with pytest.raises(ClientError) as err:
                old_client.get(job.id)
            assert err.value.code == grpc.StatusCode.UNAUTHENTICATED
        assert {_info(a, Credential(old_secret)) for a in hosts} == {
            grpc.StatusCode.UNAUTHENTICATED
        }
        assert {_info(a, Credential(new_secret)) for a in hosts} == {grpc.StatusCode.OK}
        assert _leaks(new_secret, state, skip=(controller_auth.cluster_secret_path(state),)) == []
    finally:
        old_client.close()


def test_a_new_ca_key_never_goes_into_an_old_key_file_others_can_read(tmp_path) -> None:
    """The CA certificate is gone and an old key file others can read is left: the new key
    is a new file of mode 0600 (before, it was written into the old readable file, and only
    the next start's check refused it)."""
    directory = tmp_path / "tls"
    ClusterCA(directory)
    (directory / "ca.pem").unlink()
    old_key = directory / "ca.key"
    old_key.chmod(0o644)
    ClusterCA(directory)
    assert (old_key.stat().st_mode & 0o777) == 0o600
    ClusterCA(directory)  # loads: not refused as readable by others
