"""Whether a planned run fits its ``--budget-s``, for every benchmark's ``--dry-run``."""

from __future__ import annotations


def budget_cut_line(entries: list, estimates: list, budget_s: float, describe) -> str:
    """Whether a plan whose entries take ``estimates`` seconds fits ``budget_s``, and if not,
    about how many cases would start (none starts once the budget is spent) and the last of
    them, named by ``describe(entry)``. An entry's last item is its skip reason (or None)."""
    total = sum(estimates)
    n_run = sum(1 for e in entries if not e[-1])
    if total <= budget_s:
        return f"fits --budget-s {budget_s:g} (estimate {total:.0f} s)"
    elapsed, started, last = 0.0, 0, None
    for entry, sec in zip(entries, estimates):
        if elapsed >= budget_s:
            break
        elapsed += sec
        if not entry[-1]:
            started, last = started + 1, entry
    where = f"; the last to start: {describe(last)}" if last else ""
    return (f"does NOT fit --budget-s {budget_s:g} (estimate {total:.0f} s): "
            f"about {started} of {n_run} cases would start{where}; the rest "
            "would be recorded as skipped")
