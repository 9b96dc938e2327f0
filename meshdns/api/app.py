"""aiohttp application: ``make_app`` builds it, ``ApiServer`` serves it on api.listen."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from ..config import HostPort

if TYPE_CHECKING:
    from ..server import MeshServer

SERVER_KEY = web.AppKey("meshdns_server", object)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    server: MeshServer = request.app[SERVER_KEY]  # type: ignore[assignment]
    if not server.store.loaded:
        return web.json_response({"ready": False, "reason": "no registry loaded yet"},
                                 status=503)
    return web.json_response({"ready": True, "revision": server.store.revision})


def make_app(server: MeshServer) -> web.Application:
    app = web.Application(client_max_size=server.config.api.max_body_bytes)
    app[SERVER_KEY] = server
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    return app


class ApiServer:
    def __init__(self, server: MeshServer) -> None:
        self.server = server
        self.app = make_app(server)
        self.runner = web.AppRunner(self.app, access_log=None, handle_signals=False)
        self.address: HostPort | None = None

    async def start(self) -> None:
        await self.runner.setup()
        hp = self.server.config.api.listen
        site = web.TCPSite(self.runner, hp.host, hp.port, reuse_address=True)
        await site.start()
        sock = site._server.sockets[0]  # type: ignore[union-attr]
        self.address = HostPort(hp.host, sock.getsockname()[1])

    async def stop(self) -> None:
        await self.runner.cleanup()
