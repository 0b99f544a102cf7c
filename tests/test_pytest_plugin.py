"""The ``lvz`` pytest plugin as a user meets it: test files of their own, run by pytester."""

from __future__ import annotations

import os
import re
import select
import shutil
import signal
from pathlib import Path

import pytest

from lvz.clients import Kvm
from lvz.testing.spawn import own_plugins, spawn

EXT = Path(__file__).resolve().parent / "extplugin"
DOCS = Path(__file__).resolve().parent.parent / "docs"

USER_TESTS = """
import pytest
import trio
from lvz.clients import abi

def test_daemon_and_clients(lvz_daemon, kvm, vm):
    assert lvz_daemon.socket.exists()
    a = vm.create_vcpu(0)
    a.set_one_reg(abi.CPUID, 42)
    assert vm.phyid_lookup(42) == 0
    assert kvm.get_api_version() == 12

def test_each_test_gets_a_fresh_vm(vm):
    assert not vm.info().vcpus

@pytest.mark.trio
async def test_trio_fixtures(trio_kvm, trio_vm):
    vcpu = await trio_vm.create_vcpu(3)
    await vcpu.set_one_reg(abi.CPUID, 7)
    assert await trio_vm.phyid_lookup(7) == 3
    assert await trio_kvm.get_api_version() == 12
"""


def test_a_users_test_file_passes_with_plain_pytest(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(USER_TESTS)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=3)


def test_the_documented_example_is_that_file_and_passes(pytester: pytest.Pytester) -> None:
    example = (DOCS / "examples" / "test_routing.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "testing.md").read_text(), re.S)
    assert example in blocks, "docs/testing.md and docs/examples/test_routing.py differ"
    pytester.makepyfile(test_routing=example)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_documented_why_assertion_shows_the_chain(pytester: pytest.Pytester) -> None:
    """testing.md's explain_route snippet, in its example with HAS_VIRT_EXTENSION left out
    (the mistake the docs describe): the failure names the register that redirected the pin.

    The snippet used to pass the RouteExplanation itself as the message, which pytest prints
    as a repr cut to one line, ending in '...' before any hop a user needs.
    """
    example = (DOCS / "examples" / "test_routing.py").read_text()
    blocks = re.findall(r"```python\n(.*?)```", (DOCS / "testing.md").read_text(), re.S)
    snippet = next(b for b in blocks if "explain_route(PIN)" in b and "def test" not in b)
    broken = example.replace("abi.EIOINTC_HAS_VIRT_EXTENSION\n                 | ", "")
    assert broken != example
    body, last = broken.rstrip().rsplit("\n", 1)
    assert "assert raised" in last
    pytester.makepyfile(test_why=f"{body}\n{snippet}{last}\n")
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(
        [
            "*AssertionError: PCH-PIC pin 5:*",
            "*eiointc coremap*COREMAP byte of irq 5 is 0x2a*",
            "*=> redirected: config_ignored*",
        ]
    )


def test_the_readme_example_passes(pytester: pytest.Pytester) -> None:
    readme = (DOCS.parent / "README.md").read_text()
    block = readme.split("## Testing with lvz", 1)[1]
    code = re.findall(r"```python\n(.*?)```", block, re.S)[0]
    pytester.makepyfile(test_readme=code)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)


def test_the_daemon_ends_with_the_session(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        from pathlib import Path
        def test_remember(lvz_daemon):
            Path("daemon").write_text(f"{lvz_daemon.pid} {lvz_daemon.socket}")
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
    pid, sock = (pytester.path / "daemon").read_text().split()
    assert not Path(sock).exists()
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)


def test_a_daemon_that_fails_to_start_is_reported_with_its_stderr(
    pytester: pytest.Pytester,
) -> None:
    pytester.makeini("[pytest]\nlvz_serve_args = --max-vms 0\n")
    pytester.makepyfile("def test_one(kvm): pass\ndef test_two(vm): pass\n")
    # -rN: no short summary, whose lines pytest cuts at the terminal width except under CI=true,
    # so the count below sees each test's error section and nothing else in either place.
    result = pytester.runpytest("-p", "no:cacheprovider", "-rN")
    result.assert_outcomes(errors=2)
    result.stdout.fnmatch_lines(
        [
            "*lvz serve exited with status 2 during start-up*",
            "*lvz serve: error: argument --max-vms*",
        ]
    )
    # One attempt, not one per test: the second test names the same failure.
    assert result.stdout.str().count("during start-up") == 2


def test_the_daemon_log_is_attached_to_a_failing_test(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        def test_passes(vm):
            vm.create_vcpu(0)

        def test_fails(kvm):
            kvm.create_vm(name="seen-in-the-log")
            assert False, "the user's own failure"
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    out = result.stdout.str()
    assert out.count("lvz daemon log (") == 1  # only the failing test carries it
    result.stdout.fnmatch_lines(
        ["*- lvz daemon log (*lvz.sock) -*", "*INFO lvz.daemon: VM seen-in-the-log created*"]
    )


def test_the_log_names_an_unnamed_vm_by_its_id(pytester: pytest.Pytester) -> None:
    """The ``vm`` fixture's VM is unnamed; its log line said "VM 0x7f3a… created" (a Python
    object address), which nothing else shows. Now it is the id `lvz vms` lists."""
    pytester.makepyfile("""
        def test_fails(kvm, vm):
            ids = [v["id"] for v in kvm.call("kvm.list_vms", {})["vms"]]
            assert False, f"the VM ids are {ids}"
    """)
    result = pytester.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    found = re.search(r"the VM ids are \[(\d+)\]", result.stdout.str())
    assert found, result.stdout.str()
    result.stdout.fnmatch_lines([f"*INFO lvz.daemon: VM {found[1]} created (unnamed, *"])


def test_lvz_socket_uses_a_running_daemon(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile("""
        import os
        def test_named(kvm, lvz_daemon):
            kvm.create_vm(name=os.environ["VM_NAME"])
            assert not hasattr(lvz_daemon, "proc")
    """)
    with spawn() as daemon:
        monkeypatch.setenv("VM_NAME", "from-the-option")
        pytester.runpytest(
            "-p", "no:cacheprovider", "--lvz-socket", str(daemon.socket)
        ).assert_outcomes(passed=1)
        monkeypatch.setenv("VM_NAME", "from-the-ini")
        pytester.makeini(f"[pytest]\nlvz_socket = {daemon.socket}\n")
        pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=1)
        with Kvm.connect(daemon.socket) as kvm:  # both runs' VMs, in *this* daemon
            assert {"from-the-option", "from-the-ini"} <= {v.name for v in kvm.list_vms()}
        assert daemon.alive()  # not ours to stop


def test_lvz_socket_that_does_not_exist(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_one(kvm): pass\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "--lvz-socket", "/nonexistent/s")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*--lvz-socket /nonexistent/s: no such socket*"])


def test_marker_starts_a_daemon_with_those_options(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import pytest
        from lvz.clients import KvmError

        @pytest.mark.lvz_serve("--max-vcpus", "1", plugins=["loongarch-ipi"])
        def test_limited(vm, kvm):
            vm.create_vcpu(1)
            with pytest.raises(KvmError) as err:
                vm.create_vcpu(2)
            assert err.value.name == "EINVAL"
            assert [p.name for p in kvm.list_plugins()] == ["loongarch-ipi"]

        @pytest.mark.lvz_serve("--max-vcpus 1", plugins=["loongarch-ipi"])
        def test_same_options_same_daemon(lvz_socket):
            pass

        def test_unmarked(vm):
            vm.create_vcpu(1)
            vm.create_vcpu(2)
    """)
    pytester.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_a_daemon_whose_pytest_is_killed_exits_by_itself(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("""
        import os, signal
        from pathlib import Path
        def test_killed(lvz_daemon):
            Path("pid").write_text(str(lvz_daemon.pid))
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-p", "no:hypothesispytest")
    assert result.ret == -signal.SIGKILL
    pid = int((pytester.path / "pid").read_text())
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return  # already gone
    try:
        gone, _, _ = select.select([pidfd], [], [], 10.0)  # a bound, not a measurement
    finally:
        os.close(pidfd)
    assert gone, f"lvz daemon {pid} outlived its killed pytest"


# --- lvz's own suite loads only lvz's own plugins -------------------------------------------------


@pytest.fixture
def doorbell_installed(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    """tests/extplugin installed as a distribution with an entry point, for the daemons the
    plugin starts (child processes, which see $PYTHONPATH)."""
    site = pytester.path / "site"
    shutil.copytree(EXT / "lvz_doorbell", site / "lvz_doorbell")
    info = site / "lvz_doorbell-0.1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: lvz-doorbell\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text("[lvz.irqchips]\ndoorbell = lvz_doorbell\n")
    monkeypatch.setenv("PYTHONPATH", str(site))
    return site


LIST_PLUGINS = """
def test_plugins(kvm):
    names = [p.name for p in kvm.list_plugins()]
    print("PLUGINS", ",".join(names))
"""


def test_this_suite_names_exactly_lvz_own_plugins(pytestconfig: pytest.Config) -> None:
    assert sorted(pytestconfig.getini("lvz_plugins")) == own_plugins()
    assert os.environ["LVZ_PLUGINS"] == ",".join(pytestconfig.getini("lvz_plugins"))


def test_an_installed_third_party_chip_stays_out_of_the_suite(
    pytester: pytest.Pytester,
    doorbell_installed: Path,
    monkeypatch: pytest.MonkeyPatch,
    pytestconfig: pytest.Config,
) -> None:
    pytester.makepyfile(LIST_PLUGINS)
    own = " ".join(pytestconfig.getini("lvz_plugins"))
    pytester.makeini(f"[pytest]\nlvz_plugins = {own}\n")  # what lvz's pyproject.toml says
    monkeypatch.delenv("LVZ_PLUGINS")
    result = pytester.runpytest("-p", "no:cacheprovider", "-s")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines([f"*PLUGINS {','.join(own_plugins())}*"])
    # The control: without the restriction, the same installation does load the chip.
    pytester.makeini("[pytest]\n")
    result = pytester.runpytest("-p", "no:cacheprovider", "-s")
    result.stdout.fnmatch_lines(["*PLUGINS *doorbell*"])
