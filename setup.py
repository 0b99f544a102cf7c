"""Optional compiled build: mypyc over the per-request hot path, only when ``LVZ_COMPILE=1``.

Everything else about the package lives in pyproject.toml. Without ``LVZ_COMPILE=1`` this adds
nothing, so a plain ``pip install`` (and ``make demo`` / ``make test`` on a fresh clone) never
needs a C compiler or waits for one, and the very same sources run as plain Python.

``make compiled`` runs ``LVZ_COMPILE=1 setup.py build_ext --inplace``; ``LVZ_COMPILE=1 pip
install .`` builds a wheel with the extension modules next to their sources. mypyc's shared
runtime goes inside the package (``lvz/_native__mypyc*.so``), never to the import root, so the
build works from any directory. Only after every extension is built does ``lvz/_build.py``
record the hash of the sources they came from; ``lvz/__init__.py`` uses the extensions only
while that hash matches the sources on disk.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
COMPILE = os.environ.get("LVZ_COMPILE") == "1"


def _lvz_root_module() -> Any:
    """lvz/__init__.py alone (stdlib only): the one list of compiled modules and its digest."""
    spec = importlib.util.spec_from_file_location("_lvz_root", ROOT / "lvz" / "__init__.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildThenStamp(build_ext):
    """build_ext that writes lvz/_build.py last, so a failed build is never taken as fresh."""

    def run(self) -> None:
        stamp = ROOT / "lvz" / "_build.py"
        if self.inplace:  # nothing of an older build may survive this one, nor count as it
            stamp.unlink(missing_ok=True)
            for old in (ROOT / "lvz").rglob("*.so"):
                old.unlink()
        super().run()
        lvz = _lvz_root_module()
        target = stamp if self.inplace else Path(self.build_lib) / "lvz" / "_build.py"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(
            '"""Written by setup.py after a compiled build: the sources it was built from."""\n'
            f"SOURCES_SHA256 = {lvz.source_digest(ROOT / 'lvz')!r}\n"
        )


def compiled_extensions() -> list[Any]:
    if not COMPILE:
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:  # pip's isolated build asks first: setup_requires below names mypy
        return []

    lvz = _lvz_root_module()
    paths = [str(lvz.source_path(m, Path("lvz"))) for m in lvz.COMPILED_MODULES]
    return mypycify(
        paths, group_name="lvz._native", opt_level=os.environ.get("LVZ_COMPILE_OPT", "3")
    )


setup(
    ext_modules=compiled_extensions(),
    setup_requires=["mypy>=1.10"] if COMPILE else [],
    cmdclass={"build_ext": BuildThenStamp} if COMPILE else {},
)
