"""Wire fuzzing checks: what the daemon may send back, whatever it was sent (PROTOCOL.md §2).

Shared by tests/test_fuzz_daemon.py (hypothesis, short) and ``make fuzz`` (bench/fuzz.py, long):
``exchange`` sends one payload on a fresh connection and checks every message that comes back;
``HANDLE_SETUP`` gives random requests handles to act on. The shape checks themselves are
``lvz.testing.wire.wire_message_problem``, which every test-side wire client applies too.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgpack

from lvz.protocol import abi
from lvz.testing.wire import BlockingWire, wire_error_problem, wire_message_problem

__all__ = [
    "CLOSING_ERRORS",
    "HANDLE_SETUP",
    "SENTINEL",
    "SENTINEL_ID",
    "Exchange",
    "exchange",
    "wire_error_problem",
    "wire_message_problem",
]

#: protocol_error names after which the daemon closes the connection (protocol-additions.md).
CLOSING_ERRORS = frozenset({"EPROTO", "E2BIG", "EPERM"})


#: The request sent after every fuzz payload: its answer proves the connection still works.
SENTINEL_ID = 4242
SENTINEL = msgpack.packb([0, SENTINEL_ID, "kvm.get_api_version", {}])


#: Requests a wire fuzzer runs first on its connection, so the random requests after them have
#: handles to act on: 1 the VM, 2-3 vCPUs (vCPU 3 holds phyid 1), 4-6 the three irqchips.
HANDLE_SETUP: list[tuple[str, dict[str, Any]]] = [
    ("kvm.create_vm", {"max_phyid": 4096}),
    ("vm.create_vcpu", {"vm": 1, "vcpu_id": 0}),
    ("vm.create_vcpu", {"vm": 1, "vcpu_id": 3}),
    ("vm.create_device", {"vm": 1, "type": "loongarch-ipi"}),
    ("vm.create_device", {"vm": 1, "type": "loongarch-eiointc"}),
    ("vm.create_device", {"vm": 1, "type": "loongarch-pchpic"}),
    ("vcpu.set_one_reg", {"vcpu": 3, "id": abi.CPUID, "value": 1}),
    (
        "device.set_attr",
        {
            "device": 6,
            "group": abi.KVM_DEV_LOONGARCH_PCH_PIC_GRP_CTRL,
            "attr": abi.KVM_DEV_LOONGARCH_PCH_PIC_CTRL_INIT,
            "value": abi.VIRT_PCH_PIC_BASE,
        },
    ),
]


@dataclass(slots=True)
class Exchange:
    """What the daemon sent back for one payload + sentinel on a fresh connection."""

    messages: list[Any]
    #: the sentinel got ``{"version": 12}``
    answered: bool
    #: the name of the protocol_error the daemon closed with, "" if it did not close on error
    closed_with: str

    def replies(self) -> list[Any]:
        """Messages before the sentinel's answer (or all of them), 'irq' events left out."""
        out = []
        for m in self.messages:
            if m[0] == 1 and m[1] == SENTINEL_ID and m[3] == {"version": 12}:
                break
            if m[0] == 2 and m[1] != "protocol_error":
                continue
            out.append(m)
        return out


def exchange(path: str | Path, payload: bytes, timeout: float = 10.0) -> Exchange:
    """Send ``payload`` then the sentinel, half-close, and read everything until the daemon closes.

    Half-closing makes the end deterministic: a payload that stops inside a message gets EPROTO
    (PROTOCOL.md §2) instead of leaving both sides waiting. Checks every message's shape, that
    a connection-closing protocol_error is the last thing sent, and that the daemon only closes
    without answering the sentinel after such an error.
    """
    with BlockingWire(path, timeout) as wire:
        try:
            wire.send(payload + SENTINEL)
            wire.shutdown_write()
        except (BrokenPipeError, ConnectionResetError):
            pass  # it may already have refused the payload and closed; what it said is below
        chunks = wire.read_to_end()
    unpacker = msgpack.Unpacker(raw=False, strict_map_key=False, max_buffer_size=1 << 26)
    unpacker.feed(b"".join(chunks))
    messages = list(unpacker)
    if unpacker.tell() != sum(map(len, chunks)):
        raise AssertionError("the daemon's output ends inside a message")
    answered = False
    closed_with = ""
    for i, msg in enumerate(messages):
        problem = wire_message_problem(msg)
        if problem:
            raise AssertionError(f"message {i}: {problem}")
        if msg[0] == 1 and msg[1] == SENTINEL_ID and msg[3] == {"version": 12}:
            answered = True
        if msg[0] == 2 and msg[1] == "protocol_error" and msg[2]["name"] in CLOSING_ERRORS:
            if i != len(messages) - 1:
                raise AssertionError(f"the daemon kept talking after {msg!r:.120}")
            closed_with = msg[2]["name"]
    if not answered and not closed_with and _whole_messages(payload):
        raise AssertionError(
            f"the daemon closed without answering the sentinel and without a "
            f"protocol_error; it sent {messages!r:.300}"
        )
    if answered and closed_with:
        raise AssertionError(f"{closed_with} after the sentinel was answered")
    return Exchange(messages, answered, closed_with)


def _whole_messages(payload: bytes) -> bool:
    """Does ``payload`` decode (as the daemon decodes) into whole messages, so that the sentinel
    after it is a message of its own? If not, the sentinel may have become part of a message."""
    unpacker = msgpack.Unpacker(
        raw=False, strict_map_key=True, max_buffer_size=1 << 26, ext_hook=_no_ext
    )
    unpacker.feed(payload)
    end = 0  # tell() also moves inside a partial message: trust it only after a whole one
    try:
        for _ in unpacker:
            end = unpacker.tell()
    except Exception:
        return False
    return end == len(payload)


def _no_ext(code: int, data: bytes) -> object:
    raise ValueError(code)
