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
import contextlib
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from importlib import resources
from typing import Any

from aiohttp import hdrs, web
from aiohttp.http_exceptions import HttpProcessingError
from prometheus_client import CollectorRegistry

from ..config import HostPort
from ..metrics import CONTENT_TYPE, render
from .metrics import ApiCollector
from .resolve import resolve
from .services import get_services, patch_services, put_services
from .state import (
    AUDIT_KEY,
    STATE_KEY,
    ApiContext,
    ApiError,
    ApiState,
    error_response,
    not_loaded_reason,
)
from .stream import STREAM_KEY, StreamCollector, StreamHub

log = logging.getLogger("meshdns.api")
# aiohttp's own connection-level log: a request it could not parse comes here.
http_log = logging.getLogger("meshdns.api.http")

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
    # A watch stream counts itself (a delta) once it is open, not again when it ends.
    if op is not None and not response.prepared:
        state = request.app[STATE_KEY]
        state.count(op, response.status)
        if op in ("put", "patch"):
            audit(request, response)
    return response


def audit(request: web.Request, response: web.StreamResponse) -> None:
    """One line per registry write, whatever its outcome: who, what, result, revision."""
    fields: dict[str, Any] = {"remote": request.remote, "method": request.method,
                              "route": request.path, "status": response.status}
    fields.update(request.get(AUDIT_KEY, {}))
    if response.status != 200 and isinstance(response, web.Response) and response.body is not None:
        with contextlib.suppress(ValueError, TypeError, AttributeError):
            fields["error"] = json.loads(bytes(response.body))["error"]  # type: ignore[arg-type]
    log.info("registry write %s %s from %s: %d%s", request.method, request.path,
             request.remote, response.status,
             f", revision {fields['revision']}" if "revision" in fields else "",
             extra={"fields": fields, "fields_in_message": False})


def _auth_middleware(token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1" or request.path.startswith("/v1/"):
            # RFC 9110 11.1: the scheme is case-insensitive ("bearer" is "Bearer"), one
            # or more spaces before the credentials; the token itself is exact.
            scheme, _, credentials = request.headers.get(hdrs.AUTHORIZATION, "").partition(" ")
            given = credentials.lstrip(" ").encode("utf-8", "replace")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
                raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer "
                               "<api.token>)", None, {"WWW-Authenticate": 'Bearer realm="meshdns"'})
        return await handler(request)

    return auth


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


class _ClientErrorsQuiet(logging.Filter):
    """A request aiohttp cannot parse (a 1 MB query string, a broken header) is answered
    400 and the connection closed; that is the client's error, not a traceback at ERROR
    level in this server's log for each one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            log.debug("malformed HTTP request answered %d: %s", exc.code,
                      str(exc.message)[:200])
            return False
        return True


http_log.addFilter(_ClientErrorsQuiet())


async def readyz(request: web.Request) -> web.Response:
    """503 until a registry is loaded; a follower also once its last sync is too old,
    or at once when the leader refuses its token (a configuration error).

    A follower that refused what its leader sent (``follow.degraded``: a revision
    going back) stays ready: it serves the registry it had, which is what clients
    should get, until follow_max_staleness says that is too old."""
    server = request.app[STATE_KEY].server
    store = server.store
    drain = server.drain
    if drain is not None and drain.draining:
        return web.json_response({"ready": False, "reason": "draining: shutting down "
                                  f"(dns.lameduck {drain.lameduck:g} s)"}, status=503)
    if not store.loaded:
        body: dict[str, Any] = {"ready": False, "reason": not_loaded_reason(server)}
        config_error = getattr(server.follower, "config_error", None)
        if config_error:
            body["reason"] = f"{body['reason']}: {config_error}"
        return web.json_response(body, status=503)
    body = {"ready": True, "revision": store.revision, "services": len(store.registry)}
    follower = server.follower
    if follower is not None:
        limit = server.config.registry.follow_max_staleness
        since = follower.last_success or follower.started_at
        age = time.time() - since
        # The etcd mirror reports no error, config_error or degraded (getattr: None).
        body["follow"] = {"leader": follower.leader, "connected": follower.connected,
                          "last_success": follower.last_success,
                          "error": getattr(follower, "last_error", None),
                          "degraded": getattr(follower, "degraded", None)}
        config_error = getattr(follower, "config_error", None)
        if config_error:
            body.update(ready=False, reason=config_error)
            return web.json_response(body, status=503)
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
    """The API over ``server``'s store and message handler; testable alone with aiohttp's test
    client."""
    api = server.config.api
    middlewares: list[Any] = [errors_middleware]
    if api.token:
        middlewares.append(_auth_middleware(api.token))
    app = web.Application(client_max_size=api.max_body_bytes, middlewares=middlewares)
    state = ApiState(server)
    app[STATE_KEY] = state
    hub = app[STREAM_KEY] = StreamHub(state)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/v1/services", get_services)
    app.router.add_put("/v1/services", put_services)
    app.router.add_patch("/v1/services", patch_services)
    app.router.add_get("/v1/resolve", resolve)
    app.router.add_get("/v1/openapi.yaml", openapi)
    # /metrics: open, like /healthz (the auth middleware only guards /v1); on its own
    # listener instead when metrics.listen is set.
    if server.metrics is not None:
        server.metrics.register(ApiCollector(state))
        server.metrics.register(StreamCollector(hub))
        if server.config.metrics.listen is None:
            app.router.add_get("/metrics", metrics_route(server.metrics))

    async def on_startup(app: web.Application) -> None:
        state.watch.bind(asyncio.get_running_loop())
        server.store.listeners.append(state.watch.notify)
        hub.start()

    async def on_shutdown(app: web.Application) -> None:
        state.watch.close()  # release long-polls now, not after their ?wait= ran out
        await hub.stop()  # and end the streams

    async def on_cleanup(app: web.Application) -> None:
        if state.watch.notify in server.store.listeners:
            server.store.listeners.remove(state.watch.notify)

    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return app


def metrics_route(registry: CollectorRegistry) -> Handler:
    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=render(registry), headers={hdrs.CONTENT_TYPE: CONTENT_TYPE})

    return metrics


def make_metrics_app(state: ApiState, registry: CollectorRegistry) -> web.Application:
    """metrics.listen: /metrics and the probes, open and read-only, nothing of /v1."""
    app = web.Application(middlewares=[errors_middleware])
    app[STATE_KEY] = state
    app.router.add_get("/metrics", metrics_route(registry))
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


async def _serve(runner: web.AppRunner, hp: HostPort, what: str) -> HostPort:
    """Bind ``runner`` on ``hp``; the address actually bound (port 0 picks one)."""
    await runner.setup()
    site = web.TCPSite(runner, hp.host, hp.port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise OSError(exc.errno, f"cannot listen on {hp} ({what}): {exc.strerror}") from None
    sock = site._server.sockets[0]  # type: ignore[union-attr]
    return HostPort(hp.host, sock.getsockname()[1])


class ApiServer:
    """The registry API on api.listen, and /metrics with the probes on metrics.listen."""

    def __init__(self, server: ApiContext) -> None:
        self.server = server
        self.app = make_app(server)
        self.state = self.app[STATE_KEY]
        # handler_cancellation: a watcher that hangs up frees its slot at once.
        # keepalive_timeout: an idle connection, or one whose request never completes,
        # is closed after api.idle_timeout (aiohttp's default keeps it an hour).
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False,
                                    shutdown_timeout=5.0, handler_cancellation=True,
                                    keepalive_timeout=server.config.api.idle_timeout,
                                    logger=http_log)
        self.metrics_runner: web.AppRunner | None = None
        if server.metrics is not None and server.config.metrics.listen is not None:
            self.metrics_runner = web.AppRunner(make_metrics_app(self.state, server.metrics),
                                                access_log=None, handle_signals=False,
                                                shutdown_timeout=2.0,
                                                keepalive_timeout=server.config.api.idle_timeout,
                                                logger=http_log)
        self.address: HostPort | None = None
        self.metrics_address: HostPort | None = None

    async def start(self) -> None:
        config = self.server.config
        self.address = await _serve(self.runner, config.api.listen, "api.listen")
        if self.metrics_runner is not None and config.metrics.listen is not None:
            self.metrics_address = await _serve(self.metrics_runner, config.metrics.listen,
                                                "metrics.listen")

    async def stop(self) -> None:
        self.state.watch.close()
        await self.runner.cleanup()
        if self.metrics_runner is not None:
            await self.metrics_runner.cleanup()
