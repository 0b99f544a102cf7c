"""The method table of PROTOCOL.md §4: every method's parameters, their types and whether required.

Validation is table-driven so one loop serves every method: a missing, unknown or mistyped
parameter is EINVAL naming it, an unknown method ENOTTY, and an optional parameter given as nil
counts as absent. Handle parameters are typed by the kind of object they must name; the daemon
resolves them (EBADF / ENOTTY come after this table's checks, PROTOCOL.md §2).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Final

from .abi import I64_MIN, U32_MAX, U64_MAX
from .errors import KvmError

__all__ = ["HANDLE_KINDS", "METHODS", "ParamSpec", "validate"]

#: Parameter kinds that name a handle, mapped to the object kind they must be ("" = any).
HANDLE_KINDS: Final = {"handle": "", "vm": "vm", "vcpu": "vcpu", "device": "device"}


def _is_u32(v: object) -> bool:
    return type(v) is int and 0 <= v <= U32_MAX


def _is_u64(v: object) -> bool:
    return type(v) is int and 0 <= v <= U64_MAX


def _is_int(v: object) -> bool:
    return type(v) is int and I64_MIN <= v <= U64_MAX


def _is_str(v: object) -> bool:
    return type(v) is str


def _is_timeout(v: object) -> bool:
    return (type(v) is int and 0 <= v <= U64_MAX) or (
        type(v) is float and math.isfinite(v) and v >= 0
    )


def _is_args(v: object) -> bool:
    return type(v) is list and len(v) <= 6 and all(_is_int(x) for x in v)


def _is_source(v: object) -> bool:
    """A ``vm.explain_route`` source: exactly one of ``{pin: N}``, ``{eiointc_irq: N}`` and
    ``{msi: {address: A, data: D}}``, integers of the types the matching methods take."""
    if type(v) is not dict or len(v) != 1:
        return False
    ((kind, arg),) = v.items()
    if kind in ("pin", "eiointc_irq"):
        return _is_int(arg)
    return (
        kind == "msi"
        and type(arg) is dict
        and set(arg) == {"address", "data"}
        and _is_u64(arg["address"])
        and _is_u64(arg["data"])
    )


_CHECKS: Final[dict[str, tuple[Callable[[object], bool], str]]] = {
    "handle": (_is_u32, "a handle (an unsigned 32-bit integer)"),
    "vm": (_is_u32, "a VM handle (an unsigned 32-bit integer)"),
    "vcpu": (_is_u32, "a vCPU handle (an unsigned 32-bit integer)"),
    "device": (_is_u32, "a device handle (an unsigned 32-bit integer)"),
    "u32": (_is_u32, "an unsigned 32-bit integer"),
    "u64": (_is_u64, "an unsigned 64-bit integer"),
    "int": (_is_int, "an integer"),
    "str": (_is_str, "a string"),
    "timeout": (_is_timeout, "a finite number of seconds >= 0"),
    "args": (_is_args, "a list of at most 6 integers"),
    "source": (_is_source, "one of {pin: N}, {eiointc_irq: N} or {msi: {address: A, data: D}}"),
}

#: (name, kind, required)
ParamSpec = tuple[str, str, bool]

_R, _O = True, False

METHODS: Final[dict[str, tuple[ParamSpec, ...]]] = {
    # lvz addition: `profile`, the kernel the answer describes (lvz.protocol.profiles).
    "hello": (("protocol", "int", _R), ("client", "str", _O), ("profile", "str", _O)),
    "close": (("handle", "handle", _R),),
    "kvm.get_api_version": (),
    "kvm.check_extension": (("cap", "str", _R), ("profile", "str", _O)),
    "kvm.create_vm": (("name", "str", _O), ("max_phyid", "int", _O), ("profile", "str", _O)),
    "kvm.open_vm": (("name", "str", _R),),
    "kvm.list_vms": (),
    # lvz addition: open any VM by the `id` kvm.list_vms shows, so unnamed ones can be inspected.
    "kvm.open_vm_id": (("id", "u64", _R),),
    # lvz addition: the irqchip plugins the daemon loaded (`lvz plugins`).
    "kvm.list_plugins": (),
    # lvz additions, as KVM_GET_STATS_FD: self-describing counters (`lvz top`).
    "kvm.stats": (("schema", "u64", _O), ("id", "u64", _O)),
    "vm.stats": (("vm", "vm", _R), ("schema", "u64", _O)),
    "vm.destroy": (("vm", "vm", _R),),
    "vm.create_vcpu": (("vm", "vm", _R), ("vcpu_id", "int", _R)),
    "vm.create_device": (("vm", "vm", _R), ("type", "str", _R)),
    "vm.irq_line": (("vm", "vm", _R), ("irq", "int", _R), ("level", "int", _R)),
    "vm.signal_msi": (("vm", "vm", _R), ("address", "u64", _R), ("data", "u64", _R)),
    "vm.phyid_lookup": (("vm", "vm", _R), ("phyid", "int", _R)),
    "vm.phyid_map": (("vm", "vm", _R),),
    "vm.subscribe": (("vm", "vm", _R),),
    # lvz addition: why an interrupt goes where it goes (`lvz why`), read-only.
    "vm.explain_route": (("vm", "vm", _R), ("source", "source", _R), ("level", "int", _O)),
    # lvz additions: reach the vCPUs and devices of a VM opened by name (snapshot, CLI).
    "vm.info": (("vm", "vm", _R),),
    "vm.open_vcpu": (("vm", "vm", _R), ("vcpu_id", "int", _R)),
    "vm.open_device": (("vm", "vm", _R), ("type", "str", _R)),
    # lvz addition: name an unnamed VM, so a restore becomes visible only once it is whole.
    "vm.set_name": (("vm", "vm", _R), ("name", "str", _R)),
    "vcpu.destroy": (("vcpu", "vcpu", _R),),
    "vcpu.set_one_reg": (("vcpu", "vcpu", _R), ("id", "u64", _R), ("value", "u64", _R)),
    "vcpu.get_one_reg": (("vcpu", "vcpu", _R), ("id", "u64", _R)),
    # lvz addition, as KVM_GET_REG_LIST: the registers that hold state (snapshots).
    "vcpu.get_reg_list": (("vcpu", "vcpu", _R),),
    "vcpu.interrupt": (("vcpu", "vcpu", _R), ("irq", "int", _R)),
    "vcpu.csr_xchg": (
        ("vcpu", "vcpu", _R),
        ("csr", "u64", _R),
        ("value", "u64", _R),
        ("mask", "u64", _R),
    ),
    "vcpu.set_attr": (
        ("vcpu", "vcpu", _R),
        ("group", "u64", _R),
        ("attr", "u64", _R),
        ("value", "u64", _R),
    ),
    "vcpu.get_attr": (("vcpu", "vcpu", _R), ("group", "u64", _R), ("attr", "u64", _R)),
    # lvz addition on the five guest calls below: `timeout`, how long an access that exits to
    # the VMM may wait for one (protocol-additions.md "Exits to the VMM").
    "vcpu.iocsr_read": (
        ("vcpu", "vcpu", _R),
        ("addr", "u64", _R),
        ("size", "int", _R),
        ("timeout", "timeout", _O),
    ),
    "vcpu.iocsr_write": (
        ("vcpu", "vcpu", _R),
        ("addr", "u64", _R),
        ("size", "int", _R),
        ("value", "u64", _R),
        ("timeout", "timeout", _O),
    ),
    "vcpu.mmio_read": (
        ("vcpu", "vcpu", _R),
        ("addr", "u64", _R),
        ("size", "int", _R),
        ("timeout", "timeout", _O),
    ),
    "vcpu.mmio_write": (
        ("vcpu", "vcpu", _R),
        ("addr", "u64", _R),
        ("size", "int", _R),
        ("value", "u64", _R),
        ("timeout", "timeout", _O),
    ),
    "vcpu.hypercall": (
        ("vcpu", "vcpu", _R),
        ("code", "u64", _R),
        ("args", "args", _O),
        ("timeout", "timeout", _O),
    ),
    # lvz addition: `data` / `ret` complete the exit the previous run returned, as a VMM fills
    # kvm_run.mmio.data / hypercall.ret before the next KVM_RUN.
    "vcpu.run": (
        ("vcpu", "vcpu", _R),
        ("timeout", "timeout", _R),
        ("data", "u64", _O),
        ("ret", "int", _O),
    ),
    # lvz addition, as KVM's immediate_exit / a signal to the vCPU thread: end a waiting run.
    "vcpu.kick": (("vcpu", "vcpu", _R),),
    "device.set_attr": (
        ("device", "device", _R),
        ("group", "u64", _R),
        ("attr", "u64", _R),
        ("value", "u64", _R),
    ),
    "device.get_attr": (("device", "device", _R), ("group", "u64", _R), ("attr", "u64", _R)),
    # lvz addition: the device's own state as [group, attr, value] in restore order (snapshots).
    "device.save_state": (("device", "device", _R),),
}

# Compiled form: method -> ({name: (check, what)}, required names)
_Compiled = tuple[dict[str, tuple[Callable[[object], bool], str]], tuple[str, ...]]
_COMPILED: Final[dict[str, _Compiled]] = {
    method: (
        {name: _CHECKS[kind] for name, kind, _ in specs},
        tuple(name for name, _, required in specs if required),
    )
    for method, specs in METHODS.items()
}

# Fast path for the hot methods: exactly the required parameters, all integers with a range.
# A length check and a range check each, instead of the general loop; anything else (an
# error to name, an optional parameter given) takes the general path. A method with optional
# parameters keeps the fast path when they are left out: the required ones, all present and
# nothing else, are then the whole map.
_INT_RANGES: Final[dict[str, tuple[int, int]]] = {
    "handle": (0, U32_MAX),
    "vm": (0, U32_MAX),
    "vcpu": (0, U32_MAX),
    "device": (0, U32_MAX),
    "u32": (0, U32_MAX),
    "u64": (0, U64_MAX),
    "int": (I64_MIN, U64_MAX),
}
_FAST: Final[dict[str, tuple[tuple[str, int, int], ...]]] = {
    method: tuple((name, *_INT_RANGES[kind]) for name, kind, required in specs if required)
    for method, specs in METHODS.items()
    if all(kind in _INT_RANGES for _, kind, required in specs if required)
}

#: method -> (param name, object kind) of its handle parameter, if it has one.
HANDLE_PARAM: Final[dict[str, tuple[str, str]]] = {
    method: (name, HANDLE_KINDS[kind])
    for method, specs in METHODS.items()
    for name, kind, _ in specs
    if kind in HANDLE_KINDS
}


def validate(method: str, params: dict[Any, Any]) -> dict[str, Any]:
    """Check ``params`` against the table; return them with nil optionals dropped.

    Raises ``KvmError`` ENOTTY for an unknown method, EINVAL naming the first bad parameter.
    ``params`` is typed with ``Any`` keys because it comes straight off the wire, where msgpack
    also decodes binary keys (as bytes): the compiled build would otherwise cast each key to
    ``str`` and raise TypeError instead of this function's EINVAL.
    """
    fast = _FAST.get(method)
    if fast is not None and len(params) == len(fast):
        try:
            for name, lo, hi in fast:
                v = params[name]
                if type(v) is not int or v < lo or v > hi:
                    break
            else:
                return params
        except KeyError:
            pass  # a parameter is missing, so another is unknown: the general path names them
    compiled = _COMPILED.get(method)
    if compiled is None:
        raise KvmError("ENOTTY", f"unknown method {method!r}")
    checks, required = compiled
    dropped = False
    for key, value in params.items():
        if type(key) is not str:
            raise KvmError("EINVAL", f"{method}: parameter names are strings, not {key!r}")
        check = checks.get(key)
        if check is None:
            raise KvmError("EINVAL", f"{method}: unknown parameter {key!r}")
        if not check[0](value):
            if value is None and key not in required:
                dropped = True
                continue
            raise KvmError("EINVAL", f"{method}: parameter {key!r} must be {check[1]}")
    for name in required:
        if name not in params:
            raise KvmError("EINVAL", f"{method}: missing parameter {name!r}")
    if dropped:
        return {k: v for k, v in params.items() if v is not None}
    return params
