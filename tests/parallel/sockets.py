"""Listening TCP sockets of processes, from the kernel's tables (Linux /proc), for the loopback tests.

/proc/net/tcp and /proc/net/tcp6 list every socket of the network namespace with its inode and state;
/proc/<pid>/fd links name the inodes a process holds ("socket:[12345]"). Module-level so spawned
ranks (loopback_workers) use the same reader as the test.
"""
from __future__ import annotations

import fcntl
import ipaddress
import os
import socket
import struct
from typing import Dict, Iterable, List, Optional, Set

LISTEN = "0A"  # TCP_LISTEN in include/net/tcp_states.h


def socket_inodes(pid: int) -> Set[int]:
    """Inodes of the sockets process `pid` holds (empty if it is gone)."""
    out = set()
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return out
    for n in names:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{n}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            out.add(int(link[len("socket:["):-1]))
    return out


def _address(hex_addr: str) -> ipaddress._BaseAddress:
    """/proc/net/tcp* prints addresses as 32-bit words in host (little-endian) byte order."""
    raw = bytes.fromhex(hex_addr)
    return ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))


def listening() -> Dict[int, str]:
    """{inode: "address:port"} of every listening TCP socket (IPv4 and IPv6) in this namespace."""
    out = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not os.path.exists(table):
            continue
        with open(table) as f:
            rows = f.read().splitlines()[1:]
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], int(fields[9])
            if state == LISTEN:
                addr, port = local.split(":")
                out[inode] = f"{_address(addr)}:{int(port, 16)}"
    return out


def listening_of(pids: Iterable[int]) -> Dict[int, List[str]]:
    """{pid: [its listening "address:port", ...]} for the given processes (those with none left out)."""
    table = listening()
    out = {}
    for pid in pids:
        mine = sorted(table[i] for i in socket_inodes(pid) if i in table)
        if mine:
            out[pid] = mine
    return out


def descendants(root: int) -> Set[int]:
    """root and every live process below it (from each process's parent pid in /proc/<pid>/stat)."""
    parent = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(name)] = int(stat.rpartition(")")[2].split()[1])  # the field after the state
    tree, grew = {root}, True
    while grew:
        more = {p for p, pp in parent.items() if pp in tree} - tree
        tree |= more
        grew = bool(more)
    return tree


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address.rpartition(":")[0]).is_loopback


def outside_interface() -> Optional[str]:
    """An interface of this machine with a non-loopback IPv4 address (None if there is none): the
    tests point GLOO_SOCKET_IFNAME at it to check that simulated ranks stay on loopback anyway."""
    SIOCGIFADDR = 0x8915  # linux/sockios.h
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(s.fileno(), SIOCGIFADDR, struct.pack("256s", name[:15].encode()))
            except OSError:  # no IPv4 address
                continue
            if not ipaddress.ip_address(raw[20:24]).is_loopback:
                return name
    return None
