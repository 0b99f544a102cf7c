"""Who may import whom (docs: README "Where things live"): the arrows that keep lvz readable.

protocol/ is sans-I/O and imports no other room; plugins/ see only the chip API, protocol
constants and their shared helpers, never the daemon, the clients or each other; clients/ never
reach into the daemon (``lvz serve`` is the one door, inside a function); the daemon never
imports the clients. Checked on the source with ``ast``, so a stray import fails here first.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ROOMS = {
    "protocol": "lvz.protocol",
    "daemon": "lvz.daemon",
    "plugins": "lvz.plugins",
    "clients": "lvz.clients",
}
CHIPS = {"ipi", "eiointc", "pchpic", "pv_ipi"}


def imports(path: Path, room: str) -> list[tuple[str, bool]]:
    """(absolute module name, at module level?) for every import in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(a.name, id(node) in top) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the room's package
                package = ROOMS[room].rsplit(".", node.level - 1)[0]
                base = f"{package}.{node.module}" if node.module else package
                names = [base] if node.module else [f"{base}.{a.name}" for a in node.names]
            else:
                names = [node.module or ""]
            found += [(n, id(node) in top) for n in names]
    return found


def sources(room: str) -> list[Path]:
    return sorted((ROOT / room).glob("*.py"))


@pytest.mark.parametrize("path", sources("protocol"), ids=lambda p: p.name)
def test_protocol_is_sans_io(path: Path) -> None:
    for name, _ in imports(path, "protocol"):
        assert not name.startswith(
            ("trio", "socket", "asyncio", "lvz.daemon", "lvz.plugins", "lvz.clients")
        ), f"{path.name} imports {name}"


@pytest.mark.parametrize("path", sources("plugins"), ids=lambda p: p.name)
def test_plugins_see_only_the_chip_api(path: Path) -> None:
    me = path.stem
    for name, _ in imports(path, "plugins"):
        assert not name.startswith(("trio", "socket", "lvz.daemon", "lvz.clients")), (
            f"{path.name} imports {name}"
        )
        other = name.removeprefix("lvz.plugins.")
        assert not (other in CHIPS and other != me), f"chip {me} imports chip {other}"


@pytest.mark.parametrize("path", sources("clients"), ids=lambda p: p.name)
def test_clients_do_not_reach_into_the_daemon(path: Path) -> None:
    for name, top_level in imports(path, "clients"):
        if name.startswith("lvz.daemon"):
            assert path.name == "cli.py" and not top_level, (
                f"{path.name} imports {name} (only `lvz serve` may, inside its function)"
            )


@pytest.mark.parametrize("path", sources("daemon"), ids=lambda p: p.name)
def test_the_daemon_does_not_import_the_clients(path: Path) -> None:
    for name, _ in imports(path, "daemon"):
        assert not name.startswith("lvz.clients"), f"{path.name} imports {name}"


def test_the_daemon_model_does_no_io() -> None:
    for name, _ in imports(ROOT / "daemon" / "model.py", "daemon"):
        assert not name.startswith(("socket", "lvz.daemon.server", "lvz.daemon.listener")), name


TESTING = sorted((ROOT / "lvz" / "testing").glob("*.py"))


@pytest.mark.parametrize("path", TESTING, ids=lambda p: p.name)
def test_testing_support_stays_light(path: Path) -> None:
    """lvz.testing is loaded by every pytest run in a user's venv (the plugin) and by `lvz demo`
    (the spawner): it reaches the daemon only as a process, and the clients only inside the
    fixtures that use them."""
    ROOMS.setdefault("testing", "lvz.testing")
    for name, top_level in imports(path, "testing"):
        assert not name.startswith("lvz.daemon"), f"{path.name} imports {name}"
        if name.startswith(("lvz.clients", "trio")) and top_level:
            assert path.name == "wire.py" and name == "trio", f"{path.name} imports {name}"


@pytest.mark.parametrize("room", ["protocol", "daemon", "plugins"])
def test_nothing_in_the_product_imports_testing(room: str) -> None:
    for path in sources(room):
        for name, _ in imports(path, room):
            assert not name.startswith("lvz.testing"), f"{room}/{path.name} imports {name}"
