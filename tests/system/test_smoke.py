from __future__ import annotations

import dns.rcode

from ..support import ServerThread, query


def test_demo_name_answers_over_udp_and_tcp(demo_server: ServerThread) -> None:
    for tcp in (False, True):
        reply = query(demo_server, "frontend.kong.svc.80.mesh", "A", tcp=tcp)
        assert reply.rcode() == dns.rcode.NOERROR
        assert [r.address for r in reply.answer[0]] == ["240.0.0.7"]
