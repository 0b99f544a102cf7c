"""Daemon settings: every limit bounds what one client can make the daemon hold."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from lvz.protocol.connection import DEFAULT_MAX_MESSAGE

#: File descriptors kept back from ``--max-connections``' default (listener, state files,
#: plugins, the spare fd that lets the daemon refuse a client politely at the fd limit).
RESERVED_FDS = 64


@dataclass(slots=True)
class ServeConfig:
    socket: Path
    max_message: int = DEFAULT_MAX_MESSAGE
    # per connection -> EMFILE; room for a VM, its devices and all 65,536 vCPUs it may have
    max_handles: int = 66_000
    max_vms: int = 1024  # per daemon -> ENOSPC
    max_vcpus: int | None = None  # per VM; None = the whole vcpu_id range -> EINVAL as KVM
    # All VMs together -> ENOSPC: named VMs outlive connections. ~633 B each (bench.memory):
    # about 0.6 GiB of model heap at the default.
    max_total_vcpus: int = 1 << 20
    max_events: int = 4096  # irq events queued per subscriber before they are dropped
    state_dir: Path | None = None
    fsync: str = "everysec"  # --state-dir journal: always | everysec | no (docs/state.md)
    record: Path | None = None  # lvz serve --record: every byte of every connection, to a file
    grace: float = 0.5  # seconds in-flight work gets on shutdown
    plugin_timeout: float = 1.0  # seconds a plugin call may run -> ETIMEDOUT, device broken
    exit_with_parent: bool = False  # SIGTERM ourselves when the parent dies (test daemons)
    # Connections at once -> protocol_error EMFILE; None = the fd limit minus RESERVED_FDS.
    max_connections: int | None = None
    # Bytes of partially received messages, all connections together -> protocol_error ENOMEM.
    partial_budget: int = 64 << 20
    # Seconds one message may stay unfinished (slowloris) -> protocol_error ETIMEDOUT.
    message_timeout: float = 10.0
