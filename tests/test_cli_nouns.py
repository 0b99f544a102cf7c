"""The noun-verb commands (vm, vcpu, reg, attr, irq, msi, events), --version, -v/-vv, completion
and the error paths a user meets first, each against a real daemon over its real socket."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvz import __version__, compiled
from lvz.clients import Kvm, regs
from lvz.clients.cli import main
from lvz.testing.spawn import spawn

pytest_plugins = ["tests.daemon_fixtures"]

ROOT = Path(__file__).resolve().parent.parent
IOCSR_IPI_SEND = 0x1040
IOCSR_EIOINTC_ENABLE = 0x1600
IOCSR_EIOINTC_COREMAP = 0x1C00


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def lvz(*argv: str, **kw: object) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    done: subprocess.CompletedProcess[str] = subprocess.run(  # type: ignore[call-overload]
        [sys.executable, "-m", "lvz.clients.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        **kw,
    )
    return done


@pytest.fixture
def routed_vm(lvz_socket: Path, vm_name: str) -> Iterator[str]:
    """A named VM with the three irqchips and vCPUs 0, 1 at phyids 0 and 42."""
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm(name=vm_name)
        for vcpu_id, phyid in ((0, 0), (1, 42)):
            vm.create_vcpu(vcpu_id).set_one_reg(regs.CPUID, phyid)
        for dev in ("loongarch-ipi", "loongarch-eiointc", "loongarch-pchpic"):
            vm.create_device(dev)
        yield vm_name
        vm.destroy()


def test_socket_goes_before_the_command_too(
    capsys: pytest.CaptureFixture[str], lvz_socket: Path, vm_name: str, tmp_path: Path
) -> None:
    """`lvz --socket P vms`, as `git -C` / `docker -H`: it was "invalid choice: 'P'", exit 2."""
    code, out, err = run(capsys, "--socket", str(lvz_socket), "vm", "create", vm_name)
    assert code == 0 and f"created VM {vm_name}" in out, err
    code, out, err = run(capsys, "--socket", str(lvz_socket), "vms")
    assert code == 0 and vm_name in out, err
    # Given twice, the one after the command wins, as for -v.
    code, out, err = run(
        capsys,
        "--socket",
        str(tmp_path / "none.sock"),
        "vm",
        "destroy",
        vm_name,
        "--socket",
        str(lvz_socket),
    )
    assert code == 0, err
    code, _, err = run(capsys, "--socket", str(tmp_path / "none.sock"), "vms")
    assert code == 125 and "none.sock" in err
    code, _, err = run(capsys, "--socket", "", "vms")
    assert code == 2 and "empty path" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "--version")
    build = "compiled" if compiled else "pure Python"  # README: which build runs
    assert (code, out.strip()) == (0, f"lvz {__version__} ({build})")


def test_vm_create_info_destroy(
    lvz_socket: Path, vm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    code, out, _ = run(capsys, "vm", "create", vm_name, "--max-phyid", "4096", *sock)
    assert code == 0 and f"created VM {vm_name}" in out
    code, _, err = run(capsys, "vm", "create", vm_name, *sock)  # the README example, run twice
    assert code == 1 and "EEXIST" in err
    code, out, _ = run(capsys, "vm", "info", vm_name, "--format", "json", *sock)
    info = json.loads(out)
    assert (info["name"], info["max_phyid"], info["vcpus"]) == (vm_name, 4096, [])
    code, out, _ = run(capsys, "vm", "info", str(info["id"]), *sock)  # by id as well
    assert code == 0 and vm_name in out and "4096" in out
    code, out, _ = run(capsys, "vm", "ls", "--format", "json", *sock)
    assert vm_name in [r["name"] for r in json.loads(out)]
    code, out, _ = run(capsys, "vm", "destroy", vm_name, *sock)
    assert code == 0
    code, _, err = run(capsys, "vm", "info", vm_name, *sock)
    assert code == 1 and "ENOENT" in err
    assert run(capsys, "vm", "create", "x", "--max-phyid", "65537", *sock)[0] == 2


def test_an_unnamed_vm_is_inspected_by_id(
    lvz_socket: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm()
        vm.create_vcpu(3).set_one_reg(regs.CPUID, 9)
        code, out, _ = run(capsys, "vms", "--format", "json", *sock)
        ids = [r["id"] for r in json.loads(out) if r["name"] is None and r["vcpus"] == 1]
        assert ids
        vm_id = str(ids[-1])
        code, out, _ = run(capsys, "vcpu", "ls", vm_id, "--format", "json", *sock)
        assert code == 0
        assert json.loads(out) == [{"vcpu_id": 3, "phyid": 9, "lines": [], "estat": 0}]
        code, out, _ = run(capsys, "reg", "get", vm_id, "3", "tmid", *sock)
        assert (code, out.strip()) == (0, "tmid = 0x3 (3)")
        code, out, _ = run(capsys, "vms", *sock)
        assert "(unnamed)" in out
    code, _, err = run(capsys, "vm", "info", vm_id, *sock)  # it died with its connection
    assert code == 1 and f"none with id {vm_id}" in err
    code, _, err = run(capsys, "vm", "info", "999999", *sock)
    assert code == 1 and "ENOENT" in err


def test_reg_get_set_ls(
    lvz_socket: Path, routed_vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    code, out, _ = run(capsys, "reg", "get", routed_vm, "1", "CPUID", "--format", "json", *sock)
    assert json.loads(out) == {"id": regs.CPUID, "name": "cpuid", "value": 42}
    code, out, _ = run(capsys, "reg", "get", routed_vm, "1", "csr:0x20", *sock)
    assert out.strip() == "cpuid = 0x2a (42)"
    code, out, _ = run(capsys, "reg", "get", routed_vm, "1", hex(regs.CPUID), *sock)
    assert out.strip() == "cpuid = 0x2a (42)"
    code, _, err = run(capsys, "reg", "set", routed_vm, "1", "cpuid", "43", *sock)
    assert code == 1 and "EINVAL" in err  # kvm_set_cpuid: once set, never changed
    code, out, _ = run(capsys, "reg", "set", routed_vm, "0", "estat", "0x4", *sock)
    assert code == 0 and "estat = 0x4" in out  # raises HWI0 through GINTC
    code, out, _ = run(capsys, "vcpu", "ls", routed_vm, *sock)
    assert code == 0
    row0 = next(line for line in out.splitlines() if line.split()[:2] == ["0", "0"])
    assert "HWI0" in row0
    code, out, _ = run(capsys, "reg", "ls", routed_vm, "0", "--format", "json", *sock)
    assert {"id": regs.CPUID, "name": "cpuid", "value": 0} in json.loads(out)
    code, _, err = run(capsys, "reg", "get", routed_vm, "0", "nosuch", *sock)
    assert code == 2 and "unknown register 'nosuch'" in err
    code, _, err = run(capsys, "reg", "get", routed_vm, "0", "cpucfg:99", *sock)
    assert code == 1 and "EINVAL" in err
    code, _, err = run(capsys, "reg", "set", routed_vm, "0", "cpuid", str(1 << 64), *sock)
    assert code == 2 and "cannot carry" in err


def test_attr_get_set(lvz_socket: Path, routed_vm: str, capsys: pytest.CaptureFixture[str]) -> None:
    sock = ("--socket", str(lvz_socket))
    ctrl, init, base = 0x40000006, 0, 0x10000000  # PCH-PIC: CTRL group, INIT attr
    code, out, _ = run(
        capsys, "attr", "set", routed_vm, "pchpic", hex(ctrl), str(init), hex(base), *sock
    )
    assert code == 0, out
    code, out, _ = run(
        capsys, "attr", "get", routed_vm, "vcpu0", "0", "0x40000004", "--format", "json", *sock
    )
    assert code == 0 and json.loads(out)["value"] & 2  # KVM_FEATURE_IPI, on for a new VM
    code, _, err = run(capsys, "attr", "get", routed_vm, "vcpu0", "7", "7", *sock)
    assert code == 1 and "ENXIO" in err
    code, _, err = run(capsys, "attr", "get", routed_vm, "nosuchdev", "0", "0", *sock)
    assert code == 1 and "ENOENT" in err


def test_irq_msi_and_a_live_event_stream(
    lvz_socket: Path, routed_vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    events = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lvz.clients.cli",
            "events",
            routed_vm,
            "--count",
            "2",
            "--format",
            "json",
            *sock,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert events.stderr is not None
        assert "watching" in events.stderr.readline()  # subscribed: now cause the events
        with Kvm.connect(lvz_socket) as kvm:
            vm = kvm.open_vm(routed_vm)
            v0 = vm.open_vcpu(0)
            v0.iocsr_write(IOCSR_IPI_SEND, 4, (42 << 16) | 1)  # IPI to phyid 42 = vCPU 1
            irq = 66  # MSI data 66 → EIOINTC 66 → coremap bit 0 → phyid 0 → vCPU 0 HWI0
            v0.iocsr_write(IOCSR_EIOINTC_ENABLE + irq // 32 * 4, 4, 1 << (irq % 32))
            v0.iocsr_write(IOCSR_EIOINTC_COREMAP + irq, 1, 1)
        code, out, _ = run(capsys, "msi", routed_vm, "0x2ff00000", str(irq), *sock)
        assert code == 0 and "data 66" in out
        out, err = events.communicate(timeout=30)
    finally:
        if events.poll() is None:
            events.kill()
            events.wait()
    assert events.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert [(r["vcpu_id"], r["line"], r["level"]) for r in rows] == [(1, "IPI", 1), (0, "HWI0", 1)]
    assert rows[1]["seq"] == rows[0]["seq"] + 1
    code, out, _ = run(capsys, "irq", routed_vm, "5", "up", *sock)
    assert code == 0 and "irq line 5 := 1" in out
    code, _, err = run(capsys, "irq", routed_vm, "64", "1", *sock)
    assert code == 1 and "EINVAL" in err
    assert run(capsys, "irq", routed_vm, "5", "2", *sock)[0] == 2
    code, _, err = run(capsys, "msi", routed_vm, "0", "256", *sock)
    assert code == 1 and "EINVAL" in err


def test_events_table_stops_after_a_quiet_timeout(
    lvz_socket: Path, routed_vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "events", routed_vm, "--timeout", "0", "--socket", str(lvz_socket))
    assert code == 0 and "SEQ" in out and "watching" in err


def test_verbose_shows_the_connection_and_every_request(lvz_socket: Path, routed_vm: str) -> None:
    one = lvz("-v", "vm", "info", routed_vm, "--socket", str(lvz_socket))
    assert one.returncode == 0
    assert f"connected to {lvz_socket}" in one.stderr and "kvm.open_vm" not in one.stderr
    two = lvz("vm", "info", routed_vm, "--socket", str(lvz_socket), "-vv")
    assert "→ kvm.open_vm {'name': '" in two.stderr and "← vm.info" in two.stderr


@pytest.mark.parametrize("kind", ["directory", "regular file", "missing", "no directory"])
def test_a_bad_socket_path_is_named_with_what_is_wrong(
    tmp_path: Path, kind: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path = {
        "directory": tmp_path,
        "regular file": tmp_path / "f",
        "missing": tmp_path / "m",
        "no directory": tmp_path / "d" / "s",
    }[kind]
    if kind == "regular file":
        path.write_text("")
    code, _, err = run(capsys, "vms", "--socket", str(path))
    assert code == 125
    assert "Connection refused" not in err
    expected = {
        "directory": "is a directory, not a socket",
        "regular file": "is a regular file, not a socket",
        "missing": "no such file",
        "no directory": "does not exist",
    }[kind]
    assert str(path) in err and expected in err


def test_events_ends_when_its_vm_is_destroyed(lvz_socket: Path, vm_name: str) -> None:
    """The protocol sends no "destroyed" event: `lvz events` on a destroyed VM waited for ever
    (or until --timeout, then exit 0 as if all were well)."""
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm(name=vm_name)
        watcher = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "lvz.clients.cli",
                "events",
                vm_name,
                "--socket",
                str(lvz_socket),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=dict(os.environ, PYTHONPATH=str(ROOT)),
        )
        try:
            assert watcher.stderr is not None
            assert "watching VM" in watcher.stderr.readline()  # subscribed
            vm.destroy()
            _, err = watcher.communicate(timeout=30)
        finally:
            if watcher.poll() is None:
                watcher.kill()
                watcher.wait()
    assert watcher.returncode == 1, err
    assert f"EBADF: VM {vm_name} was destroyed" in err


def test_names_from_other_clients_cannot_write_to_the_terminal(
    capsys: pytest.CaptureFixture[str], lvz_socket: Path, vm_name: str
) -> None:
    """A VM name is any string another client chose: printed raw, a newline forged a row of
    `lvz vms` and ESC sequences cleared the operator's screen (the daemon's log escaped them)."""
    hostile = f"{vm_name}\nforged 99\x1b[2J\x07"
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm(name=hostile)
        try:
            vid = next(r["id"] for r in kvm.call("kvm.list_vms", {})["vms"] if r["name"] == hostile)
            shown = f"{vm_name}\\nforged 99\\x1b[2J\\x07"
            for argv in (["vms"], ["vm", "info", str(vid)]):
                code, out, err = run(capsys, *argv, "--socket", str(lvz_socket))
                assert code == 0, err
                assert shown in out and "\x1b" not in out and "\x07" not in out, out
                assert not any(line.startswith("forged") for line in out.splitlines())
            top = lvz(
                "top", "--once", "--interval", "0", "--vm", str(vid), "--socket", str(lvz_socket)
            )
            assert top.returncode == 0, top.stderr
            assert shown in top.stdout and "\x1b[2J" not in top.stdout
        finally:
            vm.destroy()


def test_the_socket_of_a_killed_daemon_is_named_stale(capsys: pytest.CaptureFixture[str]) -> None:
    """kill -9 leaves the socket file; clients said only "Connection refused"."""
    with spawn() as daemon:
        daemon.proc.kill()
        daemon.proc.wait()
        assert daemon.socket.exists()
        code, _, err = run(capsys, "vms", "--socket", str(daemon.socket))
    assert code == 125
    assert f"{daemon.socket}: ECONNREFUSED: nothing listens on this socket" in err, err
    assert "lvz serve` replaces the stale file" in err


def test_empty_socket_and_unsendable_values_are_usage_errors(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "vms", "--socket", "")
    assert code == 2 and "empty path" in err
    code, _, err = run(capsys, "lookup", "lab", "99999999999999999999")
    assert code == 2 and "cannot carry" in err
    assert run(capsys, "msi", "lab", "-1", "0")[0] == 2


def test_output_to_a_closed_pipe_ends_quietly(lvz_socket: Path, routed_vm: str) -> None:
    """`lvz vcpu ls VM | head -1`, as a shell runs it: no "Broken pipe", no traceback."""
    with Kvm.connect(lvz_socket) as kvm:  # enough rows to overflow the pipe's buffer
        vm = kvm.open_vm(routed_vm)
        for vcpu_id in range(2, 200):
            vm.create_vcpu(vcpu_id)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lvz.clients.cli",
            "vcpu",
            "ls",
            routed_vm,
            "--format",
            "json",
            "--socket",
            str(lvz_socket),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.readline()
    proc.stdout.close()  # the reader goes away, as head does
    err = proc.stderr.read().decode()
    proc.stderr.close()
    proc.wait(timeout=30)
    assert proc.returncode in (0, 141)
    assert err == ""


def test_bash_completion_walks_the_real_parser(capsys: pytest.CaptureFixture[str]) -> None:
    code, script, _ = run(capsys, "completion", "bash")
    assert code == 0
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")

    def complete(line: str) -> list[str]:
        program = (
            script + f'COMP_WORDS=({line}); [[ "{line}" == *" " ]] && COMP_WORDS+=("");'
            ' COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _lvz; echo "${COMPREPLY[*]}"'
        )
        out = subprocess.run(
            [bash, "-c", program], capture_output=True, text=True, timeout=30, check=True
        ).stdout
        return out.split()

    assert complete("lvz v") == ["vms", "vm", "vcpu"]
    assert complete("lvz vm c") == ["create"]
    assert complete("lvz reg get --f") == ["--format"]
    assert complete("lvz completion ") == ["bash", "zsh"]
    assert "--record" in complete("lvz serve --")


def test_zsh_completion_reuses_the_bash_function(capsys: pytest.CaptureFixture[str]) -> None:
    code, script, _ = run(capsys, "completion", "zsh")
    assert code == 0 and "bashcompinit" in script and "complete -F _lvz lvz" in script
    zsh = shutil.which("zsh")
    if zsh is not None:
        subprocess.run([zsh, "-n", "-c", script], check=True, timeout=30)


def test_events_exit_when_the_daemon_is_unreachable(tmp_path: Path) -> None:
    result = lvz("events", "x", "--socket", str(tmp_path / "none"))
    assert result.returncode == 125 and "no such file" in result.stderr
