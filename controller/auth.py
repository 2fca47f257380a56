"""Access tokens of a controller: the token file in the state directory and the gRPC check.

`up` (the controller process) writes a random token to `<state_dir>/token` with mode 0600, or
keeps the one already there, so clients of a restarted controller keep working. Every gRPC call
and every HTTP request of the dashboard must carry it (`authorization: Bearer <token>`);
without it gRPC answers UNAUTHENTICATED and HTTP 401. The standard health service and server
reflection stay open, so probes and tooling (grpc_health_probe, grpcurl's `list`) work without
a secret: they reveal liveness and the public proto schema, never a job.

The controller also keeps the island hosts' cluster secret here (`<state_dir>/cluster_secret`,
mode 0600; workers/auth.py checks it on the hosts): another secret than the token, so a
client of the API can never call a host directly.
"""

from __future__ import annotations

import logging
import os
import secrets
import stat
from pathlib import Path

from pathways_lite.workers.auth import (  # noqa: F401 (bearer: the face's header)
    METADATA_KEY,
    OPEN_PREFIXES,
    AuthInterceptor,
    Credential,
    bearer,
    matches,
)

logger = logging.getLogger(__name__)

TOKEN_FILE = "token"
# The island hosts' credential (workers/auth.py), created beside the token.
CLUSTER_SECRET_FILE = "cluster_secret"


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


def cluster_secret_path(state_dir: str | Path) -> Path:
    """Where a state directory keeps the cluster secret of its island hosts."""
    return Path(state_dir) / CLUSTER_SECRET_FILE


def cluster_credential(state_dir: str | Path) -> Credential:
    """The island hosts' credential, from `<state_dir>/cluster_secret` (created, mode 0600,
    when absent: a restarted controller keeps the secret its running hosts hold).

    Raises:
        TokenError: the file exists but is empty, or others can read it.
    """
    return Credential(ensure_token(cluster_secret_path(state_dir)))


def read_cluster_credential(state_dir: str | Path) -> Credential:
    """The island hosts' credential of a running cluster (tools and tests that call a host).

    Raises:
        TokenError: the file is missing, empty, or readable by others.
    """
    return Credential(read_token(cluster_secret_path(state_dir)))


class TokenInterceptor(AuthInterceptor):
    """Refuses every call without the token (UNAUTHENTICATED), except health and reflection."""

    def __init__(self, token: str) -> None:
        from pathways_lite.v1 import controller_pb2

        super().__init__(
            lambda presented: matches(presented, token),
            "{method} needs the controller's access token (metadata 'authorization: Bearer "
            "<token>'); clients read it from <state_dir>/token.",
            [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"]],
        )
