"""dns.workers steering: the kernel hands each UDP query to the socket of its CPU.

Real sockets in one SO_REUSEPORT group with the cBPF program attached; this
test's thread is pinned to one CPU at a time, and on loopback the packet is
received on the sending CPU, so where each datagram lands is exact.
"""

from __future__ import annotations

import collections
import os
import select
import socket

import pytest

from meshdns.dns.reuseport import allowed_cpus, cpu_program, steer_by_cpu

from ..support import pinned

linux_only = pytest.mark.skipif(not hasattr(os, "sched_setaffinity")
                                or not hasattr(socket, "SO_REUSEPORT"),
                                reason="needs Linux SO_REUSEPORT and sched_setaffinity")
two_cpus = pytest.mark.skipif(len(allowed_cpus()) < 2, reason="needs 2 CPUs")


def group(n: int, family: int = socket.AF_INET) -> list[socket.socket]:
    host = "127.0.0.1" if family == socket.AF_INET else "::1"
    socks: list[socket.socket] = []
    for _ in range(n):
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, socks[0].getsockname()[1] if socks else 0))
        socks.append(s)
    return socks


def landed(socks: list[socket.socket], cpus: list[int], per_cpu: int = 20
           ) -> dict[int, collections.Counter[int]]:
    """For each CPU: how many of ``per_cpu`` datagrams sent from it each socket got."""
    addr = socks[0].getsockname()[:2]
    out: dict[int, collections.Counter[int]] = {}
    with socket.socket(socks[0].family, socket.SOCK_DGRAM) as client:
        for cpu in cpus:
            with pinned(cpu):
                for i in range(per_cpu):
                    client.sendto(i.to_bytes(2, "big") + b"query", addr)
            seen: collections.Counter[int] = collections.Counter()
            while sum(seen.values()) < per_cpu:
                ready, _, _ = select.select(socks, [], [], 5)
                assert ready, f"only {sum(seen.values())} of {per_cpu} datagrams arrived"
                for s in ready:
                    s.recv(64)
                    seen[socks.index(s)] += 1
            out[cpu] = seen
    return out


@linux_only
@two_cpus
@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_each_cpu_reaches_its_own_socket(family: int) -> None:
    cpus = allowed_cpus()
    socks = group(2, family)
    try:
        assert steer_by_cpu(socks[1], 2)  # any socket of the group sets it for all
        counts = landed(socks, cpus)
        for position, cpu in enumerate(cpus):
            assert counts[cpu] == {position % 2: 20}, (cpu, counts)
    finally:
        for s in socks:
            s.close()


@linux_only
@two_cpus
def test_the_cpu_list_orders_the_sockets() -> None:
    # A cpuset such as {3, 7} is dealt out by position, not by CPU number (3 % 2 == 7 % 2).
    cpus = allowed_cpus()[:2]
    socks = group(2)
    try:
        assert steer_by_cpu(socks[0], 2, cpus=list(reversed(cpus)))
        counts = landed(socks, cpus)
        assert counts[cpus[0]] == {1: 20} and counts[cpus[1]] == {0: 20}
    finally:
        for s in socks:
            s.close()


@linux_only
@two_cpus
def test_a_missing_socket_falls_back_to_the_hash_and_loses_nothing() -> None:
    # The program says "socket 1" for the second CPU, but only one socket is bound (a
    # worker not started yet): the kernel's hash picks socket 0 instead of dropping.
    cpus = allowed_cpus()[:2]
    socks = group(1)
    try:
        assert steer_by_cpu(socks[0], 2, cpus=cpus)
        counts = landed(socks, cpus)
        assert counts[cpus[0]] == {0: 20} and counts[cpus[1]] == {0: 20}
    finally:
        socks[0].close()


def test_no_steering_where_it_cannot_spread_the_load() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        assert not steer_by_cpu(s, 1, cpus=[0, 1])  # one process: nothing to steer
        assert not steer_by_cpu(s, 3, cpus=[0, 1])  # more processes than CPUs: one idle


def test_program_shape() -> None:
    prog = cpu_program(2, [3, 7, 9])
    # load CPU; three (compare, return) pairs; then cpu mod 2 for any other CPU
    assert len(prog) == 1 + 2 * 3 + 2
    assert [p[3] for p in prog[1:7]] == [3, 0, 7, 1, 9, 0]
    assert prog[-2] == (0x94, 0, 0, 2)
