"""``lvz serve -v`` logs connections; ``-vv`` traces every request, answer and event batch,
against a real daemon process, reading its real log."""

from __future__ import annotations

import re

import pytest

from lvz.clients import Kvm, regs
from lvz.daemon import trace
from lvz.protocol.errors import KvmError
from lvz.testing.spawn import spawn
from lvz.testing.wire import Wire


def test_v_logs_connections_but_no_requests() -> None:
    with spawn("-v", plugins=["loongarch-ipi"]) as d:
        with Kvm.connect(d.socket) as kvm:
            kvm.list_vms()
        assert d.stop() == 0
        text = d.log_text()
    assert re.search(r"connection \d+ opened", text), text
    assert re.search(r"connection \d+ closed", text), text
    assert "request" not in text and "answer" not in text, text


def test_vv_traces_requests_answers_and_events() -> None:
    forged = "lvz[1] ERROR lvz.daemon: forged"
    with spawn("-vv", plugins=["loongarch-ipi"]) as d:
        with Kvm.connect(d.socket) as kvm:
            vm = kvm.create_vm(name="traced")
            vcpu = vm.create_vcpu(0)
            vcpu.set_one_reg(regs.CPUID, 3)
            with pytest.raises(KvmError, match="ENOENT"):  # its answer is traced too
                kvm.open_vm(f"evil\n{forged}")
            vm.subscribe()
            vm.create_device("loongarch-ipi")
            vcpu.interrupt(2)  # a line change: an irq event to the subscriber
            vm.destroy()
        assert d.stop() == 0
        text = d.log_text()
    lines = text.splitlines()
    number = re.search(r"connection (\d+) opened", text)
    assert number, text
    conn = number.group(1)
    assert any(
        re.search(rf"connection {conn}: request \d+ kvm.create_vm .*'traced'", line)
        for line in lines
    ), text
    assert any(
        re.search(rf"connection {conn}: request \d+ vcpu.set_one_reg ", line) for line in lines
    ), text
    assert any(re.search(rf"connection {conn}: answer \d+ ok$", line) for line in lines), text
    assert any(re.search(rf"connection {conn}: answer \d+ ENOENT$", line) for line in lines)
    assert any(re.search(rf"connection {conn}: sent \d+ irq", line) for line in lines), text
    # The client's newline is escaped: no line of the log starts with what it tried to forge.
    assert not any(line.startswith(forged) for line in lines), text
    assert any(f"kvm.open_vm {{'name': 'evil\\n{forged}'}}" in line for line in lines), text


def test_bytes_that_do_not_decode_stop_the_trace_not_the_daemon() -> None:
    with spawn("-vv", plugins=["loongarch-ipi"]) as d:
        import socket

        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(d.socket))
            s.sendall(b"\xc1")  # never valid msgpack
            s.recv(4096)  # the daemon's protocol_error
        with Kvm.connect(d.socket) as kvm:
            assert kvm.list_vms() == []  # still serving
        assert d.stop() == 0
        text = d.log_text()
    assert "trace stops, the bytes do not decode" in text, text
    assert "sent protocol_error" in text, text


def test_long_params_are_cut_to_one_short_line() -> None:
    shown = trace._shown({"entries": list(range(10_000))})
    assert len(shown) < trace.PARAMS_SHOWN + 40 and shown.endswith(" chars)")


async def test_an_untraced_daemon_wraps_nothing(sock_dir: object) -> None:
    """The decision is made once, at start: without -vv the daemon's streams are its own."""
    import logging
    from pathlib import Path

    import trio

    from lvz.daemon.config import ServeConfig
    from lvz.daemon.host import load_plugins
    from lvz.daemon.server import serve

    assert isinstance(sock_dir, Path)
    logging.getLogger("lvz.daemon").setLevel(logging.INFO)
    try:
        cfg = ServeConfig(socket=sock_dir / "t.sock")
        async with trio.open_nursery() as nursery:
            daemon = await nursery.start(serve, cfg, load_plugins())
            assert daemon.traced is False
            raw = await Wire.connect(cfg.socket)
            await raw.ok("kvm.list_vms")
            (conn,) = daemon.connections
            assert not isinstance(conn.stream, trace.TracingStream)
            await raw.aclose()
            nursery.cancel_scope.cancel()
    finally:
        logging.getLogger("lvz.daemon").setLevel(logging.NOTSET)
