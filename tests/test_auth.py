"""Access control on the session's LocalCluster: gRPC without the token is UNAUTHENTICATED
(health and reflection stay open for probes), HTTP without it is 401, the token file is
private, and the user-facing ports bind 127.0.0.1.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from pathways_lite.controller import auth
from pathways_lite.v1 import controller_pb2, controller_pb2_grpc

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]


def _token(cluster) -> str:
    return auth.read_token(auth.token_path(cluster.state_dir))


def _dashboard(cluster) -> str:
    return json.loads((cluster.state_dir / "controller.json").read_text())["dashboard"]


def _http(url: str, headers: dict[str, str] | None = None, method: str = "GET"):
    """(status, headers, body) of a request; redirects are not followed."""

    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    opener = urllib.request.build_opener(NoRedirect)
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with opener.open(request, timeout=10) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def test_grpc_without_the_token_is_unauthenticated(local_cluster) -> None:
    token = _token(local_cluster)
    with grpc.insecure_channel(local_cluster.address) as channel:
        stub = controller_pb2_grpc.ControllerServiceStub(channel)
        for metadata in ((), ((auth.METADATA_KEY, "Bearer wrong"),), (("authorization", token),)):
            with pytest.raises(grpc.RpcError) as unary:
                stub.ListJobs(controller_pb2.ListJobsRequest(), timeout=10, metadata=metadata)
            assert unary.value.code() == grpc.StatusCode.UNAUTHENTICATED
            assert "access token" in unary.value.details()
            with pytest.raises(grpc.RpcError) as streaming:
                list(
                    stub.WatchJob(
                        controller_pb2.WatchJobRequest(job_id="x"), timeout=10, metadata=metadata
                    )
                )
            assert streaming.value.code() == grpc.StatusCode.UNAUTHENTICATED
        good = ((auth.METADATA_KEY, auth.bearer(token)),)
        reply = stub.ListIslands(controller_pb2.ListIslandsRequest(), timeout=10, metadata=good)
        assert [i.id for i in reply.islands] == ["island-0"]
        # Health stays open for probes (it says nothing about jobs).
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service=""), timeout=10
        )
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_http_without_the_token_is_401(local_cluster) -> None:
    base = _dashboard(local_cluster)
    token = _token(local_cluster)
    for path in ("", "api/jobs", "api/overview", "metrics", "static/plotly.min.js", "api/stream"):
        status, headers, _ = _http(base + path)
        assert status == 401, path
        assert headers["WWW-Authenticate"].startswith("Bearer")
        status, _, _ = _http(base + path, {"Authorization": "Bearer wrong"})
        assert status == 401, path
    status, _, body = _http(base + "api/jobs?limit=1", {"Authorization": auth.bearer(token)})
    assert status == 200 and "jobs" in json.loads(body)
    # A wrong ?token= is refused; the right one becomes an HttpOnly, SameSite cookie and the
    # token leaves the address bar.
    assert _http(base + "?token=wrong")[0] == 401
    status, headers, _ = _http(base + f"?token={token}&x=1")
    assert status == 302 and "token" not in headers["Location"] and "x=1" in headers["Location"]
    cookie = headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    status, _, _ = _http(base + "api/overview", {"Cookie": cookie.split(";")[0]})
    assert status == 200
    # The cookie holds no token (browsers send it to every port of the host, and the token
    # also opens the API), and its name holds this dashboard's port.
    name, value = cookie.split(";")[0].split("=", 1)
    port = base.rstrip("/").rsplit(":", 1)[1]
    assert name == f"pathways_lite_session_{port}" and token not in cookie
    for forged in (f"{name}={token}", f"pathways_lite_session_1={value}"):
        assert _http(base + "api/overview", {"Cookie": forged})[0] == 401, forged
    # State changes also need the custom header a cross-site form cannot send.
    status, _, _ = _http(
        base + "api/jobs/x/cancel", {"Authorization": auth.bearer(token)}, method="POST"
    )
    assert status == 403


def test_token_file_is_private_and_ports_are_loopback(local_cluster, tmp_path) -> None:
    path = auth.token_path(local_cluster.state_dir)
    assert path.stat().st_mode & 0o777 == 0o600
    assert local_cluster.address.startswith("127.0.0.1:")
    assert _dashboard(local_cluster).startswith("http://127.0.0.1:")
    # A fresh token file is created 0600 and kept on a second call; a readable one is refused.
    fresh = tmp_path / "token"
    first = auth.ensure_token(fresh)
    assert fresh.stat().st_mode & 0o777 == 0o600 and auth.ensure_token(fresh) == first
    fresh.chmod(0o644)
    with pytest.raises(auth.TokenError, match="chmod 600"):
        auth.read_token(fresh)
