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

import json
import logging
import os
import secrets
import signal
import stat
import time
from collections.abc import Callable
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


# How often a stream's token is checked again (before a reply), and a dashboard stream's.
RECHECK_STREAMS_S = 1.0


class TokenInterceptor(AuthInterceptor):
    """Refuses every call without the token (UNAUTHENTICATED), except health and reflection."""

    def __init__(self, token: str) -> None:
        from pathways_lite.v1 import controller_pb2

        super().__init__(
            lambda presented: matches(presented, token),
            "{method} needs the controller's access token (metadata 'authorization: Bearer "
            "<token>'); clients read it from <state_dir>/token.",
            [controller_pb2.DESCRIPTOR.services_by_name["ControllerService"]],
            # A watch or log stream opened with a token rotated away ends with its grace.
            recheck_streams_s=RECHECK_STREAMS_S,
        )


# ---- rotation (`pathways-lite rotate-secret`) -----------------------------------------------
# The CLI writes a request (`rotate.json`: an id and the grace period) and sends the
# controller SIGHUP; the controller rotates both secrets without stopping a job and answers
# in `rotate.result.json`. A signal and two files, not an rpc: rotation works with the state
# dir alone (the controller's own machine), even when the token is what leaked.
ROTATE_REQUEST = "rotate.json"
ROTATE_RESULT = "rotate.result.json"
DEFAULT_GRACE_S = 300.0


def write_secret(path: str | Path, secret: str) -> None:
    """Replace the secret in `path` atomically (written aside with mode 0600, then renamed)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    os.replace(tmp, path)


def rotate_secrets(
    token_file: str | Path,
    secret_file: str | Path,
    token: Credential,
    cluster: Credential,
    groups: list,
    grace_s: float,
) -> None:
    """Replace the access token and the cluster secret; both old ones stay accepted for
    `grace_s` seconds. Blocking (Ray calls), so run it off the event loop.

    The hosts first accept the new cluster secret beside the old one (every peer still
    presents the old), then the controller and every host present the new one: no call is
    refused while the cluster switches, and running jobs never notice. A host that does not
    answer is skipped (its island restarts with the group's credential, which is this one).
    """
    new_token, new_secret = secrets.token_urlsafe(32), secrets.token_urlsafe(32)
    both = Credential(cluster.secret)
    both.also_accept(new_secret)
    _hand_to_hosts(groups, both)
    write_secret(secret_file, new_secret)
    write_secret(token_file, new_token)
    cluster.rotate(new_secret, grace_s)
    _hand_to_hosts(groups, cluster)
    token.rotate(new_token, grace_s)
    logger.warning("rotated the access token and the cluster secret (grace %.0f s)", grace_s)


def _hand_to_hosts(groups: list, credential: Credential) -> None:
    import ray

    for group in groups:
        try:
            ray.get([a.set_credential.remote(credential) for a in group.actors], timeout=30)
        except Exception as e:  # a dead host restarts with the group's (rotated) credential
            logger.warning("island %s did not take the credential: %r", group.island.name, e)


def answer_rotation(state_dir: str | Path, rotate: Callable[[float], None]) -> None:
    """Serve a rotation request found in `state_dir` (on SIGHUP): run `rotate(grace_s)` and
    write the result for the CLI."""
    request_path = Path(state_dir) / ROTATE_REQUEST
    try:
        request = json.loads(request_path.read_text())
        request_path.unlink()
    except (OSError, ValueError):
        request = {"id": "", "grace_s": DEFAULT_GRACE_S}
    result = {"id": request.get("id", ""), "ok": True, "message": ""}
    try:
        grace = float(request.get("grace_s", DEFAULT_GRACE_S))
        if not 0 <= grace <= 7 * 86400:
            raise ValueError(f"grace_s={grace:g} must be between 0 and 604800 seconds.")
        rotate(grace)
        result["grace_s"] = grace
    except Exception as e:
        logger.exception("rotation failed")
        result.update(ok=False, message=str(e))
    tmp = Path(state_dir) / f".{ROTATE_RESULT}"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, Path(state_dir) / ROTATE_RESULT)


def request_rotation(state_dir: str | Path, grace_s: float, timeout_s: float = 60.0) -> dict:
    """Ask the controller of `state_dir` to rotate its secrets; its answer (`ok`, `message`,
    `grace_s`).

    Raises:
        TokenError: no controller runs there, or it did not answer within `timeout_s`.
    """
    from .standby import controller_of

    state_dir = Path(state_dir)
    try:
        pid = int(json.loads((state_dir / "controller.json").read_text())["pid"])
    except (OSError, ValueError, KeyError) as e:
        raise TokenError(
            f"no controller is running for state dir {str(state_dir)!r}: {e}."
        ) from None
    # A stale controller.json's pid may be another process's by now: signal only ours.
    if not controller_of(pid, state_dir):
        raise TokenError(
            f"no controller is running for state dir {str(state_dir)!r}: its controller.json "
            f"names pid {pid}, which is not a controller of that state dir (a stale record); "
            "start one with `pathways-lite up`."
        )
    request_id = secrets.token_hex(8)
    result_path = state_dir / ROTATE_RESULT
    result_path.unlink(missing_ok=True)
    tmp = state_dir / f".{ROTATE_REQUEST}"
    tmp.write_text(json.dumps({"id": request_id, "grace_s": grace_s}))
    os.replace(tmp, state_dir / ROTATE_REQUEST)
    try:
        os.kill(pid, signal.SIGHUP)
    except ProcessLookupError:
        raise TokenError(
            f"the controller of state dir {str(state_dir)!r} (pid {pid}) stopped."
        ) from None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            result = json.loads(result_path.read_text())
            if result.get("id") == request_id:
                return result
        except (OSError, ValueError):
            pass
        time.sleep(0.1)
    raise TokenError(f"the controller (pid {pid}) did not rotate within {timeout_s:g} s.")
