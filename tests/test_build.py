"""The two builds: pure Python and mypyc-compiled (``make compiled``), and choosing between them.

The whole suite runs against both (``make test`` and ``make test-compiled``); these tests pin
what is specific to having two: a stale compiled module never shadows an edited source, the
choice is reported (``lvz.compiled``) and honoured from any directory, and inputs that only a
compiled build treats differently (typed variables are checked casts there) stay clean errors.
"""

from __future__ import annotations

import importlib.machinery
import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgpack
import pytest

import lvz
import lvz.daemon.model
import lvz.protocol.connection
from lvz.protocol import abi

from .conftest import Connect

ROOT = Path(__file__).resolve().parent.parent
SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


def test_the_build_in_use_is_the_one_reported() -> None:
    for module in (lvz.protocol.connection, lvz.daemon.model):
        assert str(module.__file__).endswith(SUFFIX) is lvz.compiled, (module, lvz.build)


def test_setup_compiles_the_modules_lvz_checks() -> None:
    """setup.py takes the list and the digest from lvz/__init__.py: one list, never two."""
    text = (ROOT / "setup.py").read_text()
    assert "lvz.COMPILED_MODULES" in text and "lvz.source_digest" in text
    for module in lvz.COMPILED_MODULES:
        assert lvz.source_path(module).is_file(), module


@pytest.fixture
def fake_package(tmp_path: Path) -> Path:
    """A copy of the compiled modules' sources, to plant build outputs next to."""
    pkg = tmp_path / "lvz"
    for module in lvz.COMPILED_MODULES:
        target = lvz.source_path(module, pkg)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lvz.source_path(module), target)
    return pkg


def plant_build(pkg: Path, skip: str = "") -> None:
    for module in lvz.COMPILED_MODULES:
        if module != skip:
            lvz.source_path(module, pkg).with_suffix(SUFFIX).write_bytes(b"")
    (pkg / "_build.py").write_text(f"SOURCES_SHA256 = {lvz.source_digest(pkg)!r}\n")


def test_no_extensions_is_the_pure_build(fake_package: Path) -> None:
    assert lvz.build_state(fake_package)[0] == "none"


def test_a_complete_matching_build_is_used(fake_package: Path) -> None:
    plant_build(fake_package)
    assert lvz.build_state(fake_package) == ("fresh", "compiled with mypyc")


@pytest.mark.parametrize(
    "spoil", ["edit a source", "one module missing", "no stamp", "a module no longer on the list"]
)
def test_a_build_that_does_not_match_the_sources_is_stale(fake_package: Path, spoil: str) -> None:
    plant_build(fake_package, skip="lvz.daemon.model" if spoil == "one module missing" else "")
    if spoil == "edit a source":
        with lvz.source_path("lvz.protocol.events", fake_package).open("a") as f:
            f.write("\n# edited after the build\n")
    elif spoil == "no stamp":
        (fake_package / "_build.py").unlink()
    elif spoil == "a module no longer on the list":
        (fake_package / "daemon" / f"listener{SUFFIX}").write_bytes(b"")
    state, why = lvz.build_state(fake_package)
    assert state == "stale", why


def run_python(code: str, cwd: Path, build: str | None) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env.pop("LVZ_BUILD", None)
    if build is not None:
        env["LVZ_BUILD"] = build
    return subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


REPORT = (
    f"import lvz, lvz.daemon.model as m; print(lvz.compiled, str(m.__file__).endswith({SUFFIX!r}))"
)


def test_pure_is_honoured_from_another_directory(tmp_path: Path) -> None:
    out = run_python(REPORT, tmp_path, "pure")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


def test_compiled_is_demanded_or_refused_by_name(tmp_path: Path) -> None:
    """LVZ_BUILD=compiled is CI's guarantee that the compiled run did not silently run pure."""
    out = run_python(REPORT, tmp_path, "compiled")
    if lvz.build_state()[0] == "fresh":
        assert out.returncode == 0, out.stderr
        assert out.stdout.split() == ["True", "True"]  # the runtime library is found too
    else:
        assert out.returncode == 1
        assert "LVZ_BUILD=compiled but" in out.stderr and "make compiled" in out.stderr


def test_an_unknown_build_name_is_refused(tmp_path: Path) -> None:
    out = run_python("import lvz", tmp_path, "fast")
    assert out.returncode == 1
    assert "LVZ_BUILD='fast': expected auto, pure or compiled" in out.stderr


async def test_bytes_parameter_names_are_einval_not_a_crash(connect: Connect) -> None:
    """msgpack decodes bin map keys as bytes; compiled, a str-typed variable would raise."""
    raw = await connect()
    vm = (await raw.ok("kvm.create_vm"))["vm"]
    vcpu = (await raw.ok("vm.create_vcpu", vm=vm, vcpu_id=0))["vcpu"]
    for params in (
        {b"vcpu": vcpu, "id": abi.CPUID},
        {"vcpu": vcpu, "id": abi.CPUID, b"x": 1},
        {b"vcpu": vcpu, b"id": abi.CPUID},
    ):
        await raw.send(msgpack.packb([0, 9000, "vcpu.get_one_reg", params], use_bin_type=True))
        r = await raw.response(9000)
        assert r.error is not None and r.error.name == "EINVAL", r
        assert "parameter names are strings" in r.error.message
    assert (await raw.ok("vcpu.get_one_reg", vcpu=vcpu, id=abi.CPUID))["value"] == 256


async def test_hello_says_which_build_answers(connect: Connect) -> None:
    wire = await connect()
    server = (await wire.result("hello", {"protocol": 1}))["server"]
    assert server == f"lvz {lvz.__version__} ({'compiled' if lvz.compiled else 'pure Python'})"
