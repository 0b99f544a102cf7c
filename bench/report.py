"""Figures, targets and their presentation: the terminal table and ``bench/results.json``.

A figure keeps every repetition's sample; the table shows the median and the min-max spread.
Ratios to the floor are taken median to median, with the spread of the per-repetition ratios
(repetitions are interleaved, so repetition i of lvz and of the floor ran at nearly the same time
and share the machine's noise).
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

#: "ratio_min": ratio to the reference >= value; "min"/"max": median >= / <= value;
#: "ratio_max": median / reference median <= value (cost comparisons such as lookup flatness).
TargetKind = Literal["ratio_min", "ratio_max", "min", "max", "all"]


@dataclass(slots=True)
class Target:
    kind: TargetKind
    value: float
    text: str


@dataclass(slots=True)
class Figure:
    """One measured quantity over repetitions, optionally compared with a reference figure."""

    key: str
    label: str
    unit: str
    samples: list[float] = field(default_factory=list)
    ref: str | None = None  # key of the figure the ratio is taken against
    target: Target | None = None
    note: str = ""
    skipped: str = ""  # non-empty: why there are no samples
    ok_checks: list[bool] = field(default_factory=list)  # per-repetition correctness checks
    #: The server's main-thread CPU per request (microseconds) and its busy share of the wall
    #: clock (%), per repetition: says whether the server or the client was the bottleneck.
    cpu_us: list[float] = field(default_factory=list)
    cpu_pct: list[float] = field(default_factory=list)
    #: The benchmark process's own CPU per request (all its threads): the client side's cost.
    client_us: list[float] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else math.nan

    @property
    def lo(self) -> float:
        return min(self.samples) if self.samples else math.nan

    @property
    def hi(self) -> float:
        return max(self.samples) if self.samples else math.nan


class Results:
    """All figures of one run, in presentation order."""

    def __init__(self) -> None:
        self.figures: dict[str, Figure] = {}

    def add(self, fig: Figure) -> Figure:
        self.figures[fig.key] = fig
        return fig

    def get(self, key: str) -> Figure:
        return self.figures[key]

    def ratio(self, fig: Figure) -> tuple[float, float, float] | None:
        """(median ratio, lowest, highest per-repetition ratio) against ``fig.ref``."""
        if fig.ref is None or fig.ref not in self.figures or not fig.samples:
            return None
        ref = self.figures[fig.ref]
        if not ref.samples or ref.median == 0:
            return None
        pairs = [a / b for a, b in zip(fig.samples, ref.samples, strict=False) if b]
        med = fig.median / ref.median
        return med, min(pairs, default=med), max(pairs, default=med)

    def verdict(self, fig: Figure) -> bool | None:
        t = fig.target
        if t is None:
            return None
        if fig.skipped or not fig.samples:
            return False
        if fig.ok_checks and not all(fig.ok_checks):
            return False
        if t.kind == "all":
            return True
        if t.kind in ("ratio_min", "ratio_max"):
            r = self.ratio(fig)
            if r is None:
                return False
            return r[0] >= t.value if t.kind == "ratio_min" else r[0] <= t.value
        return fig.median >= t.value if t.kind == "min" else fig.median <= t.value


def _num(x: float) -> str:
    if math.isnan(x):
        return "-"
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def table(results: Results, title: str) -> str:
    header = (
        "figure",
        "median",
        "min-max",
        "unit",
        "x ref",
        "srv us/req, busy",
        "client us/req",
        "target",
        "result",
    )
    rows: list[Sequence[str]] = []
    for fig in results.figures.values():
        if fig.skipped:
            rows.append(
                (
                    fig.label,
                    "-",
                    "-",
                    fig.unit,
                    "-",
                    "",
                    "",
                    fig.target.text if fig.target else "",
                    f"skipped: {fig.skipped}",
                )
            )
            continue
        r = results.ratio(fig)
        ratio = f"{r[0]:.2f} ({r[1]:.2f}-{r[2]:.2f})" if r else ""
        v = results.verdict(fig)
        verdict = "" if v is None else ("PASS" if v else "FAIL")
        if fig.ok_checks and not all(fig.ok_checks):
            verdict += " (check failed)"
        cpu = (
            f"{statistics.median(fig.cpu_us):.1f}, {statistics.median(fig.cpu_pct):.0f}%"
            if fig.cpu_us
            else ""
        )
        client = f"{statistics.median(fig.client_us):.1f}" if fig.client_us else ""
        rows.append(
            (
                fig.label,
                _num(fig.median),
                f"{_num(fig.lo)}-{_num(fig.hi)}",
                fig.unit,
                ratio,
                cpu,
                client,
                fig.target.text if fig.target else "",
                verdict,
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    line = "  ".join("-" * w for w in widths)
    out = [title, line, "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)), line]
    out.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    out.append(line)
    notes = [f"  {f.label}: {f.note}" for f in results.figures.values() if f.note]
    if notes:
        out.append("notes:")
        out.extend(notes)
    return "\n".join(out)


def to_json(
    results: Results,
    *,
    quick: bool,
    reps: int,
    seconds: float,
    elapsed: float,
    daemon_cmd: list[str],
) -> dict[str, Any]:
    figs = []
    for fig in results.figures.values():
        r = results.ratio(fig)
        figs.append(
            {
                "key": fig.key,
                "label": fig.label,
                "unit": fig.unit,
                "median": None if fig.skipped else fig.median,
                "min": None if fig.skipped else fig.lo,
                "max": None if fig.skipped else fig.hi,
                "samples": fig.samples,
                "ref": fig.ref,
                "ratio": None if r is None else {"median": r[0], "min": r[1], "max": r[2]},
                "target": None
                if fig.target is None
                else {"kind": fig.target.kind, "value": fig.target.value, "text": fig.target.text},
                "pass": results.verdict(fig),
                "checks_ok": all(fig.ok_checks) if fig.ok_checks else None,
                "server_cpu_us_per_request": fig.cpu_us or None,
                "server_busy_percent": fig.cpu_pct or None,
                "client_cpu_us_per_request": fig.client_us or None,
                "note": fig.note,
                "skipped": fig.skipped or None,
            }
        )
    return {
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": {
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
        },
        "build": build_name(),
        "quick": quick,
        "repetitions": reps,
        "seconds_per_sample": seconds,
        "elapsed_seconds": elapsed,
        "daemon_command": daemon_cmd,
        "figures": figs,
    }


def build_name() -> str:
    """Which build of lvz ran (the daemon starts from the same tree and environment)."""
    try:
        import lvz
    except ImportError:
        return "unknown"
    return "compiled" if getattr(lvz, "compiled", False) else "pure"


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n")
