"""The ``lvz`` command: exit codes, output formats, and the demo, against a real daemon."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from lvz.clients import Kvm, abi
from lvz.clients.cli import main

pytest_plugins = ["tests.daemon_fixtures"]


@pytest.fixture
def named_vm(lvz_socket: Path, vm_name: str) -> Iterator[str]:
    """A named VM with vCPUs 0..2 at phyids 42, 7 and unset."""
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm(name=vm_name)
        vm.create_vcpu(0).set_one_reg(abi.CPUID, 42)
        vm.create_vcpu(1).set_one_reg(abi.CPUID, 7)
        vm.create_vcpu(2)
        yield vm_name
        vm.destroy()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_vms_table_and_json(
    lvz_socket: Path, named_vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "vms", "--socket", str(lvz_socket))
    assert code == 0
    assert "NAME" in out and named_vm in out
    code, out, _ = run(capsys, "vms", "--socket", str(lvz_socket), "--format", "json")
    assert code == 0
    [row] = [r for r in json.loads(out) if r["name"] == named_vm]
    assert row | {"id": 0} == {
        "id": 0,
        "name": named_vm,
        "vcpus": 3,
        "phyids": 2,
        "max_phyid": 256,
        "devices": 0,
    }
    assert row["id"] >= 1


def test_map_table_and_json(
    lvz_socket: Path, named_vm: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "map", named_vm, "--socket", str(lvz_socket))
    assert code == 0
    assert "PHYID" in out
    assert "unset" in out and "vCPU 2" in out
    code, out, _ = run(capsys, "map", "--format=json", "--socket", str(lvz_socket), named_vm)
    assert code == 0
    data = json.loads(out)
    assert data["limit"] == 256
    assert data["entries"] == [{"phyid": 7, "vcpu_id": 1}, {"phyid": 42, "vcpu_id": 0}]
    assert data["unset"] == [2]


def test_lookup(lvz_socket: Path, named_vm: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "lookup", named_vm, "0x2a", "--socket", str(lvz_socket))
    assert (code, out.strip()) == (0, "phyid 42 → vCPU 0")
    code, out, _ = run(
        capsys, "lookup", "--format", "json", "--socket", str(lvz_socket), named_vm, "-1"
    )
    assert code == 0
    assert json.loads(out) == {"vm": named_vm, "phyid": -1, "vcpu_id": None}


def test_plugins_json(lvz_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "plugins", "--socket", str(lvz_socket), "--format", "json")
    assert code == 0
    types = {t for p in json.loads(out) for t in p["device_types"]}
    assert {"loongarch-ipi", "loongarch-eiointc", "loongarch-pchpic"} <= types
    code, out, _ = run(capsys, "plugins", "--socket", str(lvz_socket))
    assert code == 0 and "DEVICE TYPES" in out


def test_failed_ioctl_exits_1_with_errno_name(
    lvz_socket: Path, vm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = run(capsys, "map", vm_name, "--socket", str(lvz_socket))
    assert code == 1
    assert out == ""
    assert "ENOENT" in err and "Traceback" not in err


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "lookup", "only-a-vm")[0] == 2
    assert run(capsys, "vms", "--format", "xml")[0] == 2
    assert run(capsys, "lookup", "vm", "not-a-number")[0] == 2
    assert run(capsys, "serve", "--max-vms", "0")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "frobnicate")[0] == 2


def test_unreachable_daemon_exits_125(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    missing = tmp_path / "none.sock"
    code, _, err = run(capsys, "vms", "--socket", str(missing))
    assert code == 125
    assert str(missing) in err and "Traceback" not in err
    monkeypatch.setenv("LVZ_SOCKET", str(missing))
    code, _, err = run(capsys, "plugins")
    assert code == 125 and str(missing) in err


def test_socket_from_environment(
    lvz_socket: Path,
    named_vm: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LVZ_SOCKET", str(lvz_socket))
    code, out, _ = run(capsys, "lookup", named_vm, "7")
    assert (code, out.strip()) == (0, "phyid 7 → vCPU 1")


@pytest.mark.parametrize(
    "command",
    [
        "",
        "serve",
        "demo",
        "vms",
        "map",
        "lookup",
        "plugins",
        "vm create",
        "vcpu ls",
        "reg set",
        "attr get",
        "irq",
        "msi",
        "events",
        "replay",
    ],
)
def test_help_documents_exit_codes(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, *command.split(), "--help")
    assert code == 0
    assert "exit status" in out and "125" in out
    if command:
        assert "--socket" in out


def _lvz(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lvz.clients.cli", *argv],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
    )


def test_demo_with_a_private_daemon() -> None:
    env = {k: v for k, v in os.environ.items() if k != "LVZ_SOCKET"}
    result = _lvz("demo", env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "private daemon" in out
    assert "PHYID" in out and "VCPU" in out
    assert "FAIL" not in out
    for step in (
        "same value again",
        "change refused",
        "sharing refused",
        "destroy then reuse",
        "IPI",
        "PV IPI",
        "device interrupt",
        "MSI",
    ):
        assert step in out
    assert "→ vCPU 4 (phyid 42) IPI" in out
    assert "behaved as expected" in out
    assert max(len(line) for line in out.splitlines()) <= 100


def test_demo_uses_a_running_daemon(lvz_socket: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "demo", "--socket", str(lvz_socket))
    assert code == 0, out
    assert f"using the daemon at {lvz_socket}" in out
    with Kvm.connect(lvz_socket) as kvm:  # the demo cleans up after itself
        assert not any((v.name or "").startswith(f"demo-{os.getpid()}-") for v in kvm.list_vms())
