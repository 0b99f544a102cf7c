"""The daemon as a process: SIGTERM under load, --state-dir across restarts, snapshot files."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from lvz.clients import Kvm, KvmError, abi
from lvz.daemon.state import file_name

from .daemon_fixtures import DaemonProcess, start_daemon


def lvz(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lvz.clients.cli", *args], capture_output=True, text=True, timeout=60
    )


def test_sigterm_with_runs_in_flight_releases_them_and_exits_fast() -> None:
    with start_daemon() as d:
        outcomes: list[str] = []

        def waiter(vcpu_id: int) -> None:
            with Kvm.connect(d.socket) as kvm:
                vm = kvm.open_vm("busy")
                vcpu = vm.open_vcpu(vcpu_id)
                ready.release()
                try:
                    vcpu.run(60)
                    outcomes.append("returned")
                except KvmError as err:
                    outcomes.append(f"{err.name}: {err.message}")
                except ConnectionError as err:
                    outcomes.append(f"lost: {err}")

        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name="busy")
            for i in range(4):
                vm.create_vcpu(i)
            ready = threading.Semaphore(0)
            threads = [threading.Thread(target=waiter, args=(i,)) for i in range(4)]
            for t in threads:
                t.start()
            for _ in threads:
                assert ready.acquire(timeout=10)
            time.sleep(0.2)  # the runs are parked in the daemon now
            start = time.monotonic()
            rc = d.stop()
            elapsed = time.monotonic() - start
        for t in threads:
            t.join(10)
        assert rc == 0
        assert elapsed < 1.0, elapsed
        assert not d.socket.exists()
        assert outcomes == ["EBADF: vcpu.run: the daemon is shutting down"] * 4


def test_idle_daemon_stops_well_under_a_second() -> None:
    with start_daemon() as d:
        start = time.monotonic()
        assert d.stop() == 0
        assert time.monotonic() - start < 1.0
        assert not d.socket.exists()


def test_state_dir_keeps_named_vms_across_restarts(sock_dir: Path) -> None:
    state = sock_dir / "state"
    with start_daemon("--state-dir", str(state)) as d:
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name="persist", max_phyid=4096)
            for vid, phyid in ((0, 4095), (9, 3)):
                vm.create_vcpu(vid).set_one_reg(abi.CPUID, phyid)
            vm.create_device("loongarch-ipi")
            kvm.create_vm(name="doomed")
            kvm.create_vm()  # unnamed: not persistent
        assert d.stop() == 0
    assert sorted(p.name for p in state.iterdir()) == sorted(
        file_name(n) for n in ("doomed", "persist")
    )
    with start_daemon("--state-dir", str(state)) as d:
        with Kvm.connect(d.socket) as kvm:
            assert sorted(str(v.name) for v in kvm.list_vms()) == ["doomed", "persist"]
            vm = kvm.open_vm("persist")
            assert vm.phyid_map().entries == ((3, 9), (4095, 0))
            assert vm.info().devices == ("loongarch-ipi",)
            kvm.open_vm("doomed").destroy()
        assert d.stop() == 0
    assert [p.name for p in state.iterdir()] == [file_name("persist")]


def test_snapshot_and_restore_commands(sock_dir: Path) -> None:
    with start_daemon() as d:
        sock = ["--socket", str(d.socket)]
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name="src")
            for vid in range(3):
                vm.create_vcpu(vid).set_one_reg(abi.CPUID, 10 + vid)
            vm.create_device("loongarch-eiointc")
        f = sock_dir / "src.lvz"
        r = lvz("snapshot", "src", str(f), *sock)
        assert r.returncode == 0, r.stderr
        assert lvz("restore", str(f), "--name", "dst", *sock).returncode == 0
        r = lvz("restore", str(f), *sock)
        assert r.returncode == 1
        assert "EEXIST" in r.stderr
        f.with_name("cut.lvz").write_bytes(f.read_bytes()[:40])
        r = lvz("restore", str(f.with_name("cut.lvz")), "--name", "cut", *sock)
        assert r.returncode == 1
        assert "EINVAL" in r.stderr
        assert lvz("snapshot", "nonesuch", str(f), *sock).returncode == 1
        with Kvm.connect(d.socket) as kvm:
            assert sorted(str(v.name) for v in kvm.list_vms()) == ["dst", "src"]
            assert kvm.open_vm("dst").phyid_map().entries == ((10, 0), (11, 1), (12, 2))


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_peers_of_another_uid_are_refused(own_daemon: DaemonProcess) -> None:
    os.chmod(own_daemon.socket, 0o777)  # open the file mode: SO_PEERCRED must still refuse
    os.chmod(own_daemon.socket.parent, 0o755)
    code = (
        "import os, socket, msgpack\n"
        "os.setgid(65534); os.setuid(65534)\n"
        f"s = socket.socket(socket.AF_UNIX); s.connect({str(own_daemon.socket)!r})\n"
        "s.sendall(msgpack.packb([0, 1, 'kvm.list_vms', {}]))\n"
        "u = msgpack.Unpacker(); data = s.recv(65536); u.feed(data)\n"
        "print(list(u)); print(s.recv(100) == b'')\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0, r.stderr
    assert "'protocol_error'" in r.stdout
    assert "'EPERM'" in r.stdout
    assert r.stdout.strip().endswith("True")  # and the daemon hung up


def serve_cmd(sock: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "lvz.clients.cli", "serve", "--socket", str(sock), *extra]


def test_ready_notification_comes_after_the_socket_is_bound(sock_dir: Path) -> None:
    import socket as _socket

    notify = sock_dir / "notify"
    sock = sock_dir / "d.sock"
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM) as rx:
        rx.bind(str(notify))
        rx.settimeout(15)
        proc = subprocess.Popen(
            serve_cmd(sock),
            env={**os.environ, "NOTIFY_SOCKET": str(notify)},
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            assert rx.recv(100) == b"READY=1"
            with Kvm.connect(sock) as kvm:  # bound and serving at the moment it said so
                assert kvm.get_api_version() == 12
                assert len(kvm.info.device_types) == 3  # plugins loaded
        finally:
            proc.terminate()
            assert proc.wait(10) == 0


def test_stale_socket_is_replaced_but_a_live_daemon_or_a_file_is_not(sock_dir: Path) -> None:
    import socket as _socket

    sock = sock_dir / "d.sock"
    stale = _socket.socket(_socket.AF_UNIX)
    stale.bind(str(sock))  # bound, never listening, then abandoned: a crashed daemon's file
    stale.close()
    with start_daemon() as live:
        r = subprocess.run(serve_cmd(live.socket), capture_output=True, text=True, timeout=30)
        assert r.returncode == 125
        assert "already serving" in r.stderr
        with Kvm.connect(live.socket) as kvm:  # and the live one is untouched
            assert kvm.get_api_version() == 12
    proc = subprocess.Popen(serve_cmd(sock), stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 15
        while True:
            try:
                with Kvm.connect(sock) as kvm:
                    assert kvm.get_api_version() == 12
                break
            except ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
    plain = sock_dir / "not-a-socket"
    plain.write_text("precious")
    r = subprocess.run(serve_cmd(plain), capture_output=True, text=True, timeout=30)
    assert r.returncode == 125
    assert "not a socket" in r.stderr
    assert plain.read_text() == "precious"
