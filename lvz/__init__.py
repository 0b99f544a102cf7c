"""lvz: LoongArch KVM's phyid map and interrupt routing, as a service.

The import root only: the real code lives in ``lvz.protocol`` (wire format, sans-I/O),
``lvz.daemon`` (the trio service and the VM model), ``lvz.plugins`` (irqchips) and
``lvz.clients`` (client library and the ``lvz`` command).

It also decides, once, which build of the hot path runs. ``make compiled`` (or
``LVZ_COMPILE=1 pip install .``) puts mypyc extension modules next to the sources of
``COMPILED_MODULES``; Python would import such a ``.so`` in preference to its ``.py`` even after
the ``.py`` was edited, silently running old code. So the extensions are used only when all of
them are there and ``lvz/_build.py`` (written by the build after it succeeded) carries the hash
of exactly the sources on disk; otherwise every hot module is imported from source, with a
warning when extensions exist but no longer match. All or nothing: compiled modules call each
other natively, so mixing a compiled module with a newer source of another would mix two
versions of one class. ``$LVZ_BUILD`` overrides: ``pure`` always imports the sources,
``compiled`` refuses to start without a matching compiled build (CI's compiled run), ``auto``
(the default) takes the compiled build when it matches. ``lvz.compiled`` says what was chosen.

This module must import nothing outside the standard library: setup.py loads it to share
``COMPILED_MODULES`` and ``source_digest``.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import os
import sys
import warnings
from collections.abc import Sequence
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import ModuleType

__version__ = "0.2.0"

#: The modules every request runs through: the wire core and the daemon's per-request path.
COMPILED_MODULES: tuple[str, ...] = (
    "lvz.protocol.abi",
    "lvz.protocol.events",
    "lvz.protocol.schema",
    "lvz.protocol.connection",
    "lvz.daemon.peer",
    "lvz.daemon.model",
    "lvz.daemon.handlers",
    "lvz.daemon.server",
    "lvz.daemon.state",
)

_HERE = Path(__file__).resolve().parent


def source_path(module: str, package_dir: Path = _HERE) -> Path:
    """The ``.py`` of one of COMPILED_MODULES inside ``package_dir`` (the ``lvz`` folder)."""
    return package_dir.joinpath(*module.split(".")[1:]).with_suffix(".py")


def source_digest(package_dir: Path = _HERE) -> str:
    """SHA-256 over the names and bytes of every compiled module's source, in list order."""
    h = hashlib.sha256()
    for module in COMPILED_MODULES:
        h.update(module.encode() + b"\0" + source_path(module, package_dir).read_bytes() + b"\0")
    return h.hexdigest()


def _has_extension(module: str, package_dir: Path) -> bool:
    base = source_path(module, package_dir).with_suffix("")
    return any(
        base.with_name(base.name + s).exists() for s in importlib.machinery.EXTENSION_SUFFIXES
    )


def _extension_modules(package_dir: Path) -> list[str]:
    """Every ``lvz.*`` module with an extension file, except mypyc's runtime library."""
    found = []
    for path in package_dir.rglob("*.so"):
        module = path.name.split(".", 1)[0]
        if not module.endswith("__mypyc"):
            parts = path.relative_to(package_dir).parent.parts
            found.append(".".join(("lvz", *parts, module)))
    return found


def _built_digest(package_dir: Path) -> str | None:
    """The digest ``_build.py`` recorded (read as text: it is data, not code to run)."""
    try:
        text = (package_dir / "_build.py").read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("SOURCES_SHA256 = "):
            return line.split("=", 1)[1].strip().strip("'\"")
    return None


def build_state(package_dir: Path = _HERE) -> tuple[str, str]:
    """("none" | "fresh" | "stale", why) for the compiled build next to these sources."""
    present = [m for m in COMPILED_MODULES if _has_extension(m, package_dir)]
    if not present:
        return "none", "no compiled modules (pure Python)"
    if len(present) < len(COMPILED_MODULES):
        missing = sorted(set(COMPILED_MODULES) - set(present))
        return "stale", f"compiled modules missing for {', '.join(missing)}"
    extra = sorted(set(_extension_modules(package_dir)) - set(COMPILED_MODULES))
    if extra:  # left by a build of a longer list: it would load, without its runtime
        return "stale", f"{', '.join(extra)} compiled but not part of this build"
    built = _built_digest(package_dir)
    if built is None:
        return "stale", "lvz/_build.py is missing (an interrupted or older build)"
    if built != source_digest(package_dir):
        return "stale", "the sources changed since they were compiled"
    return "fresh", "compiled with mypyc"


class _SourcesFirst:
    """Meta path finder that imports ``lvz.*`` modules from their ``.py``, ignoring any ``.so``
    (also one an older build left for a module no longer on the list)."""

    def find_spec(
        self, name: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        if not name.startswith("lvz."):
            return None
        source = source_path(name)
        if not source.is_file():
            return None  # a package (its __init__.py) or not ours: the usual finders
        return importlib.util.spec_from_file_location(name, source)


def _choose() -> tuple[bool, str]:
    want = os.environ.get("LVZ_BUILD", "auto")
    if want not in ("auto", "pure", "compiled"):
        raise ImportError(f"LVZ_BUILD={want!r}: expected auto, pure or compiled")
    state, why = ("none", "LVZ_BUILD=pure") if want == "pure" else build_state()
    if want == "compiled" and state != "fresh":
        raise ImportError(f"LVZ_BUILD=compiled but {why}: run `make compiled`")
    if state == "fresh":
        return True, why
    if state == "stale":
        warnings.warn(
            f"lvz: {why}; running the pure-Python sources instead "
            f"(`make compiled` rebuilds, `make clean-compiled` removes the build)",
            RuntimeWarning,
            stacklevel=2,
        )
    if state != "none" or want == "pure":
        sys.meta_path.insert(0, _SourcesFirst())
    return False, why


#: True when the hot path runs as mypyc-compiled code; ``build`` says why either way. (Not
#: decided when setup.py loads this file on its own, in the middle of a build.)
compiled, build = _choose() if __name__ == "lvz" else (False, "not imported as lvz")
