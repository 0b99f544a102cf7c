"""Whatever one connection does, only that connection ends (issue 8, the critical crash).

Each scenario runs against a real ``lvz serve`` on a real socket, with a watcher VM on another
connection: afterwards the daemon still answers, and the watcher's VM is as it was.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgpack
import pytest

from lvz.clients import Kvm, abi

from .daemon_fixtures import DaemonProcess, start_daemon, unique_name


@pytest.fixture
def daemon() -> Iterator[DaemonProcess]:
    with start_daemon() as d:
        yield d
        assert d.proc.poll() is None, d.log_text()
    assert d.proc.returncode == 0, d.log_text()


def _raw_subscriber(path: Path, vm_name: str) -> socket.socket:
    """A bare socket that opened ``vm_name`` and subscribed to it (handle 1)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(os.fspath(path))
    s.sendall(msgpack.packb([0, 1, "kvm.open_vm", {"name": vm_name}]))
    s.sendall(msgpack.packb([0, 2, "vm.subscribe", {"vm": 1}]))
    unpacker = msgpack.Unpacker()
    answered = 0
    s.settimeout(5)
    while answered < 2:
        unpacker.feed(s.recv(65536))
        for msg in unpacker:
            if msg[0] == 1:
                assert msg[2] is None, msg
                answered += 1
    return s


def _storm(path: Path, vm_name: str, stop: threading.Event) -> threading.Thread:
    """Line changes on vCPU 0 of ``vm_name`` as fast as one client drives them."""

    def run() -> None:
        with Kvm.connect(path) as kvm:
            vcpu = kvm.open_vm(vm_name).open_vcpu(0)
            while not stop.is_set():
                vcpu.interrupt(3)
                vcpu.interrupt(-3)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _assert_still_serving(daemon: DaemonProcess, watcher: str) -> None:
    assert daemon.proc.poll() is None, daemon.log_text()
    with Kvm.connect(daemon.socket) as kvm:
        vm = kvm.open_vm(watcher)
        assert vm.phyid_lookup(7) == 0
        assert vm.open_vcpu(0).get_one_reg(abi.CPUID) == 7


@pytest.fixture
def scene(daemon: DaemonProcess) -> Iterator[tuple[DaemonProcess, str, str]]:
    """A watcher VM (vCPU 0 holds CPUID 7) and a busy VM with one vCPU, both named."""
    watcher, busy = unique_name("watch"), unique_name("busy")
    with Kvm.connect(daemon.socket) as kvm:
        w = kvm.create_vm(name=watcher)
        w.create_vcpu(0).set_one_reg(abi.CPUID, 7)
        kvm.create_vm(name=busy).create_vcpu(0)
    yield daemon, watcher, busy
    _assert_still_serving(daemon, watcher)


def _during_storm(
    scene: tuple[DaemonProcess, str, str], act: Callable[[DaemonProcess, str], None], rounds: int
) -> None:
    daemon, _, busy = scene
    stop = threading.Event()
    t = _storm(daemon.socket, busy, stop)
    try:
        for _ in range(rounds):
            act(daemon, busy)
    finally:
        stop.set()
        t.join(10)


def test_half_closed_subscriber_then_one_line_change(scene: tuple[DaemonProcess, str, str]) -> None:
    daemon, _, busy = scene
    s = _raw_subscriber(daemon.socket, busy)
    s.shutdown(socket.SHUT_RD)
    with Kvm.connect(daemon.socket) as kvm:
        vcpu = kvm.open_vm(busy).open_vcpu(0)
        for _ in range(20):
            vcpu.interrupt(2)
            vcpu.interrupt(-2)
    time.sleep(0.2)
    s.close()


def test_subscribers_that_close_while_lines_change(scene: tuple[DaemonProcess, str, str]) -> None:
    def act(daemon: DaemonProcess, busy: str) -> None:
        s = _raw_subscriber(daemon.socket, busy)
        s.recv(4096)
        s.close()

    _during_storm(scene, act, rounds=40)


def test_subscribers_that_send_junk_while_events_flow(
    scene: tuple[DaemonProcess, str, str],
) -> None:
    def act(daemon: DaemonProcess, busy: str) -> None:
        s = _raw_subscriber(daemon.socket, busy)
        s.recv(4096)
        s.sendall(b"\xc1")
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
        s.close()

    _during_storm(scene, act, rounds=10)


def test_subscriber_process_killed_during_a_storm(scene: tuple[DaemonProcess, str, str]) -> None:
    daemon, _, busy = scene
    child = textwrap.dedent(f"""
        from lvz.clients import Kvm
        kvm = Kvm.connect({os.fspath(daemon.socket)!r})
        vm = kvm.open_vm({busy!r})
        vm.subscribe()
        print("ready", flush=True)
        while True:
            kvm.next_event(timeout=1)
    """)

    def act(daemon: DaemonProcess, busy: str) -> None:
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE)
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"ready\n"
        time.sleep(0.05)
        proc.kill()
        proc.wait()
        proc.stdout.close()

    _during_storm(scene, act, rounds=3)
