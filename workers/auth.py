"""The cluster credential: what an island host accepts on every worker RPC and presents to peers.

The controller creates one random secret per cluster in its state directory (mode 0600,
controller/auth.py) and hands it to each island host when it starts the host, as an argument
of a Ray actor call (workers/island_host.py says why). Every call to a host's WorkerService
and ExchangeService carries `authorization: Bearer <secret>`; the host compares it in constant
time (`hmac.compare_digest`) with the secrets it accepts: the current one and, during a
rotation's grace period, the previous one. A call without a valid secret is answered
UNAUTHENTICATED before its request is parsed, so a forged gradient chunk is never decoded,
let alone filed in a mailbox. The standard health service and reflection stay open (liveness
and the public schema, never a job), as on the controller.

The secret never appears in a repr, a log line, an environment variable or a command line:
`Credential.__repr__` hides it, and refusals log the method only.
"""

from __future__ import annotations

import collections
import contextvars
import hashlib
import hmac
import logging
import threading
import time
from collections.abc import Callable, Iterable

import grpc
from google.protobuf.descriptor import ServiceDescriptor

logger = logging.getLogger(__name__)

METADATA_KEY = "authorization"
# Methods callable without a credential: liveness probes and schema discovery.
OPEN_PREFIXES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/")


def bearer(secret: str) -> str:
    """The `authorization` metadata value carrying `secret`."""
    return f"Bearer {secret}"


def matches(presented: str | None, secret: str | Credential) -> bool:
    """Whether an `authorization` value (`Bearer <secret>`) carries `secret` (constant time);
    given a `Credential`, any secret it accepts."""
    if not isinstance(secret, str):
        return secret.accepts(presented)
    if not presented or not secret:
        return False
    scheme, _, value = presented.partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(value.strip().encode(), secret.encode())


class Credential:
    """The cluster secret a host presents, and the secrets it accepts.

    A rotation has two steps, so that no call is refused while the cluster switches: first
    every side `also_accept(new)` (still presenting the old secret), then every side
    `rotate(new, grace_s)`: it presents `new` and accepts the old secret until the grace
    period ends, so calls signed by a peer or controller that has not switched yet still
    land. Thread-safe; picklable (Ray hands it to a host).

    Args:
        secret: The current secret.
        previous: A secret still accepted until `previous_until` (time.time()).
        previous_until: When `previous` stops being accepted.
    """

    def __init__(self, secret: str, previous: str = "", previous_until: float = 0.0) -> None:
        if not secret:
            raise ValueError("the cluster secret is empty.")
        self._secret = secret
        self._previous = previous
        self._previous_until = previous_until
        self._lock = threading.Lock()

    def __repr__(self) -> str:  # never the secret
        return "Credential(<hidden>)"

    def __getstate__(self) -> dict:
        with self._lock:
            return {"s": self._secret, "p": self._previous, "u": self._previous_until}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["s"], state["p"], state["u"])

    @property
    def secret(self) -> str:
        """The secret this side presents."""
        return self._secret

    def metadata(self) -> tuple[tuple[str, str], ...]:
        """Call metadata carrying the current secret."""
        return ((METADATA_KEY, bearer(self._secret)),)

    def accepts(self, presented: str | None) -> bool:
        """Whether an `authorization` value carries an accepted secret (constant time each)."""
        with self._lock:
            current, previous, until = self._secret, self._previous, self._previous_until
        ok = matches(presented, current)
        # Both comparisons run whatever the first answered: no timing hint of which matched.
        old = matches(presented, previous) and time.time() < until
        return ok or old

    def also_accept(self, secret: str) -> None:
        """Accept `secret` besides the current one (until `rotate`), still presenting ours."""
        with self._lock:
            self._previous, self._previous_until = secret, float("inf")

    def rotate(self, secret: str, grace_s: float) -> None:
        """Present `secret` from now on; accept the current one for `grace_s` more seconds."""
        if not secret:
            raise ValueError("the new cluster secret is empty.")
        with self._lock:
            if secret == self._secret:
                return
            self._previous, self._secret = self._secret, secret
            self._previous_until = time.time() + max(grace_s, 0.0)

    def derived(self, label: bytes) -> Credential:
        """A credential of secrets derived from these (HMAC-SHA256 of `label` keyed by each),
        accepted as long as they are: a value to hand out where the secret itself must not
        go (the dashboard's cookie)."""
        with self._lock:
            current, previous, until = self._secret, self._previous, self._previous_until
        return Credential(
            derive(current, label), derive(previous, label) if previous else "", until
        )

    def update(self, other: Credential) -> None:
        """Take `other`'s secrets (a controller handing a running host its credential)."""
        state = other.__getstate__()
        with self._lock:
            self._secret, self._previous, self._previous_until = state["s"], state["p"], state["u"]


def derive(secret: str, label: bytes) -> str:
    """HMAC-SHA256 of `label` keyed by `secret`, hex: tells nothing of the secret."""
    return hmac.new(secret.encode(), label, hashlib.sha256).hexdigest()


def method_kinds(services: Iterable[ServiceDescriptor]) -> dict[str, tuple[bool, bool]]:
    """Full method path -> (client streaming, server streaming) for the given services."""
    return {
        f"/{service.full_name}/{m.name}": (m.client_streaming, m.server_streaming)
        for service in services
        for m in service.methods
    }


# Within a server-streaming call `AuthInterceptor(recheck_streams_s=)` wraps: whether the
# credential it was opened with is still accepted (None outside one). A stream that sends
# nothing for a while checks it itself (controller/service.py), the wrapper only checks
# before a reply.
STREAM_REVOKED = "The credential this stream was opened with is no longer accepted (rotated)."
STILL_ACCEPTED: contextvars.ContextVar[Callable[[], bool] | None] = contextvars.ContextVar(
    "still_accepted", default=None
)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call whose `authorization` metadata `accepts` rejects (UNAUTHENTICATED),
    except health and reflection. The request of a refused call is never deserialized.

    Args:
        accepts: Whether an `authorization` value is valid (constant-time inside).
        message: The refusal's message, a sentence saying what is needed ({method} is filled).
        services: The served services, so a streaming method is refused with a handler of
            its own kind.
        recheck_streams_s: When given, a server-streaming call's credential is checked
            again before a reply, at most this often: a stream opened with a secret that
            stopped being accepted (a rotation's grace ended) ends UNAUTHENTICATED instead
            of serving on.
    """

    def __init__(
        self,
        accepts: Callable[[str | None], bool],
        message: str,
        services: Iterable[ServiceDescriptor],
        recheck_streams_s: float | None = None,
    ) -> None:
        self._accepts = accepts
        self._message = message
        self._kinds = method_kinds(services)
        self._recheck_s = recheck_streams_s
        self.refused = 0

    async def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        if method.startswith(OPEN_PREFIXES):
            return await continuation(handler_call_details)
        presented = None
        for key, value in handler_call_details.invocation_metadata or ():
            if key == METADATA_KEY:
                presented = value
                break
        if self._accepts(presented):
            handler = await continuation(handler_call_details)
            if self._recheck_s is None or handler is None or handler.request_streaming:
                return handler
            if not handler.response_streaming:
                return handler
            return self._rechecked(handler, presented, method)
        self.refused += 1
        logger.warning("refused %s: no valid credential", method)
        return refusal(self._message.format(method=method), *self._kinds.get(method, (0, 0)))

    def _rechecked(
        self, handler: grpc.RpcMethodHandler, presented: str | None, method: str
    ) -> grpc.RpcMethodHandler:
        """`handler` (server-streaming) with its caller's credential checked again before a
        reply, at most every `recheck_streams_s`."""
        behavior, accepts, every_s = handler.unary_stream, self._accepts, self._recheck_s
        message = self._message.format(method=method)

        async def stream(request, context):
            STILL_ACCEPTED.set(lambda: accepts(presented))  # (this call's task's context)
            replies = behavior(request, context)
            checked = time.monotonic()
            try:
                async for reply in replies:
                    if time.monotonic() - checked >= every_s:
                        checked = time.monotonic()
                        if not accepts(presented):
                            logger.warning("ended %s: its credential is no longer valid", method)
                            await context.abort(
                                grpc.StatusCode.UNAUTHENTICATED, f"{STREAM_REVOKED} {message}"
                            )
                    yield reply
            finally:
                await replies.aclose()

        return grpc.unary_stream_rpc_method_handler(
            stream,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def refusal(
    message: str, client_streaming: bool = False, server_streaming: bool = False
) -> grpc.RpcMethodHandler:
    """A handler that answers UNAUTHENTICATED with `message` without reading the request."""

    async def unary_out(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

    async def stream_out(request, context):
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)
        yield  # pragma: no cover (an async generator that aborts first)

    # No deserializer: raw bytes in (never parsed), nothing out.
    if client_streaming and server_streaming:
        return grpc.stream_stream_rpc_method_handler(stream_out)
    if client_streaming:
        return grpc.stream_unary_rpc_method_handler(unary_out)
    if server_streaming:
        return grpc.unary_stream_rpc_method_handler(stream_out)
    return grpc.unary_unary_rpc_method_handler(unary_out)


class CredentialMetadata(grpc.aio.UnaryUnaryClientInterceptor):
    """Adds the credential's current secret to every unary call of a channel (the controller's
    channels to its hosts; a rotation takes effect on the next call).
    Server-streaming calls (RunSlice) pass the metadata themselves."""

    def __init__(self, credential: Credential) -> None:
        self._credential = credential

    def _details(self, client_call_details):
        metadata = grpc.aio.Metadata(*(client_call_details.metadata or ()))
        metadata[METADATA_KEY] = bearer(self._credential.secret)
        return client_call_details._replace(metadata=metadata)

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(self._details(client_call_details), request)


def host_auth(credential: Credential) -> AuthInterceptor:
    """The interceptor refusing calls to an island host's services without the credential."""
    from pathways_lite.v1 import worker_pb2

    services = worker_pb2.DESCRIPTOR.services_by_name
    return AuthInterceptor(
        credential.accepts,
        "{method} needs the cluster credential (metadata 'authorization: Bearer <secret>'), "
        "which only the cluster's controller and island hosts hold.",
        [services["WorkerService"], services["ExchangeService"]],
    )


class _Details(
    collections.namedtuple(
        "_Details",
        ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"),
    ),
    grpc.ClientCallDetails,
):
    pass


class _SyncMetadata(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor):
    def __init__(self, credential: Credential) -> None:
        self._credential = credential

    def _details(self, d: grpc.ClientCallDetails) -> _Details:
        metadata = [*(d.metadata or ()), *self._credential.metadata()]
        return _Details(
            d.method, d.timeout, metadata, d.credentials, d.wait_for_ready, d.compression
        )

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):
        return continuation(self._details(client_call_details), request_iterator)


def host_channel(address: str, credential: Credential | None, tls=None) -> grpc.Channel:
    """A blocking channel to an island host whose calls carry `credential`, over TLS where
    `tls` (workers/tls.py's TlsConfig) wants it (tools, tests, benchmarks; the controller's
    own channels are grpc.aio, controller/islands.py)."""
    from .tls import channel as tls_channel

    channel = tls_channel(address, tls)
    if credential is None:
        return channel
    return grpc.intercept_channel(channel, _SyncMetadata(credential))
