"""Access control of the dashboard's HTTP server: token, cookie, CSRF header, security headers.

Every route needs the controller's access token (controller/auth.py): `Authorization: Bearer
<token>`, or `?token=` once on a GET, which is traded for an HttpOnly, SameSite=Strict cookie
and a redirect to the same page without it (the token leaves the address bar and the history).
State-changing requests (cancel) also need the header `X-Pathways-Lite: 1`, which a cross-site
form cannot send. Every response carries headers that forbid framing, sniffing and scripts
from other origins, so an injected `<script>` would not run: they are added as each response
is prepared (`secure_every_response`), so the refusals raised here (401, 302, 403), the errors
raised by handlers and the event streams their handlers prepare themselves have them too.
"""

from __future__ import annotations

from aiohttp import web

from . import auth

COOKIE = "pathways_lite_token"
CSRF_HEADER = "X-Pathways-Lite"
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
                COOKIE, query_token, httponly=True, samesite="Strict", path="/", max_age=86400 * 30
            )
            raise response
        presented = request.headers.get("Authorization")
        cookie = request.cookies.get(COOKIE)
        if not (
            auth.matches(presented, token)
            or (cookie is not None and auth.matches(auth.bearer(cookie), token))
        ):
            raise _unauthorized()
        if request.method != "GET" and request.headers.get(CSRF_HEADER) != "1":
            raise web.HTTPForbidden(
                text=f"state-changing requests need the header '{CSRF_HEADER}: 1'.\n"
            )
        return await handler(request)

    return middleware


def _unauthorized() -> web.HTTPUnauthorized:
    return web.HTTPUnauthorized(
        text=(
            "401 Unauthorized: this dashboard needs the controller's access token. Open "
            "the URL that `pathways-lite dashboard` prints, or send 'Authorization: Bearer "
            "<token>' (the token is in <state_dir>/token).\n"
        ),
        headers={"WWW-Authenticate": 'Bearer realm="pathways-lite"'},
    )
