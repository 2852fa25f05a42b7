"""How every benchmark's reports write times, byte counts and ratios."""

from __future__ import annotations

import math


def fmt_time(s) -> str:
    if s is None:
        return "-"
    return f"{s:.3g} s" if s >= 1 else f"{s * 1e3:.3g} ms"


def fmt_bytes(b) -> str:
    if b is None:
        return "-"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if b >= size:
            return f"{b / size:.3g} {unit}"
    return f"{b} B"


def fmt_ratio(x) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.2f}x"
