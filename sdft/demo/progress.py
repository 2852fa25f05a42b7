"""What the demo shows while it runs: one progress line on the console, details in a log file.

The console gets a single line, rewritten in place on a terminal (one line per update
otherwise, e.g. in CI logs)::

    [sdft demo] runs 7/27 | elapsed 3m12s | remaining ~6m40s | last: seed 1 sdft_0.5 (41 s)

Everything else (pretraining records, knowledge counts, each run's per-epoch accuracies, library
warnings) goes to ``demo.log`` in the output folder. Worker processes send their own output there
too (:func:`redirect_output_to`), so no library progress bar or warning reaches the console.
"""

from __future__ import annotations

import logging
import os
import sys
import time
import warnings
from typing import Optional, TextIO


def quiet_libraries() -> None:
    """No progress bars from transformers / huggingface_hub / datasets; their warnings go to the
    ``logging`` handlers (the log file), not to stderr."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # tokenizers warns after a fork otherwise
    import transformers

    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_warning()
    transformers.utils.logging.disable_default_handler()
    transformers.utils.logging.enable_propagation()
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.utils.logging.set_verbosity_warning()
    except ImportError:  # pragma: no cover - datasets is a dependency
        pass
    logging.captureWarnings(True)
    warnings.simplefilter("default")


def open_log(path: str) -> logging.Logger:
    """A logger that appends to ``path``; library log records and warnings go there as well."""
    handler = logging.FileHandler(path, mode="a")
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, "_sdft_demo", False)]:
        root.removeHandler(old)
        old.close()
    handler._sdft_demo = True
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    return logging.getLogger("sdft.demo")


def redirect_output_to(path: str) -> None:
    """Send this process's stdout and stderr (Python and C level) to ``path``; for worker processes."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)
    sys.stderr = open(2, "w", buffering=1, closefd=False)
    quiet_libraries()
    open_log(path)


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


class Progress:
    """One progress line for the whole demo: phase, runs done / total, elapsed, time remaining.

    The remaining time is the work left (each run weighted by its ``cost``, e.g. training
    examples x epochs) at the rate measured so far, divided among ``workers`` processes.
    """

    def __init__(self, total_runs: int, *, workers: int = 1, stream: Optional[TextIO] = None,
                 start: Optional[float] = None, enabled: bool = True, name: str = "sdft demo",
                 run_phase: str = "fine-tuning"):
        self.total, self.done, self.workers = total_runs, 0, max(1, workers)
        self.name, self.run_phase = name, run_phase  # the line's prefix; the phase once runs finish
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.perf_counter() if start is None else start
        self.enabled = enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.phase, self.last = "preparing", ""
        self.cost_total = self.cost_done = 0.0
        self.seconds_done = 0.0  # summed run durations (worker time)
        self._width = 0          # of the line last drawn (terminal)
        self._last_phase = None  # of the line last printed (not a terminal)

    def set_costs(self, costs: list[float]) -> None:
        self.cost_total = float(sum(costs))

    def status(self, phase: str) -> None:
        """Show a phase (``pretraining: step 1500, 62% of old facts``) on the same line."""
        self.phase = phase
        self.show()

    def run_finished(self, label: str, seconds: float, cost: float = 1.0) -> None:
        self.done += 1
        self.cost_done += cost
        self.seconds_done += seconds
        self.phase = self.run_phase
        self.last = f"{label} ({seconds:.0f} s)"
        self.show(force_line=True)

    def remaining(self) -> Optional[float]:
        if not self.done or not self.cost_done or self.cost_total <= self.cost_done:
            return None
        rate = self.seconds_done / self.cost_done          # worker seconds per unit of cost
        return rate * (self.cost_total - self.cost_done) / self.workers

    def line(self) -> str:
        parts = [f"[{self.name}] {self.phase}", f"runs {self.done}/{self.total}",
                 f"elapsed {_duration(time.perf_counter() - self.start)}"]
        left = self.remaining()
        if left is not None:
            parts.append(f"remaining ~{_duration(left)}")
        if self.last:
            parts.append(f"last: {self.last}")
        return " | ".join(parts)

    def show(self, force_line: bool = False) -> None:
        """Redraw the line (terminal), or print it (otherwise: only on phase changes and finished
        runs, so that a CI log gets a few dozen lines, not one per second)."""
        if not self.enabled:
            return
        text = self.line()
        if self.tty:
            pad = max(0, self._width - len(text))
            self.stream.write("\r" + text + " " * pad)
            self._width = len(text)
        elif force_line or self.phase != self._last_phase:
            self.stream.write(text + "\n")
        self._last_phase = self.phase
        self.stream.flush()

    def close(self) -> None:
        if self.enabled and self.tty:
            self.stream.write("\n")
            self.stream.flush()
