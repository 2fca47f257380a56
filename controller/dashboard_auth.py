"""Access control of the dashboard's HTTP server: token, cookie, CSRF header, security headers.

Every route needs the controller's access token (controller/auth.py): `Authorization: Bearer
<token>`, or `?token=` once on a GET, which is traded for an HttpOnly, SameSite=Strict cookie
and a redirect to the same page without it (the token leaves the address bar and the history).
The cookie holds a value derived from the token (an HMAC), not the token, and its name holds
the dashboard's port: browsers send a host's cookies to every port of it, so another web
server on the machine would get the cookie, which opens this dashboard only (the token also
opens the API; a rotation of the token ends it with the old token's grace).
State-changing requests (cancel) also need the header `X-Pathways-Lite: 1`, which a cross-site
form cannot send; so does a generation (a GET that takes a serving slot) authorized by the
cookie alone. Every response carries headers that forbid framing, sniffing and scripts
from other origins, so an injected `<script>` would not run: they are added as each response
is prepared (`secure_every_response`), so the refusals raised here (401, 302, 403), the errors
raised by handlers and the event streams their handlers prepare themselves have them too.
"""

from __future__ import annotations

import re

from aiohttp import web

from pathways_lite.workers.auth import Credential, derive

from . import auth

COOKIE = "pathways_lite_session"  # the name's prefix: `_<port>` follows
COOKIE_LABEL = b"pathways-lite dashboard cookie"
CSRF_HEADER = "X-Pathways-Lite"
# GET routes that spend resources (a generation): a cookie alone does not authorize them.
_COSTLY_GET = re.compile(r"/api/jobs/[^/]+/generate")
# Where a request keeps whether its credential is still accepted (a callable): a stream
# (controller/dashboard_stream.py) asks again as it goes, and ends once a rotation's grace
# ended for it.
STILL_AUTHORIZED = "pathways_lite_still_authorized"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # Scripts only from this origin (no inline script): an injected <script> would not run.
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self' 'unsafe-eval'; style-src 'self' "
        "'unsafe-inline'; img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'"
    ),
}


def secure_every_response(app: web.Application) -> None:
    """Add the security headers a response does not set itself to every response of `app`,
    as it is prepared (a middleware sees neither a raised response nor the headers of a
    stream its handler has sent already)."""

    async def on_prepare(request: web.Request, response: web.StreamResponse) -> None:
        for name, value in SECURITY_HEADERS.items():
            response.headers.setdefault(name, value)

    app.on_response_prepare.append(on_prepare)


def token_middleware(token: str | auth.Credential | None):
    """An aiohttp middleware that lets through only requests carrying `token` (None: all, for
    tests of the pages only; the controller process always passes a token)."""

    @web.middleware
    async def middleware(request: web.Request, handler) -> web.StreamResponse:
        if token is None:
            return await handler(request)
        query_token = request.query.get("token")
        if query_token is not None and request.method == "GET":
            if not auth.matches(auth.bearer(query_token), token):
                raise _unauthorized()
            # Trade the token in the URL for a cookie, and drop it from the address bar.
            kept = [(k, v) for k, v in request.rel_url.query.items() if k != "token"]
            response = web.HTTPFound(str(request.rel_url.with_query(kept)))
            response.set_cookie(
                cookie_name(request),
                derive(query_token, COOKIE_LABEL),
                httponly=True,
                samesite="Strict",
                path="/",
                max_age=86400 * 30,
            )
            raise response
        presented = request.headers.get("Authorization")
        cookie = request.cookies.get(cookie_name(request))

        def authorized() -> bool:
            return auth.matches(presented, token) or (
                cookie is not None and _session(token).accepts(auth.bearer(cookie))
            )

        if not authorized():
            raise _unauthorized()
        request[STILL_AUTHORIZED] = authorized
        if request.method != "GET" and request.headers.get(CSRF_HEADER) != "1":
            raise web.HTTPForbidden(
                text=f"state-changing requests need the header '{CSRF_HEADER}: 1'.\n"
            )
        if (
            _COSTLY_GET.fullmatch(request.path)
            and not auth.matches(presented, token)
            and request.headers.get(CSRF_HEADER) != "1"
        ):
            # A GET that takes a serving slot (and cuts training for it): with the cookie
            # alone, a page of another port of this host (the same site: the cookie goes
            # along) could make the browser send it.
            raise web.HTTPForbidden(
                text=(
                    f"{request.path} needs 'Authorization: Bearer <token>' or, with the "
                    f"dashboard's cookie, the header '{CSRF_HEADER}: 1'.\n"
                )
            )
        return await handler(request)

    return middleware


def cookie_name(request: web.Request) -> str:
    """The session cookie's name on this dashboard: with the port the browser addressed."""
    return f"{COOKIE}_{request.url.port or 0}"


def _session(token: str | auth.Credential) -> Credential:
    """What a session cookie must match: the token's derived values (the current token's,
    and the previous one's while its grace lasts)."""
    credential = Credential(token) if isinstance(token, str) else token
    return credential.derived(COOKIE_LABEL)


def _unauthorized() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=(
            "401 Unauthorized: this dashboard needs the controller's access token. Open "
            "the URL that `pathways-lite dashboard` prints, or send 'Authorization: Bearer "
            "<token>' (the token is in <state_dir>/token).\n"
        ),
        headers={"WWW-Authenticate": 'Bearer realm="pathways-lite"'},
    )
