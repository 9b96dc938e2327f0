"""``make_app`` on its own: no MeshServer, no DNS sockets, aiohttp's test client.

The app needs only an ``ApiContext`` (config, store, resolver):
this is how the API is unit-tested or embedded.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from aiohttp.test_utils import TestClient, TestServer

from meshdns.api.app import make_app
from meshdns.api.state import ApiContext
from meshdns.config import parse_config
from meshdns.core.answer import MessageHandler, Zone
from meshdns.core.registry import Registry
from meshdns.settings import registry_policy, zone_settings
from meshdns.store import RegistryStore, read_state


def fake_server(state_file: Path | None = None, **api: Any) -> ApiContext:
    raw: dict[str, Any] = {"api": api} if api else {}
    config = parse_config(raw, env={})
    settings = zone_settings(config, forwarding=False)
    resolver = MessageHandler(Zone(Registry.empty(), settings))
    store = RegistryStore(registry_policy(config), settings, resolver,
                          str(state_file) if state_file else None, clock=lambda: 1000.0)
    return ApiContext(config=config, store=store, handler=resolver)


def run(server: ApiContext, scenario: Any) -> None:
    async def main() -> None:
        async with TestClient(TestServer(make_app(server))) as client:
            await scenario(client)

    asyncio.run(main())


def test_make_app_serves_a_store_without_a_mesh_server(tmp_path: Path) -> None:
    server = fake_server(tmp_path / "state.json")

    async def scenario(client: TestClient) -> None:
        assert (await client.get("/readyz")).status == 503
        resp = await client.put("/v1/services", json={"services": [
            {"name": "a", "namespace": "b", "port": 1, "vip": "240.0.0.9"}]})
        assert resp.status == 200 and await resp.json() == {"revision": 1, "services": 1,
                                                               "changed": True}
        assert (await client.get("/readyz")).status == 200
        resp = await client.get("/v1/resolve", params={"name": "a.b.svc.1.mesh"})
        doc = await resp.json()
        assert doc["rule"] == "canonical" and doc["answer"][0]["data"] == "240.0.0.9"
        resp = await client.get("/v1/services", headers={"If-None-Match": '"1"'})
        assert resp.status == 304

    run(server, scenario)
    assert read_state(tmp_path / "state.json", server.store.policy, 0.0).revision == 1


def test_make_app_with_a_token(tmp_path: Path) -> None:
    server = fake_server(token="t0k3n")

    async def scenario(client: TestClient) -> None:
        assert (await client.get("/v1/services")).status == 401
        assert (await client.get("/healthz")).status == 200
        ok = await client.patch("/v1/services", json={"upsert": []},
                                headers={"Authorization": "Bearer t0k3n"})
        assert ok.status == 200

    run(server, scenario)
