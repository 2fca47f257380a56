"""Access tokens of a controller: the token file in the state directory and the gRPC check.

`up` (the controller process) writes a random token to `<state_dir>/token` with mode 0600, or
keeps the one already there, so clients of a restarted controller keep working. Every gRPC call
and every HTTP request of the dashboard must carry it (`authorization: Bearer <token>`);
without it gRPC answers UNAUTHENTICATED and HTTP 401. The standard health service and server
reflection stay open, so probes and tooling (grpc_health_probe, grpcurl's `list`) work without
a secret: they reveal liveness and the public proto schema, never a job.
"""

from __future__ import annotations

import hmac
import logging
import os
import secrets
import stat
from pathlib import Path

import grpc

logger = logging.getLogger(__name__)

TOKEN_FILE = "token"
METADATA_KEY = "authorization"
# Methods callable without the token: liveness probes and schema discovery.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


class TokenError(RuntimeError):
    """The token file is missing, unreadable or unsafe; the message says which."""


def token_path(state_dir: str | Path) -> Path:
    """Where a state directory keeps its access token."""
    return Path(state_dir) / TOKEN_FILE


def ensure_token(path: str | Path) -> str:
    """The token in `path`, creating the file (mode 0600) with a fresh random token if absent.

    Raises:
        TokenError: the file exists but is empty, or others can read it.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return read_token(path)
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    logger.info("wrote a new access token to %s", path)
    return token


def read_token(path: str | Path) -> str:
    """The token stored in `path`.

    Raises:
        TokenError: the file is missing, empty, or readable by other users.
    """
    path = Path(path)
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except OSError as e:
        raise TokenError(
            f"cannot read the access token file {str(path)!r}: {e.strerror}."
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TokenError(
            f"the access token file {str(path)!r} has mode {stat.S_IMODE(mode):o}; it must be "
            "readable by its owner only (chmod 600)."
        )
    if not token:
        raise TokenError(f"the access token file {str(path)!r} is empty.")
    return token


def bearer(token: str) -> str:
    return f"Bearer {token}"


def matches(presented: str | None, token: str) -> bool:
    """Whether an `authorization` value (`Bearer <token>`) carries `token` (constant time)."""
    if not presented:
        return False
    scheme, _, value = presented.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), token.encode())


class TokenInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call without the token (UNAUTHENTICATED), except health and reflection."""

    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        metadata = dict(handler_call_details.invocation_metadata or ())
        if matches(metadata.get(METADATA_KEY), self._token):
            return await continuation(handler_call_details)
        logger.warning("refused %s: no valid access token", method)
        return _refusal(method)


def _refusal(method: str) -> grpc.RpcMethodHandler:
    message = (
        f"{method} needs the controller's access token (metadata 'authorization: Bearer "
        "<token>'); clients read it from <state_dir>/token."
    )

    async def unary(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (an async generator that aborts first)

    # The request is never parsed: raw bytes in, nothing out. A streaming method answers with
    # the same status as a unary one.
    if _is_stream(method):
        return grpc.unary_stream_rpc_method_handler(stream)
    return grpc.unary_unary_rpc_method_handler(unary)


def _is_stream(method: str) -> bool:
    from pathways_lite.v1 import controller_pb2

    service = controller_pb2.DESCRIPTOR.services_by_name["ControllerService"]
    name = method.rsplit("/", 1)[-1]
    m = service.methods_by_name.get(name)
    return bool(m is not None and m.server_streaming)
