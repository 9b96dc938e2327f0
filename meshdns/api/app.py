"""aiohttp application: ``make_app`` builds it, ``ApiServer`` serves it on api.listen.

Routes (docs/openapi.yaml describes each):

  GET /healthz, /readyz            open (so is /metrics, once the metrics module adds it)
  GET|PUT|PATCH /v1/services       registry sync           } bearer token when api.token
  GET /v1/resolve                  explain a name          } is set; 401 otherwise
  GET /v1/openapi.yaml             this API's description  }

Every error, including aiohttp's own 404/405, is ``{"error": ..., "field": ...}``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import hdrs, web

from ..config import HostPort
from ..metrics import CONTENT_TYPE, render
from .metrics import ApiCollector
from .resolve import resolve
from .services import get_services, patch_services, put_services
from .state import STATE_KEY, ApiContext, ApiError, ApiState, error_response

log = logging.getLogger("meshdns.api")

OPENAPI_RESOURCE = "openapi.yaml"  # canonical copy; docs/openapi.yaml must be identical
SYNC_OPS = {hdrs.METH_PUT: "put", hdrs.METH_PATCH: "patch"}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _sync_op(request: web.Request) -> str | None:
    """The ``op`` label of sync_requests_total for this request, if it is a sync one."""
    if request.path != "/v1/services":
        return None
    if request.method == hdrs.METH_GET:
        if "since" in request.query:
            return "delta"
        return "watch" if "wait" in request.query else "get"
    return SYNC_OPS.get(request.method)


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """JSON error bodies for everything, sync request counting, no 500 without a log."""
    try:
        response = await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, exc.field, exc.headers)
        if exc.status == 413:
            response.force_close()  # do not read (and discard) the rest of a huge body
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {k: v for k, v in exc.headers.items()
                   if k not in (hdrs.CONTENT_TYPE, hdrs.CONTENT_LENGTH)}
        response = error_response(exc.status, exc.reason, None, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s %s failed", request.method, request.path)
        response = error_response(500, "internal error (logged)")
    op = _sync_op(request)
    if op is not None:
        request.app[STATE_KEY].count(op, response.status)
    return response


def _auth_middleware(token: str) -> Any:
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            given = request.headers.get(hdrs.AUTHORIZATION, "").encode("utf-8", "replace")
            if not hmac.compare_digest(given, expected):
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer "
                               "<api.token>)", None, {"WWW-Authenticate": 'Bearer realm="meshdns"'})
        return await handler(request)

    return auth


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """503 until a registry is loaded; a follower also once its last sync is too old."""
    server = request.app[STATE_KEY].server
    store = server.store
    if not store.loaded:
        return web.json_response({"ready": False, "reason": "no registry loaded yet"},
                                 status=503)
    body: dict[str, Any] = {"ready": True, "revision": store.revision,
                            "services": len(store.registry)}
    follower = server.follower
    if follower is not None:
        limit = server.config.registry.follow_max_staleness
        since = follower.last_success or follower.started_at
        age = time.time() - since
        body["follow"] = {"leader": follower.leader, "connected": follower.connected,
                          "last_success": follower.last_success}
        if age > limit:
            body.update(ready=False, reason=f"no successful sync with the leader for {age:.0f} s "
                        f"(registry.follow_max_staleness {limit:g} s)")
            return web.json_response(body, status=503)
    return web.json_response(body)


def openapi_text() -> str:
    return resources.files(__package__).joinpath(OPENAPI_RESOURCE).read_text(encoding="utf-8")


async def openapi(request: web.Request) -> web.Response:
    return web.Response(text=openapi_text(), content_type="application/yaml")


def make_app(server: ApiContext) -> web.Application:
    """The API over ``server``'s store and resolver; testable alone with aiohttp's test
    client."""
    api = server.config.api
    middlewares: list[Any] = [errors_middleware]
    if api.token:
        middlewares.append(_auth_middleware(api.token))
    app = web.Application(client_max_size=api.max_body_bytes, middlewares=middlewares)
    state = ApiState(server)
    app[STATE_KEY] = state
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/services", get_services)
    app.router.add_put("/v1/services", put_services)
    app.router.add_patch("/v1/services", patch_services)
    app.router.add_get("/v1/resolve", resolve)
    app.router.add_get("/v1/openapi.yaml", openapi)
    # /metrics: open, like /healthz (the auth middleware only guards /v1).
    metrics_registry = server.metrics
    if metrics_registry is not None:
        metrics_registry.register(ApiCollector(state))

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=render(metrics_registry),
                                headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})

        app.router.add_get("/metrics", metrics)

    async def on_startup(app: web.Application) -> None:
        state.watch.bind(asyncio.get_running_loop())
        server.store.listeners.append(state.watch.notify)

    async def on_shutdown(app: web.Application) -> None:
        state.watch.close()  # release long-polls now, not after their ?wait= ran out

    async def on_cleanup(app: web.Application) -> None:
        if state.watch.notify in server.store.listeners:
            server.store.listeners.remove(state.watch.notify)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


class ApiServer:
    def __init__(self, server: ApiContext) -> None:
        self.server = server
        self.app = make_app(server)
        self.state = self.app[STATE_KEY]
        # handler_cancellation: a watcher that hangs up frees its slot at once.
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=5.0, handler_cancellation=True)
        self.address: HostPort | None = None

    async def start(self) -> None:
        await self.runner.setup()
        hp = self.server.config.api.listen
        site = web.TCPSite(self.runner, hp.host, hp.port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.address = HostPort(hp.host, sock.getsockname()[1])

    async def stop(self) -> None:
        self.state.watch.close()
        await self.runner.cleanup()
