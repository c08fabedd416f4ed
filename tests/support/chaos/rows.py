"""The rows of the reliability report (docs/RELIABILITY.md): what each scenario returns, and the
small helpers every scenario module shares to fill them in."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from tensord.config import GiB, KiB, MiB

from ..daemons import Daemon


@dataclass
class Row:
    """One line of the report: a fault or bad input, how often it was tried, what happened."""

    scenario: str
    fault: str
    tried: str = ""
    outcome: str = ""
    resent: str = "-"
    lost: int = 0
    duplicates: int = 0
    notes: str = ""
    problems: list[str] = field(default_factory=list)
    known_bug: str = ""
    skipped: str = ""
    figures: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def check(self, ok: bool, problem: str) -> bool:
        """Record ``problem`` unless ``ok``."""
        if not ok:
            self.problems.append(problem)
        return ok

    @property
    def clean(self) -> bool:
        return not self.problems and not self.lost and not self.duplicates

    @property
    def status(self) -> str:
        if self.skipped:
            return "skipped"
        if self.known_bug:
            return "FIXED?" if self.clean else "known bug"
        return "pass" if self.clean else "FAIL"

    def explain(self) -> str:
        """Everything a failing test should print."""
        doc = {k: v for k, v in dataclasses.asdict(self).items() if v not in ("", [], {}, 0)}
        return json.dumps(doc, indent=1, default=str)


def fmt_bytes(n: float) -> str:
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def vm_status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of ``pid`` in bytes (Linux ``/proc``)."""
    out: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * KiB
    return out


async def wait_log(d: Daemon, needle: str, after: int = 0, limit: float = 30.0) -> int:
    """``Daemon.wait_for`` with a longer bound (``limit`` seconds)."""
    with trio.fail_after(limit):
        while True:
            try:
                return await d.wait_for(needle, after)
            except trio.TooSlowError:
                continue


def junit_counts(xml: Path) -> Counter[str]:
    """Test cases of a pytest ``--junitxml`` report by outcome: passed, failed (failures and
    errors), skipped, xfailed. Empty when pytest wrote no report."""
    counts: Counter[str] = Counter()
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        kinds = {child.tag for child in case}
        if "failure" in kinds or "error" in kinds:
            counts["failed"] += 1
        elif "skipped" in kinds:
            skip = case.find("skipped")
            xfail = skip is not None and "xfail" in (skip.get("type") or "")
            counts["xfailed" if xfail else "skipped"] += 1
        else:
            counts["passed"] += 1
    return counts
