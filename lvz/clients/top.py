"""``lvz top``: kvm_stat for interrupts, fed by the self-describing ``kvm.stats`` method.

The daemon describes its counters once (name, kind, unit, scope) and then sends values, so
this view has no table of its own: a chip plugin's counters appear in the drill-down the day
the plugin declares them. Cumulative counters get a total (since the daemon started, or since
the last reset) and a rate over the last interval; instant ones are shown as they are.

Watching changes nothing: VMs are addressed by the id ``kvm.stats`` reports, never through a
handle, which would keep an unnamed VM alive.

Rendering is plain text lines built here (so ``--once``, ``--log`` and the screen agree); the
interactive view puts them on the terminal with curses (standard library, so no dependency
and nothing imported until ``lvz top`` runs interactively), which also reads the keys.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from lvz.protocol import abi
from lvz.protocol.errors import KvmError

from .core import printable

if TYPE_CHECKING:
    import curses

    from .sync import Kvm

__all__ = ["Sample", "Schema", "Source", "View", "add_arguments", "run"]

#: The ESTAT bit numbers of the interrupt lines, as ``lvz events`` names them.
LINE_NAMES: Final = abi.LINE_NAMES

Key = tuple[Any, ...]


# --- what the daemon says --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Desc:
    """One counter as ``kvm.stats`` describes it."""

    name: str
    scope: str
    device: str | None
    kind: str
    unit: str
    size: int
    help: str


class Schema:
    """The descriptors of one daemon, grouped by (scope, device) in value order."""

    def __init__(self, number: int, descriptors: list[dict[str, Any]]) -> None:
        self.number = number
        self.groups: dict[tuple[str, str | None], list[Desc]] = {}
        for d in descriptors:
            desc = Desc(
                d["name"],
                d["scope"],
                d.get("device"),
                d["kind"],
                d["unit"],
                d.get("size", 1),
                d.get("help", ""),
            )
            self.groups.setdefault((desc.scope, desc.device), []).append(desc)

    def descs(self, scope: str, device: str | None = None) -> list[Desc]:
        return self.groups.get((scope, device), [])

    def decode(self, scope: str, values: list[Any], device: str | None = None) -> dict[str, Any]:
        return {d.name: v for d, v in zip(self.descs(scope, device), values, strict=False)}


@dataclass
class Detail:
    """One VM in depth: its values, each vCPU's, each device's."""

    id: int
    name: str | None
    values: dict[str, Any]
    vcpus: list[tuple[int, dict[str, Any]]]
    devices: dict[str, dict[str, Any] | None]  # None: the daemon says the device is broken


@dataclass
class Sample:
    """One ``kvm.stats`` answer, decoded, with every cumulative counter under a flat key."""

    t: float
    daemon: dict[str, Any]
    vms: list[tuple[int, str | None, dict[str, Any]]]
    detail: Detail | None = None
    flat: dict[Key, int] = field(default_factory=dict)


class Source:
    """Asks the daemon; sends back the schema number it holds, so descriptors come once."""

    def __init__(self, kvm: Kvm) -> None:
        self.kvm = kvm
        self.schema: Schema | None = None

    def sample(self, vm_id: int | None = None) -> Sample:
        """A snapshot; with ``vm_id`` that VM in depth too (KvmError ENOENT once it is gone)."""
        params: dict[str, Any] = {}
        if self.schema is not None:
            params["schema"] = self.schema.number
        if vm_id is not None:
            params["id"] = vm_id
        r = self.kvm.call("kvm.stats", params)
        if "descriptors" in r or self.schema is None or self.schema.number != r["schema"]:
            self.schema = Schema(r["schema"], r.get("descriptors", []))
        sc = self.schema
        s = Sample(
            time.monotonic(),
            sc.decode("daemon", r["daemon"]),
            [(v["id"], v["name"], sc.decode("vm", v["values"])) for v in r["vms"]],
        )
        for vid, _name, values in s.vms:
            self._flatten(s.flat, ("vm", vid), sc.descs("vm"), values)
        if "vm" in r:
            v = r["vm"]
            s.detail = Detail(
                v["id"],
                v["name"],
                sc.decode("vm", v["values"]),
                [(c["vcpu_id"], sc.decode("vcpu", c["values"])) for c in v["vcpus"]],
                {
                    t: None if vals is None else sc.decode("device", vals, t)
                    for t, vals in v["devices"].items()
                },
            )
            for vcpu_id, values in s.detail.vcpus:
                self._flatten(s.flat, ("vcpu", v["id"], vcpu_id), sc.descs("vcpu"), values)
            for t, dev_values in s.detail.devices.items():
                if dev_values is None:
                    continue
                self._flatten(s.flat, ("dev", v["id"], t), sc.descs("device", t), dev_values)
        return s

    @staticmethod
    def _flatten(
        flat: dict[Key, int], prefix: Key, descs: list[Desc], values: dict[str, Any]
    ) -> None:
        for d in descs:
            if d.kind != "cumulative" or d.name not in values:
                continue
            v = values[d.name]
            if isinstance(v, list):
                for i, x in enumerate(v):
                    flat[(*prefix, d.name, i)] = x
            else:
                flat[(*prefix, d.name)] = v


# --- what the screen shows -------------------------------------------------------------------


def _fmt_count(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.1f}"
    return str(v)


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    key: str
    width: int
    left: bool = False


VM_COLUMNS: Final = (
    Column("ID", "id", 4),
    Column("NAME", "name", 12, left=True),
    Column("VCPUS", "vcpus", 5),
    Column("MAP", "map", 11),
    Column("PEND", "pending", 5),
    Column("DELIV", "deliveries", 9),
    Column("DELIV/s", "deliveries/s", 9),
    Column("IPI/s", "ipis/s", 8),
    Column("SWI/s", "swis/s", 8),
    Column("HWI/s", "hwis/s", 8),
    Column("MSI/s", "msis/s", 8),
    Column("IRQL/s", "irq_lines/s", 8),
    Column("HCALL/s", "hypercalls/s", 8),
    Column("EVENTS", "events", 9),
    Column("LOST", "events_lost", 7),
)

VCPU_COLUMNS: Final = (
    Column("VCPU", "vcpu_id", 6),
    Column("PHYID", "phyid", 6),
    Column("LINES UP", "lines", 18, left=True),
    Column("DELIV", "deliveries", 9),
    Column("DELIV/s", "deliveries/s", 9),
    Column("IPIS", "ipis", 7),
    Column("IPI/s", "ipis/s", 8),
    Column("HCALLS", "hypercalls", 8),
    Column("HCALL/s", "hypercalls/s", 8),
    Column("RUN", "running", 4),
)

#: What a sort key sorts by when its column shows text.
_SORT_AS: Final = {"map": "phyids", "lines": "pending_lines"}


def _row_text(cols: Sequence[Column], row: dict[str, Any]) -> str:
    out = []
    for c in cols:
        text = _fmt_count(row.get(c.key))
        out.append(text.ljust(c.width) if c.left else text.rjust(c.width))
    return " ".join(out)


def _fancy() -> bool:
    """Whether the terminal takes arrows and ⏎; a C-locale one gets ASCII."""
    return (getattr(sys.stdout, "encoding", "") or "").lower().replace("-", "") == "utf8"


def _header_text(cols: Sequence[Column], sort_key: str, reverse: bool) -> str:
    down, up = ("▼", "▲") if _fancy() else ("v", "^")
    out = []
    for c in cols:
        h = c.header + ((down if reverse else up) if c.key == sort_key else "")
        out.append(h.ljust(c.width) if c.left else h.rjust(c.width))
    return " ".join(out)


def _lines_text(mask: int) -> str:
    return (
        ",".join(LINE_NAMES.get(b, str(b)) for b in range(mask.bit_length()) if mask >> b & 1)
        or "-"
    )


def _duration(ms: int) -> str:
    s = ms // 1000
    return f"{s // 3600}:{s // 60 % 60:02}:{s % 60:02}"


@dataclass
class View:
    """What the user chose: which screen, sort, filter, selection, and the reset baseline."""

    vm_id: int | None = None  # drilled into this VM, else the VM list
    sort: str = "deliveries/s"
    reverse: bool = True
    vcpu_sort: str = "vcpu_id"
    vcpu_reverse: bool = False
    filter: str = ""
    selected: int | None = None  # the VM id the cursor is on
    baseline: dict[Key, int] = field(default_factory=dict)
    message: str = ""
    interval: float = 1.0
    socket: str = ""

    # --- numbers ------------------------------------------------------------------------

    def total(self, cur: Sample, key: Key) -> int | None:
        v = cur.flat.get(key)
        if v is None:
            return None
        base = self.baseline.get(key, 0)
        return v - base if v >= base else v

    @staticmethod
    def rate(prev: Sample | None, cur: Sample, key: Key) -> float | None:
        if prev is None or key not in prev.flat or key not in cur.flat:
            return None
        dt = cur.t - prev.t
        if dt <= 0:
            return None
        delta = cur.flat[key] - prev.flat[key]
        return (delta if delta >= 0 else cur.flat[key]) / dt

    def reset(self, cur: Sample) -> None:
        """Zero the totals on the screen: later totals count from here (rates are unchanged)."""
        self.baseline.update(cur.flat)
        self.message = "totals reset"

    # --- rows ---------------------------------------------------------------------------

    def vm_rows(self, prev: Sample | None, cur: Sample, schema: Schema) -> list[dict[str, Any]]:
        rows = []
        pattern = self._pattern()
        for vid, name, values in cur.vms:
            if pattern is not None and not (pattern.search(name or "") or pattern.search(str(vid))):
                continue
            row: dict[str, Any] = {"id": vid, "name": printable(name) if name else "-"}
            for d in schema.descs("vm"):
                if d.kind == "cumulative":
                    row[d.name] = self.total(cur, ("vm", vid, d.name))
                    row[d.name + "/s"] = self.rate(prev, cur, ("vm", vid, d.name))
                else:
                    row[d.name] = values.get(d.name)
            row["map"] = f"{values.get('phyids', 0)}/{values.get('max_phyid', 0)}"
            rows.append(row)
        return _sorted(rows, self.sort, self.reverse)

    def vcpu_rows(
        self, prev: Sample | None, cur: Sample, schema: Schema, detail: Detail
    ) -> list[dict[str, Any]]:
        rows = []
        max_phyid = detail.values.get("max_phyid", 0)
        for vcpu_id, values in detail.vcpus:
            row: dict[str, Any] = {"vcpu_id": vcpu_id}
            for d in schema.descs("vcpu"):
                if d.size != 1:
                    continue
                key = ("vcpu", detail.id, vcpu_id, d.name)
                if d.kind == "cumulative":
                    row[d.name] = self.total(cur, key)
                    row[d.name + "/s"] = self.rate(prev, cur, key)
                else:
                    row[d.name] = values.get(d.name)
            phyid = values.get("phyid")
            row["phyid"] = "-" if phyid is None or phyid >= max_phyid else phyid
            row["pending_lines"] = int(values.get("lines") or 0).bit_count()
            row["lines"] = _lines_text(int(values.get("lines") or 0))
            row["running"] = "yes" if values.get("running") else ""
            rows.append(row)
        return _sorted(rows, self.vcpu_sort, self.vcpu_reverse)

    def _pattern(self) -> re.Pattern[str] | None:
        if not self.filter:
            return None
        try:
            return re.compile(self.filter)
        except re.error:
            return None

    # --- screens ------------------------------------------------------------------------

    def render(
        self, prev: Sample | None, cur: Sample, schema: Schema
    ) -> tuple[list[str], list[str], int | None]:
        """(title lines, body lines, index of the selected body line)."""
        if self.vm_id is not None and cur.detail is not None:
            return self._render_vm(prev, cur, schema, cur.detail)
        d = cur.daemon
        title = (
            f"lvz top  {self.socket}  up {_duration(d.get('uptime', 0))}  "
            f"{d.get('vms', 0)} VMs  {d.get('vcpus', 0)} vCPUs  "
            f"{d.get('connections', 0)} connections  every {self.interval:g}s"
        )
        if self.filter:
            title += f"  filter /{self.filter}/"
        rows = self.vm_rows(prev, cur, schema)
        body = [_row_text(VM_COLUMNS, r) for r in rows]
        if not rows:
            body = ["(no VMs" + (" match the filter)" if self.filter else ")")]
        ids = [r["id"] for r in rows]
        if self.selected not in ids:
            self.selected = ids[0] if ids else None
        sel = ids.index(self.selected) if self.selected is not None else None
        return [title, _header_text(VM_COLUMNS, self.sort, self.reverse)], body, sel

    def _render_vm(
        self, prev: Sample | None, cur: Sample, schema: Schema, detail: Detail
    ) -> tuple[list[str], list[str], int | None]:
        v = detail.values
        fill = v.get("phyids", 0) / max(1, v.get("max_phyid", 1)) * 100
        total_events = self.total(cur, ("vm", detail.id, "events"))
        lost = self.total(cur, ("vm", detail.id, "events_lost"))
        title = (
            f"VM {detail.id} {printable(detail.name or '(unnamed)')}: "
            f"{v.get('vcpus', 0)} vCPUs, "
            f"phyid map {v.get('phyids', 0)}/{v.get('max_phyid', 0)} ({fill:.0f}% full), "
            f"{v.get('pending', 0)} lines up, {total_events} events ({lost} lost), "
            f"{v.get('subscribers', 0)} subscribers"
        )
        body = [_row_text(VCPU_COLUMNS, r) for r in self.vcpu_rows(prev, cur, schema, detail)]
        for t, dev_values in sorted(detail.devices.items()):
            if dev_values is None:  # a plugin call failed for good (--plugin-timeout)
                body += [
                    "",
                    f"{t}: broken (a call into its plugin timed out; its requests "
                    "answer EIO until the VM is destroyed)",
                ]
                continue
            body += ["", *self._device_lines(prev, cur, schema, detail.id, t, dev_values)]
        return [title, _header_text(VCPU_COLUMNS, self.vcpu_sort, self.vcpu_reverse)], body, None

    def _device_lines(
        self,
        prev: Sample | None,
        cur: Sample,
        schema: Schema,
        vm_id: int,
        t: str,
        values: dict[str, Any],
    ) -> list[str]:
        """A chip, from its descriptors: scalars on one line, then a row per active line.

        A line is listed once it has counted something or is pending: EIOINTC has 256, and
        the masked, silent ones are the usual state, not news.
        """
        descs = schema.descs("device", t)
        scalars = []
        for d in descs:
            if d.size != 1:
                continue
            text = (
                f"{d.name} {self.total(cur, ('dev', vm_id, t, d.name))}"
                if d.kind == "cumulative"
                else f"{d.name} {values.get(d.name)}"
            )
            if d.kind == "cumulative":
                r = self.rate(prev, cur, ("dev", vm_id, t, d.name))
                text += f" ({_fmt_count(r)}/s)"
            scalars.append(text)
        out = [f"{t}: " + ("  ".join(scalars) or "no counters")]
        arrays = [d for d in descs if d.size != 1]
        if not arrays:
            return out
        cols = [Column("LINE", "line", 6)]
        for d in arrays:
            w = max(len(d.name), 7)
            cols.append(Column(d.name.upper(), d.name, w))
            if d.kind == "cumulative":
                cols.append(Column(d.name.upper() + "/s", d.name + "/s", w + 2))
        size = max(d.size for d in arrays)
        rows = []
        for i in range(size):
            row: dict[str, Any] = {"line": i}
            active = False
            for d in arrays:
                if d.kind == "cumulative":
                    key = ("dev", vm_id, t, d.name, i)
                    row[d.name] = self.total(cur, key)
                    row[d.name + "/s"] = self.rate(prev, cur, key)
                    active = active or bool(cur.flat.get(key))
                else:
                    vals = values.get(d.name) or []
                    x = vals[i] if i < len(vals) else None
                    row[d.name] = ("yes" if x else "") if d.unit == "boolean" else x
                    active = active or (d.name == "pending" and bool(x))
            if active:
                rows.append(row)
        if rows:
            out.append("  " + _header_text(cols, "", False))
            out += ["  " + _row_text(cols, r) for r in rows]
        return out

    # --- keys ---------------------------------------------------------------------------

    def sort_keys(self) -> list[str]:
        cols = VCPU_COLUMNS if self.vm_id is not None else VM_COLUMNS
        return [c.key for c in cols]

    def next_sort(self) -> None:
        keys = self.sort_keys()
        if self.vm_id is None:
            self.sort = keys[(keys.index(self.sort) + 1) % len(keys)]
            self.message = f"sorted by {self.sort}"
        else:
            self.vcpu_sort = keys[(keys.index(self.vcpu_sort) + 1) % len(keys)]
            self.message = f"vCPUs sorted by {self.vcpu_sort}"

    def flip_order(self) -> None:
        if self.vm_id is None:
            self.reverse = not self.reverse
        else:
            self.vcpu_reverse = not self.vcpu_reverse


def _sorted(rows: list[dict[str, Any]], key: str, reverse: bool) -> list[dict[str, Any]]:
    key = _SORT_AS.get(key, key)

    def k(row: dict[str, Any]) -> tuple[int, Any]:
        v = row.get(key)
        if isinstance(v, (int, float)):
            return (1, v)
        return (0, str(v)) if v not in (None, "-", "") else (-1, "")

    return sorted(rows, key=k, reverse=reverse)


# --- batch modes -------------------------------------------------------------------------------


def _find_vm(sample: Sample, ref: str) -> int:
    """A VM by name, else (all digits) by id, as the other commands address VMs."""
    for vid, name, _ in sample.vms:
        if name == ref:
            return vid
    if ref.isdigit() and any(vid == int(ref) for vid, _, _ in sample.vms):
        return int(ref)
    raise KvmError(
        "ENOENT", f"no VM named {ref!r}" + (f" and none with id {ref}" if ref.isdigit() else "")
    )


def _once(source: Source, view: View, args: argparse.Namespace) -> int:
    first = source.sample()
    if args.vm is not None:
        view.vm_id = _find_vm(first, args.vm)
        first = source.sample(view.vm_id)
    prev: Sample | None = None
    cur = first
    if args.interval > 0:
        time.sleep(args.interval)
        prev, cur = first, source.sample(view.vm_id)
    assert source.schema is not None
    title, body, _ = view.render(prev, cur, source.schema)
    print("\n".join(title + body), flush=True)
    return 0


def _log_fields(schema: Schema) -> list[tuple[str, str]]:
    """(column name, value key) for one VM row: instants as they are, cumulatives twice."""
    fields = [("id", "id"), ("name", "name")]
    for d in schema.descs("vm"):
        fields.append((d.name, d.name))
        if d.kind == "cumulative":
            fields.append((d.name + "_per_s", d.name + "/s"))
    return fields


def _log(source: Source, view: View, args: argparse.Namespace) -> int:
    """A row per VM per interval, for CI: ``--csv`` for tools, ``--log`` for eyes."""
    prev = source.sample()
    assert source.schema is not None
    fields = [("time", "time"), *_log_fields(source.schema)]
    writer = csv.writer(sys.stdout, lineterminator="\n") if args.csv else None
    widths = [max(len(name), 8) for name, _ in fields]
    widths[0], widths[2] = 20, 12

    def emit(cells: list[str]) -> None:
        if writer is not None:
            writer.writerow(cells)
        else:
            print(
                " ".join(
                    c.ljust(w) if i in (0, 2) else c.rjust(w)
                    for i, (c, w) in enumerate(zip(cells, widths, strict=True))
                )
            )
        sys.stdout.flush()

    emit([name for name, _ in fields])
    n = 0
    while args.count is None or n < args.count:
        time.sleep(args.interval)
        cur = source.sample()
        now = time.time()
        # Below a second, rows of successive intervals would share a stamp: add milliseconds.
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + (
            f".{int(now % 1 * 1000):03d}Z" if args.interval < 1 else "Z"
        )
        for row in sorted(view.vm_rows(prev, cur, source.schema), key=lambda r: r["id"]):
            cells = [stamp]
            for _name, key in fields[1:]:
                v = row.get(key)
                cells.append("" if v is None else f"{v:.1f}" if isinstance(v, float) else str(v))
            emit(cells)
        prev = cur
        n += 1
    return 0


# --- the live screen ---------------------------------------------------------------------------


def _footer(drilled: bool) -> str:
    arrows, enter, left = ("↑↓", "⏎", "←") if _fancy() else ("up/down", "Enter", "left")
    if drilled:
        return f"q quit  s sort  o order  {arrows} scroll  b/{left} back  r reset  +/- interval"
    return (
        f"q quit  s sort  o order  f filter  c clear  {arrows} select  {enter} drill down  "
        f"r reset  +/- interval"
    )


def _interactive(source: Source, view: View, args: argparse.Namespace) -> int:
    import curses
    import locale
    import os

    locale.setlocale(locale.LC_ALL, "")  # so curses writes the terminal's encoding
    os.environ.setdefault("ESCDELAY", "25")  # Esc is a key here, not the start of a sequence
    return curses.wrapper(_loop, source, view)


def _loop(scr: curses.window, source: Source, view: View) -> int:
    import curses

    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal without an invisible cursor
    cur = source.sample()
    prev: Sample | None = None
    scroll = 0
    due = time.monotonic() + view.interval
    while True:
        assert source.schema is not None
        _draw(scr, view, *view.render(prev, cur, source.schema), scroll)
        scr.timeout(max(0, int((due - time.monotonic()) * 1000)))
        key = scr.getch()
        fresh = False
        if key == -1:
            fresh = True
        elif key in (ord("q"), ord("Q")):
            return 0
        elif key == ord("s"):
            view.next_sort()
        elif key == ord("o"):
            view.flip_order()
        elif key == ord("r"):
            view.reset(cur)
        elif key in (ord("+"), ord("=")):
            view.interval = min(60.0, view.interval * 2)
            view.message = f"every {view.interval:g}s"
        elif key == ord("-"):
            view.interval = max(0.1, view.interval / 2)
            view.message = f"every {view.interval:g}s"
        elif key == ord("c"):
            view.filter = ""
            view.message = "filter cleared"
        elif key == ord("f") and view.vm_id is None:
            text = _prompt(scr, "filter (regex on name or id, empty for none): ")
            try:
                re.compile(text)
                view.filter = text
                view.message = f"filter /{text}/" if text else "filter cleared"
            except re.error as exc:
                view.message = f"not a regex: {exc}"
        elif key in (curses.KEY_UP, ord("k")):
            scroll = _move(view, prev, cur, source.schema, -1, scroll)
        elif key in (curses.KEY_DOWN, ord("j")):
            scroll = _move(view, prev, cur, source.schema, 1, scroll)
        elif key in (curses.KEY_ENTER, 10, 13, curses.KEY_RIGHT) and view.vm_id is None:
            if view.selected is not None:
                view.vm_id, view.message, scroll = view.selected, "", 0
                fresh, prev = True, None
        elif (
            key in (ord("b"), 27, curses.KEY_LEFT, curses.KEY_BACKSPACE, 127)
            and view.vm_id is not None
        ):
            view.vm_id, view.message, scroll = None, "", 0
        if fresh:
            prev, cur = _refresh(source, view, cur)
            due = time.monotonic() + view.interval


def _refresh(source: Source, view: View, cur: Sample) -> tuple[Sample, Sample]:
    try:
        new = source.sample(view.vm_id)
    except KvmError as err:
        if err.name != "ENOENT" or view.vm_id is None:
            raise
        view.message = f"VM {view.vm_id} is gone"
        view.vm_id = None
        new = source.sample()
    return cur, new


def _move(
    view: View, prev: Sample | None, cur: Sample, schema: Schema, step: int, scroll: int
) -> int:
    if view.vm_id is not None:
        return max(0, scroll + step)
    ids = [r["id"] for r in view.vm_rows(prev, cur, schema)]
    if ids:
        i = ids.index(view.selected) if view.selected in ids else 0
        view.selected = ids[max(0, min(len(ids) - 1, i + step))]
    return scroll


def _prompt(scr: curses.window, question: str) -> str:
    import curses

    h, w = scr.getmaxyx()
    scr.move(h - 1, 0)
    scr.clrtoeol()
    scr.addnstr(h - 1, 0, question, w - 1)
    curses.echo()
    try:
        curses.curs_set(1)
    except curses.error:
        pass
    scr.timeout(-1)
    raw = scr.getstr(h - 1, min(len(question), w - 2), 200)
    curses.noecho()
    try:
        curses.curs_set(0)
    except curses.error:
        pass
    return raw.decode(errors="replace").strip()


def _draw(
    scr: curses.window,
    view: View,
    title: list[str],
    body: list[str],
    selected: int | None,
    scroll: int,
) -> None:
    import curses

    scr.erase()
    h, w = scr.getmaxyx()
    room = max(0, h - len(title) - 1)
    if selected is not None:  # keep the cursor on screen
        scroll = max(0, selected - room + 1) if selected >= room else 0
    scroll = min(scroll, max(0, len(body) - room))

    def put(y: int, text: str, attr: int = 0) -> None:
        if 0 <= y < h:
            try:
                scr.addnstr(y, 0, text.ljust(w), w - 1 if y == h - 1 else w, attr)
            except curses.error:
                pass  # the last cell of the screen; nothing is lost

    put(0, title[0], curses.A_BOLD)
    for y, line in enumerate(title[1:], start=1):
        put(y, line, curses.A_REVERSE)
    for i, line in enumerate(body[scroll : scroll + room]):
        put(len(title) + i, line, curses.A_REVERSE if scroll + i == selected else 0)
    footer = _footer(view.vm_id is not None)
    put(h - 1, f"{view.message}  |  {footer}" if view.message else footer, curses.A_DIM)
    scr.refresh()


# --- the command -------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--once", action="store_true", help="print one screen (rates over --interval) and exit"
    )
    mode.add_argument(
        "--log", action="store_true", help="print a row per VM per interval, columns aligned"
    )
    mode.add_argument(
        "--csv", action="store_true", help="print a row per VM per interval as CSV, header first"
    )
    p.add_argument(
        "--interval",
        type=_seconds,
        default=1.0,
        metavar="SECONDS",
        help="time between samples (default: 1)",
    )
    p.add_argument(
        "--count",
        type=_count,
        metavar="N",
        help="--log/--csv: stop after N intervals (default: never)",
    )
    p.add_argument("--vm", metavar="VM", help="--once: show this VM's vCPUs and lines (name or id)")
    p.add_argument(
        "--filter", default="", metavar="REGEX", help="only VMs whose name or id matches"
    )
    p.add_argument(
        "--sort",
        default="deliveries/s",
        choices=[c.key for c in VM_COLUMNS],
        metavar="KEY",
        help="VM column to sort by, largest first (default: deliveries/s)",
    )


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if not 0 <= value <= 3600 or value != value:
        raise argparse.ArgumentTypeError(f"an interval is 0..3600 seconds, not {text}")
    return value


def _count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a count is a whole number >= 1, not {text!r}")
    return int(text)


def run(
    args: argparse.Namespace,
    connect: Callable[[argparse.Namespace], Kvm],
    socket: str,
    Usage: type[Exception],
) -> int:
    """``lvz top``: the live screen on a terminal, else (or with a flag) the batch modes.

    ``Usage`` is what the CLI turns into exit status 2; it is handed in rather than imported
    because ``python -m lvz.clients.cli`` runs the CLI as ``__main__``, a module of its own.
    """
    try:
        if args.filter:
            re.compile(args.filter)
    except re.error as exc:
        raise Usage(f"--filter is not a regex: {exc}") from None
    if args.vm is not None and not args.once:
        raise Usage("--vm goes with --once (in the live view, select a VM and press Enter)")
    interactive = not (args.once or args.log or args.csv)
    if interactive and not (sys.stdin.isatty() and sys.stdout.isatty()):
        raise Usage(
            "the live view needs a terminal; use --once, --log or --csv for a pipe or a file"
        )
    if (args.log or args.csv) and args.interval <= 0:
        raise Usage("--log and --csv need an --interval above 0")
    view = View(sort=args.sort, filter=args.filter, interval=args.interval or 1.0, socket=socket)
    with connect(args) as kvm:
        source = Source(kvm)
        if args.once:
            return _once(source, view, args)
        if args.log or args.csv:
            return _log(source, view, args)
        return _interactive(source, view, args)
