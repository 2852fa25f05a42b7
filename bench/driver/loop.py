"""The run loop's bookkeeping, one for every benchmark: a results file that is valid at every
moment, the time budget, and the command's dispatch.

A run plans its cases, records each as "pending", and rewrites its results after every
change (the job's ``save``: ratios, targets, an atomic write): the case it is measuring is
marked as in progress, a measured or skipped case replaces its pending record, and
``meta.complete`` turns true at the end. A run killed at any moment thus leaves a valid file
of what it finished, which names the case that was running. ``--budget-s`` starts no case
once the budget is spent: the rest are recorded as skipped, with :func:`budget_reason`.
"""

from __future__ import annotations

import datetime
import math
import time
from pathlib import Path
from typing import Callable, Optional

PENDING_REASON = "not run yet: the run stopped (killed or interrupted) before this case"
# The first pending case of a file that stays partial: the one in progress when it stopped.
IN_PROGRESS_REASON = ("in progress when the run stopped: killed (time limit?), or it crashed "
                      "or hung the process")


def budget_reason(budget_s: float) -> str:
    """Why a case did not start: the run's ``--budget-s`` was spent (the reports count these)."""
    return f"time budget of {budget_s:g} s spent"


def today() -> str:
    """The run's date, as results files and their names carry it."""
    return datetime.date.today().isoformat()


def results_path(out, stem: str) -> Path:
    """``<out>/<stem>.json``, the folder created; where a run of that name (the same benchmark on
    the same day) already left results there, ``<stem>-2.json``, ``-3`` and so on: a second run
    never overwrites the results of the first."""
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    name, n = stem, 1
    while any(out_dir.glob(f"{name}.*")):
        n += 1
        name = f"{stem}-{n}"
    return out_dir / f"{name}.json"


class Run:
    """One run of a plan: its results ``{"meta": meta, "cases": records}``, one record per
    planned case in plan order (each "pending" until it is measured or skipped), saved by
    ``save(results)`` after every change.

    ``budget_s``: no case starts once that many seconds have passed (``min_left_s``: nor with
    less than that left). ``meta`` gets ``budget_s``, ``cases_planned``, ``complete`` and
    ``elapsed_s`` unless ``bookkeeping`` is false (a part of a larger file that keeps its
    own)."""

    def __init__(self, meta: dict, records: list, save: Callable[[dict], None],
                 budget_s: Optional[float] = None, min_left_s: float = 0.0,
                 bookkeeping: bool = True):
        self.start = time.monotonic()
        self.budget_s, self.min_left_s, self.bookkeeping = budget_s, min_left_s, bookkeeping
        self.results = {"meta": meta, "cases": records}
        self._save = save
        if bookkeeping:
            meta.update(budget_s=budget_s, cases_planned=len(records), complete=False,
                        elapsed_s=0.0)

    @property
    def records(self) -> list:
        return self.results["cases"]

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds of the budget left (infinite without one)."""
        return math.inf if self.budget_s is None else self.budget_s - self.elapsed()

    def skip_reason(self, reason: Optional[str]) -> Optional[str]:
        """``reason`` (the plan's), else :func:`budget_reason` once the budget is spent, else
        None: the case runs."""
        if reason or self.budget_s is None:
            return reason
        return budget_reason(self.budget_s) if self.left() <= self.min_left_s else None

    def starting(self, i: int) -> None:
        """Case ``i`` is about to be measured: the file names it, should the run die in it
        (with no case ``i``, the file is just saved)."""
        if i < len(self.records):
            self.records[i]["reason"] = IN_PROGRESS_REASON
        self.save()

    def finished(self, i: int, record: dict, next_starts: bool = False) -> None:
        """Case ``i``'s record (measured, failed or skipped) replaces its pending one.
        ``next_starts``: case ``i + 1`` comes next and is marked as in progress in the same
        write, so that a loop taking its plan in order writes once per case."""
        self.records[i] = record
        if next_starts:
            self.starting(i + 1)
        else:
            self.save()

    def save(self) -> None:
        if self.bookkeeping:
            self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self._save(self.results)

    def complete(self) -> None:
        self.results["meta"]["complete"] = True
        self.save()


def report_written(json_path: Path, render: Callable[[Path], tuple], targets: list,
                   target_lines: Callable[[list], list]) -> None:
    """Render the finished results (``render(json_path) -> (markdown path, [plot paths])``),
    print the targets' PASS/FAIL lines and what was written."""
    md_path, plots = render(json_path)
    print("\n".join(target_lines(targets)))
    print(f"wrote {json_path}, {md_path}" + "".join(f", {p}" for p in plots))


def run_command(args, plan: list, dry_run_lines: Callable[[object, list], list],
                run: Callable[[object], object]) -> int:
    """A benchmark's ``main`` after parsing: ``--dry-run`` prints the plan and its estimate
    (no device needed), else the run."""
    if args.dry_run:
        print("\n".join(dry_run_lines(args, plan)))
        return 0
    run(args)
    return 0
