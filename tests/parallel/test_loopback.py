"""Issue 27: a simulated run listens on no outside address.

Every listening TCP socket of a run's processes (the launcher serving the store, and each rank's
gloo pairs) is read from the kernel's tables (/proc/net/tcp, /proc/net/tcp6 and /proc/<pid>/fd)
while the run is up, and must be on 127.0.0.1 or ::1. Linux only (/proc).
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import loopback_workers
import pytest
import sockets
import torch.distributed as dist

from moesys.parallel import simulate
from moesys.parallel.simulate import loopback_env, loopback_interface, serve_store

pytestmark = pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads Linux's /proc socket tables")


def test_the_socket_reader_sees_an_outside_listener_and_a_loopback_one():
    """The reader itself: a socket on all interfaces is found and is not loopback (so the checks
    below can fail), one on 127.0.0.1 is."""
    with socket.socket() as outside, socket.socket() as inside:
        outside.bind(("0.0.0.0", 0))
        outside.listen()
        inside.bind(("127.0.0.1", 0))
        inside.listen()
        out_port, in_port = outside.getsockname()[1], inside.getsockname()[1]
        mine = sockets.listening_of([os.getpid()])[os.getpid()]
    assert f"0.0.0.0:{out_port}" in mine and f"127.0.0.1:{in_port}" in mine
    assert not sockets.is_loopback(f"0.0.0.0:{out_port}") and not sockets.is_loopback(f":::{out_port}")
    assert sockets.is_loopback("127.0.0.1:5") and sockets.is_loopback("::1:5")


def test_serve_store_listens_on_loopback_only():
    store = serve_store(timeout_s=10)
    mine = sockets.listening_of([os.getpid()]).get(os.getpid(), [])
    assert f"127.0.0.1:{store.port}" in mine
    assert not [a for a in mine if a.endswith(f":{store.port}") and not sockets.is_loopback(a)], mine
    client = dist.TCPStore("127.0.0.1", store.port, is_master=False)
    client.set("k", "v")
    assert store.get("k") == b"v"
    del client, store


def test_the_outside_interface_has_an_outside_address():
    name = sockets.outside_interface()
    if name is None:
        pytest.skip("this machine has no interface with a non-loopback IPv4 address")
    assert name in {n for _, n in socket.if_nameindex()} and name != loopback_interface()


def test_loopback_env_names_the_loopback_interface():
    lo = loopback_interface()
    assert lo in {name for _, name in socket.if_nameindex()}
    assert loopback_env() == {"GLOO_SOCKET_IFNAME": lo, "NCCL_SOCKET_IFNAME": lo}


@pytest.mark.slow
@pytest.mark.multirank
def test_simulate_ranks_and_their_store_listen_on_loopback_only(monkeypatch):
    """parallel.simulate with the mesh's gloo subgroups: each rank reads its own listening sockets
    and its parent's (the store) while every rank is up. GLOO_SOCKET_IFNAME in the caller's
    environment names an outside interface (where the machine has one): the ranks stay on loopback."""
    outside_if = sockets.outside_interface()
    if outside_if is not None:
        monkeypatch.setenv("GLOO_SOCKET_IFNAME", outside_if)
    out = simulate(loopback_workers.listeners_after_groups, 2, timeout_s=60)
    assert [o["sum"] for o in out] == [2.0, 2.0]
    for r, o in enumerate(out):
        assert o["parent"], "the parent (serving the store) listens on nothing: the reader saw nothing"
        assert o["rank"], f"rank {r} listens on nothing: the reader missed gloo's sockets"
        outside = [a for a in o["rank"] + o["parent"] if not sockets.is_loopback(a)]
        assert not outside, f"rank {r} or its parent listens outside loopback: {outside}"


def test_world1_fixture_listens_on_loopback_only(world1):
    mine = sockets.listening_of([os.getpid()]).get(os.getpid(), [])
    assert mine and all(sockets.is_loopback(a) for a in mine), mine


@pytest.mark.slow
@pytest.mark.multirank
def test_moesys_train_with_two_simulated_ranks_listens_on_loopback_only(tmp_path):
    """A default-style `moesys-train` run (2 simulated ranks, tiny preset): the socket tables of
    the launcher and its ranks are polled until it ends; each must have been seen listening (the
    store, gloo) and all on loopback."""
    book = tmp_path / "book.txt"
    book.write_text("a small corpus of bytes for a few steps. " * 400)
    cmd = [sys.executable, "-m", "moesys.train", "preset=tiny", f"data.path={book}", "parallel.simulate_ranks=2", "parallel.ep=2",
           "trainer.steps=6", "trainer.eval_interval=100", "trainer.save_final=false",
           f"trainer.out_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    env = dict(os.environ)
    if sockets.outside_interface() is not None:  # a user's setting for multi-node runs: not for these
        env["GLOO_SOCKET_IFNAME"] = sockets.outside_interface()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: dict = {}
    try:
        while proc.poll() is None:
            for pid, addrs in sockets.listening_of(sockets.descendants(proc.pid)).items():
                seen.setdefault(pid, set()).update(addrs)
            time.sleep(0.05)
        output = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    assert proc.returncode == 0, output[-3000:]
    assert proc.pid in seen, f"the launcher was never seen listening (its store): {seen}"
    assert len(seen) >= 3, f"expected the launcher and 2 ranks listening, saw {seen}"
    outside = {pid: sorted(a for a in addrs if not sockets.is_loopback(a)) for pid, addrs in seen.items()}
    assert not any(outside.values()), f"listening outside loopback: {outside}"


@pytest.mark.slow
@pytest.mark.multirank
def test_simulate_ep_sh_runs_a_script_on_ranks_that_listen_on_loopback_only(tmp_path):
    """launchers/simulate_ep.sh 2 script.py: both ranks ran (their all-reduce summed 2), and each one,
    and the launcher serving the store, listened on loopback only. A rank that exits with 3 fails the
    launch (non-zero exit) instead of leaving its peer waiting."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "tests", "parallel", "loopback_script.py")
    env = {**os.environ, "PYTHON": sys.executable}
    if sockets.outside_interface() is not None:
        env["GLOO_SOCKET_IFNAME"] = sockets.outside_interface()
    r = subprocess.run([os.path.join(root, "launchers", "simulate_ep.sh"), "2", script, str(tmp_path)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    for rank in (0, 1):
        with open(tmp_path / f"rank{rank}.json") as f:
            o = json.load(f)
        assert o["sum"] == 2.0 and o["rank"] and o["launcher"], o
        outside = [a for a in o["rank"] + o["launcher"] if not sockets.is_loopback(a)]
        assert not outside, f"rank {rank} or the launcher listens outside loopback: {outside}"
    bad = subprocess.run([os.path.join(root, "launchers", "simulate_ep.sh"), "2", script, str(tmp_path / "x"), "1"],
                         capture_output=True, text=True, timeout=300, env=env)
    assert bad.returncode != 0 and "rank 1 of 2 failed with exit code 3" in bad.stderr, bad.stderr[-3000:]
