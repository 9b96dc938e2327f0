"""Forged replies (RFC 5452) never get an answer cached or served.

A slow upstream that is also the attacker: for every query it gets, it first sends a
forged reply (the same question, ``A 6.6.6.6``, a random ID that is not the query's)
from its own address and port to EVERY port of the kernel's ephemeral range
(/proc/sys/net/ipv4/ip_local_port_range), then the real answer. The forgeries come
from exactly the address a reply must come from and carry the question asked, so
only the port and the ID stand between them and the cache; they reach the pool
socket the query went out on (counted as ``wrong_id``) before the real answer does.

The flood reaches every UDP port of the host's loopback, so it runs in a private
network namespace (``unshare -n``; tests/netns.py), where nothing else listens.
"""

from __future__ import annotations

import json
import random
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import dns.message
import dns.rrset

from ..netns import require_namespaces, run_in_namespaces, sh

NAMES = [f"n{i}.spoof.test." for i in range(1, 9)]
FORGED = "6.6.6.6"


def real_address(name: str) -> str:
    return f"192.0.2.{int(name.split('.')[0][1:])}"


def test_a_forged_reply_flood_never_gets_an_answer_cached_or_served(tmp_path: Path) -> None:
    require_namespaces()
    res = run_in_namespaces([sys.executable, "-m", "tests.system.test_forward_spoof", str(tmp_path)],
                            tmp_path, timeout=180)
    low, high = res["range"]
    print(json.dumps({k: v for k, v in res.items() if k not in ("first", "again", "resolve")}))
    for name in NAMES:
        assert res["first"][name] == [real_address(name)], name
        assert res["again"][name] == [real_address(name)], name  # from the cache
        assert res["resolve"][name] == [real_address(name)], name
    assert res["upstream_queries"] == len(NAMES)  # each asked once, then cached
    assert res["forged_tried"] == len(NAMES) * (high - low)  # every port but its own, per query
    assert res["forged_failed"] < res["forged_tried"] // 100
    # The forgeries did reach the sockets the queries went out on, and were dropped.
    assert res["rejected"].get("wrong_id", 0) >= len(NAMES)
    assert len(set(res["source_ports"])) >= 2  # drawn from the pool, not one port


class ForgingUpstream:
    """The slow upstream and the attacker, on one UDP socket."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        low, high = (int(x) for x in
                     Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        self.range = (low, high)
        self.forged_tried = 0  # forged replies sent (a few may fail: ENOBUFS)
        self.forged_failed = 0
        self.queries = 0
        self.source_ports: list[int] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            data, client = self.sock.recvfrom(65535)
            query = dns.message.from_wire(data)
            self.queries += 1
            self.source_ports.append(client[1])
            name = query.question[0].name.to_text()
            forged = dns.message.make_response(query)
            forged.answer.append(dns.rrset.from_text(name, 3600, "IN", "A", FORGED))
            wire = bytearray(forged.to_wire())
            low, high = self.range
            for port in range(low, high + 1):
                if port == self.port:
                    continue
                qid = random.getrandbits(16)
                while port == client[1] and qid == query.id:
                    qid = random.getrandbits(16)  # a blind attacker: never the real ID
                wire[0:2] = qid.to_bytes(2, "big")
                self.forged_tried += 1
                try:
                    self.sock.sendto(wire, ("127.0.0.1", port))
                except OSError:
                    self.forged_failed += 1
            time.sleep(0.05)  # slow: the real answer comes last
            real = dns.message.make_response(query)
            real.answer.append(dns.rrset.from_text(name, 300, "IN", "A", real_address(name)))
            self.sock.sendto(real.to_wire(), client)


def addresses(reply: dns.message.Message) -> list[str]:
    return sorted(r.address for rrset in reply.answer for r in rrset)


def inside(directory: Path) -> int:
    """Inside the namespace: the upstream, meshdns, the queries; results.json out."""
    from meshdns.config import parse_config

    from ..apiclient import call
    from ..support import ServerThread, make_config

    sh("ip", "link", "set", "lo", "up")
    upstream = ForgingUpstream()
    raw = make_config(directory, {"dns": {"upstreams": [f"127.0.0.1:{upstream.port}"],
                                          "upstream_timeout": 20.0}})
    server = ServerThread(parse_config(raw)).start()
    out: dict[str, Any] = {"range": upstream.range, "first": {}, "again": {}, "resolve": {}}
    try:
        host, port = server.dns_addr()
        # A connected client socket: the flood also reaches the client's own port, and
        # a stub resolver takes only meshdns's replies (the kernel filters the source).
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(60)
            s.connect((host, port))
            sent: dict[int, str] = {}
            # All in flight at once: each flood also hits the others' sockets.
            for name in NAMES:
                q = dns.message.make_query(name, "A")
                sent[q.id] = name
                s.send(q.to_wire())
            while len(out["first"]) < len(NAMES):
                reply = dns.message.from_wire(s.recv(65535))
                assert sent[reply.id] == reply.question[0].name.to_text()
                out["first"][reply.question[0].name.to_text()] = addresses(reply)
            for name in NAMES:
                s.send(dns.message.make_query(name, "A").to_wire())
                reply = dns.message.from_wire(s.recv(65535))
                out["again"][name] = addresses(reply)
        for name in NAMES:
            doc = json.loads(call(server.api_url, "GET", f"/v1/resolve?name={name}").body)
            out["resolve"][name] = sorted(a["data"] for a in doc["answer"])
        fwd = server.mesh.forwarder
        assert fwd is not None
        out["rejected"] = dict(fwd.rejected)
    finally:
        server.stop()
    out["forged_tried"] = upstream.forged_tried
    out["forged_failed"] = upstream.forged_failed
    out["upstream_queries"] = upstream.queries
    out["source_ports"] = upstream.source_ports
    (directory / "results.json").write_text(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(inside(Path(sys.argv[1])))
