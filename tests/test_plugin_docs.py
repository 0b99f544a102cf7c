"""docs/plugins.md documents every hook with its exact signature (datasette's docs test)."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

from lvz.plugins import Device, VmApi, hookspecs

DOCS = Path(__file__).resolve().parent.parent / "docs" / "plugins.md"


def spec_signatures() -> dict[str, str]:
    out = {}
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("lvz_"):
            sig = inspect.signature(fn)
            params = ", ".join(f"{p.name}: {p.annotation}" for p in sig.parameters.values())
            out[name] = f"{name}({params}) -> {sig.return_annotation}"
    return out


def test_every_hook_is_documented_with_its_signature() -> None:
    documented = dict(re.findall(r"^### `((lvz_\w+)\(.*\) -> .*)`$", DOCS.read_text(), re.M))
    documented = {name: sig for sig, name in documented.items()}
    assert documented == spec_signatures()


def test_hookspecs_are_typed_and_explained() -> None:
    for name, fn in inspect.getmembers(hookspecs, inspect.isfunction):
        if name.startswith("lvz_"):
            assert fn.__doc__, name
            assert all(
                p.annotation is not inspect.Parameter.empty
                for p in inspect.signature(fn).parameters.values()
            ), name


def test_the_chip_contract_is_documented_whole() -> None:
    """Every VmApi member and every Device method a chip may override is in docs/plugins.md."""
    text = DOCS.read_text()
    members = [n for n in dir(VmApi) if not n.startswith("_")]
    methods = [
        n for n, _ in inspect.getmembers(Device, inspect.isfunction) if not n.startswith("_")
    ]
    assert "vcpu_by_phyid" in members and "save_state" in methods
    for name in members + methods:
        assert f"`{name}" in text, name


def test_lifecycle_events_have_one_mechanism() -> None:
    """VM events reach chips as Device methods only: no hookspec duplicates them."""
    hooks = {
        n for n, _ in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("lvz_")
    }
    assert hooks == {"lvz_device_types", "lvz_hypercall"}
    for event in ("vcpu_created", "vcpu_destroyed", "phyid_set", "phyid_dropped"):
        assert callable(getattr(Device, event))


def test_every_class_the_docs_construct_is_importable_from_lvz_plugins() -> None:
    """A plugin author writes ``from lvz.plugins import X`` for what the guide tells them to
    build; ``Stat`` was documented but importable only from ``lvz.plugins.api``."""
    import lvz.plugins
    from lvz.plugins import api

    constructed = set(re.findall(r"`(\w+)\(", DOCS.read_text()))
    public = {
        n
        for n, v in inspect.getmembers(api, inspect.isclass)
        if v.__module__ == api.__name__ and not n.startswith("_")
    }
    missing = sorted((constructed & public) - set(lvz.plugins.__all__))
    assert not missing, f"docs/plugins.md builds {missing}, which lvz.plugins does not export"
