"""MeshServer.stop() lets go of what it started (issue 24's defect: the core's cache
hook kept the closed forwarder, its cache and its upstreams alive after stop)."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import dns.rcode

from meshdns.config import parse_config

from ..fake_upstream import FakeUpstream
from ..support import ServerThread, make_config, query


def test_stop_leaves_no_reference_to_the_forwarder(tmp_path: Path) -> None:
    with FakeUpstream() as fake:
        raw = make_config(tmp_path, {"dns": {"upstreams": [fake.address],
                                             "upstream_timeout": 1.0}})
        server = ServerThread(parse_config(raw, {})).start()
        try:
            reply = query(server, "www.example.com", timeout=5)
            assert reply.rcode() == dns.rcode.NOERROR
            forwarder = server.mesh.forwarder
            assert forwarder is not None and len(forwarder.cache) == 1
            gone = weakref.ref(forwarder)
            handler = server.mesh.handler
            assert handler.forward_cached is not None  # cache hits answered synchronously
            del forwarder
        finally:
            server.stop()
        gc.collect()
        assert gone() is None, [type(r) for r in gc.get_referrers(gone())]
        assert handler.forward_cached is None
        assert server.mesh.forwarder is None
