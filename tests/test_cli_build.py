"""Building a VM's contents from the shell (`lvz vcpu create`, `lvz device create|ls`, attr
group and attr names) and shell completion that asks the daemon for VM names, each against a
real daemon over its real socket, the completion through a real bash."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lvz.clients import Kvm
from lvz.clients.cli import main

pytest_plugins = ["tests.daemon_fixtures"]

ROOT = Path(__file__).resolve().parent.parent


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_vm_is_built_from_the_shell(
    lvz_socket: Path, vm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    assert run(capsys, "vm", "create", vm_name, *sock)[0] == 0
    try:
        code, out, _ = run(capsys, "vcpu", "create", vm_name, "0", "--phyid", "5", *sock)
        assert code == 0 and out == f"created vCPU 0 at phyid 5 in VM {vm_name}\n"
        assert run(capsys, "vcpu", "create", vm_name, "1", *sock)[0] == 0
        code, _, err = run(capsys, "vcpu", "create", vm_name, "1", *sock)
        assert code == 1 and "EEXIST" in err
        for dev in ("ipi", "eiointc", "pchpic"):
            code, out, _ = run(capsys, "device", "create", vm_name, dev, *sock)
            assert code == 0 and out.startswith("created device loongarch-"), out
        code, _, err = run(capsys, "device", "create", vm_name, "nosuch", *sock)
        assert code == 1 and "ENODEV" in err
        code, out, _ = run(capsys, "device", "ls", vm_name, "--format", "json", *sock)
        assert code == 0 and sorted(d["type"] for d in json.loads(out)) == [
            "loongarch-eiointc",
            "loongarch-ipi",
            "loongarch-pchpic",
        ]
        with Kvm.connect(lvz_socket) as kvm:
            vm = kvm.open_vm(vm_name)
            assert vm.info().vcpus == (0, 1)
            assert vm.phyid_lookup(5) == 0  # --phyid set its CPUID
    finally:
        run(capsys, "vm", "destroy", vm_name, *sock)


def test_attr_group_and_attr_by_name(
    lvz_socket: Path, vm_name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    sock = ("--socket", str(lvz_socket))
    with Kvm.connect(lvz_socket) as kvm:
        vm = kvm.create_vm(name=vm_name)
        vm.create_vcpu(0)
        vm.create_device("loongarch-pchpic")
        try:
            code, out, _ = run(
                capsys,
                "attr",
                "set",
                vm_name,
                "pchpic",
                "PCH_PIC_GRP_CTRL",
                "kvm_dev_loongarch_pch_pic_ctrl_init",
                "0x10000000",
                *sock,
            )
            assert code == 0 and "group 0x40000006 attr 0x0" in out, out
            code, out, _ = run(
                capsys,
                "attr",
                "get",
                vm_name,
                "vcpu0",
                "cpucfg",
                "cpucfg_kvm_feature",
                "--format",
                "json",
                *sock,
            )
            reply = json.loads(out)
            assert code == 0 and reply["group"] == 0 and reply["attr"] == 0x40000004
            assert reply["value"] & 2  # KVM_FEATURE_IPI, on for a new VM
            # Raw numbers still work, as before.
            code, out, _ = run(capsys, "attr", "get", vm_name, "vcpu0", "0", "0x40000004", *sock)
            assert code == 0
            code, _, err = run(capsys, "attr", "get", vm_name, "vcpu0", "nosuch_grp", "0", *sock)
            assert code == 2  # a usage error, before anything is sent
            assert "'nosuch_grp' is neither a number nor an attribute group name" in err
            assert "pch_pic_grp_ctrl" in err  # the names it would take
        finally:
            vm.destroy()


# --- completion ---------------------------------------------------------------------------------


@pytest.fixture
def complete(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> object:
    """``complete("lvz vm info ")``: what bash offers, with `lvz` on PATH as a user has it."""
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash here")
    assert main(["completion", "bash"]) == 0
    script = capsys.readouterr().out
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "lvz"
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} -m lvz.clients.cli "$@"\n')
    wrapper.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", PYTHONPATH=str(ROOT))

    def offer(line: str) -> list[str]:
        program = (
            script + 'COMP_WORDS=(); read -r -a COMP_WORDS <<< "$LINE";'
            ' [[ "$LINE" == *" " ]] && COMP_WORDS+=("");'
            " COMP_CWORD=$((${#COMP_WORDS[@]} - 1)); _lvz;"
            ' for w in "${COMPREPLY[@]}"; do printf "%s\\n" "$w"; done'
        )
        done = subprocess.run(
            [bash, "-c", program],
            capture_output=True,
            text=True,
            timeout=30,
            check=True,
            env=dict(env, LINE=line),
            cwd=tmp_path,
        )
        assert done.stderr == ""  # quietly, whatever happens
        return done.stdout.splitlines()

    return offer


def test_completion_asks_the_daemon_for_vm_names(
    lvz_socket: Path, vm_name: str, complete: object, tmp_path: Path
) -> None:
    assert callable(complete)
    hostile = f"{vm_name}-$(touch pwned)"
    with Kvm.connect(lvz_socket) as kvm:
        vms = [
            kvm.create_vm(name=vm_name),
            kvm.create_vm(name=hostile),
            kvm.create_vm(name=f"{vm_name}-two\nlines"),
        ]
        try:
            offered = complete(f"lvz vm info --socket {lvz_socket} {vm_name}")
            # A name with a newline cannot be one line: left out rather than split in two.
            assert sorted(offered) == sorted([vm_name, hostile])
            assert not (tmp_path / "pwned").exists()  # a name is a word, never run
            assert complete(f"lvz --socket {lvz_socket} reg get {vm_name}-$") == [hostile]
            # The option's value is not the VM: the word after it is.
            assert complete(f"lvz events --socket {lvz_socket} --format json {vm_name}-") == [
                hostile
            ]
        finally:
            for vm in vms:
                vm.destroy()


def test_completion_is_quiet_when_no_daemon_answers(complete: object, tmp_path: Path) -> None:
    assert callable(complete)
    assert complete(f"lvz vm info --socket {tmp_path / 'none.sock'} ") == []


def test_completion_offers_register_attr_and_device_names(complete: object) -> None:
    assert callable(complete)
    assert complete("lvz reg get vm 0 cpu") == ["cpuid", "cpucfg:"]
    assert complete("lvz attr get vm ipi pch_pic_grp_") == ["pch_pic_grp_ctrl", "pch_pic_grp_regs"]
    assert complete("lvz attr set vm pchpic pch_pic_grp_ctrl pch_pic_c") == ["pch_pic_ctrl_init"]
    assert complete("lvz device create vm e") == ["eiointc"]
    assert complete("lvz vcpu cr") == ["create"]
    assert complete("lvz d") == ["demo", "device"]
    assert "_vm-names" not in complete("lvz ")
