"""``dns.workers``: steer each UDP query to the worker of the CPU it arrived on.

With plain SO_REUSEPORT the kernel picks one of the group's sockets by a hash
of the client's address and port. A few busy client sockets then split
unevenly and at random (with four client sockets over two workers, one worker
gets everything one time in eight), and a worker is woken on whatever CPU the
scheduler finds, away from the packet.

Instead each process attaches a classic BPF program to its UDP socket's
reuseport group (SO_ATTACH_REUSEPORT_CBPF, Linux >= 4.5; the kernel selftest
``reuseport_bpf_cpu.c`` and Cloudflare's "perfect locality" write-up use the
same program) that returns the index of the socket for the CPU the packet is
being received on: the CPUs this process may run on, in order, dealt out
round-robin over the N sockets. On loopback that is the sending
application's CPU, on a NIC the CPU of its receive queue. A packet received
on a CPU outside that list is spread by ``cpu mod N``. An index with no
socket behind it (a worker not bound yet, or being restarted) makes the
kernel fall back to its hash, so no query is lost while a worker is missing.

Socket ``i`` of a group is the ``i``-th bound: the main process binds first
(index 0), worker ``w<i>`` after its first sync (index ``i``).
"""

from __future__ import annotations

import ctypes
import os
import socket
import struct
from collections.abc import Sequence

SO_ATTACH_REUSEPORT_CBPF = getattr(socket, "SO_ATTACH_REUSEPORT_CBPF", 51)
MAX_CPUS = 1000  # 2 instructions per CPU; the kernel takes at most 4096

# struct sock_filter {u16 code; u8 jt; u8 jf; u32 k}: <linux/filter.h>
_LD_W_ABS = 0x20  # BPF_LD | BPF_W | BPF_ABS
_SKF_AD_CPU = (-0x1000 + 36) & 0xFFFFFFFF  # SKF_AD_OFF + SKF_AD_CPU: the current CPU
_JEQ_K = 0x15  # BPF_JMP | BPF_JEQ | BPF_K
_RET_K = 0x06  # BPF_RET | BPF_K
_MOD_K = 0x94  # BPF_ALU | BPF_MOD | BPF_K
_RET_A = 0x16  # BPF_RET | BPF_A


def allowed_cpus() -> list[int]:
    """The CPUs this process may run on (its affinity mask, e.g. a container's cpuset)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def cpu_program(sockets: int, cpus: Sequence[int]) -> list[tuple[int, int, int, int]]:
    """The cBPF instructions: CPU ``cpus[i]`` -> socket ``i % sockets``, else cpu mod N."""
    insns = [(_LD_W_ABS, 0, 0, _SKF_AD_CPU)]
    for position, cpu in enumerate(cpus):
        insns.append((_JEQ_K, 0, 1, cpu))  # equal: fall through to the return
        insns.append((_RET_K, 0, 0, position % sockets))
    insns += [(_MOD_K, 0, 0, sockets), (_RET_A, 0, 0, 0)]
    return insns


def steer_by_cpu(sock: socket.socket, sockets: int, cpus: Sequence[int] | None = None) -> bool:
    """Attach the CPU program for a group of ``sockets`` to ``sock``'s reuseport group.

    Every process of the group attaches the same program; the group keeps one.
    Returns False, attaching nothing, where steering cannot spread the load:
    fewer than 2 sockets, or more sockets than CPUs (some would get nothing).
    Raises OSError where the kernel has no SO_ATTACH_REUSEPORT_CBPF.
    """
    cpus = allowed_cpus() if cpus is None else list(cpus)
    if sockets < 2 or sockets > len(cpus) or len(cpus) > MAX_CPUS:
        return False
    insns = cpu_program(sockets, cpus)
    code = b"".join(struct.pack("=HBBI", *i) for i in insns)
    buf = ctypes.create_string_buffer(code, len(code))
    prog = struct.pack("@HP", len(insns), ctypes.addressof(buf))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_CBPF, prog)
    return True
