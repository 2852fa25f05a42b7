"""The command-line flags every benchmark run takes, their defaults and their checks.

``--device``, ``--quick``, ``--out``, ``--repeats``, ``--in-process``, ``--threads``,
``--budget-s`` and ``--dry-run`` mean the same in ``python -m bench.loss`` and
``python -m bench.train_step``: :func:`add_run_flags` declares them, :func:`check_run_flags`
fills in the device's defaults and rejects what cannot run.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

from .files import RESULTS_DIR

# The dtype a device's cases run in (a name, as it travels in JSON case specs).
DTYPES = {"cpu": "float32", "cuda": "bfloat16"}
# Timed calls (or rounds) per case by default; the median is reported.
REPEATS = {"cpu": 3, "cuda": 5}


def add_run_flags(p: argparse.ArgumentParser, *, quick_help: str, repeats_help: str,
                  in_process_help: str, budget_help: str) -> None:
    """Declare the shared flags on ``p``, with each benchmark's own words for what they do."""
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--repeats", type=int,
                   help=f"{repeats_help} (default: {REPEATS['cpu']} on CPU, {REPEATS['cuda']} on CUDA)")
    p.add_argument("--in-process", action="store_true", help=in_process_help)
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's)")
    p.add_argument("--budget-s", type=float, metavar="SECONDS", help=budget_help)
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and a rough time estimate, run nothing (needs no GPU)")


def check_run_flags(p: argparse.ArgumentParser, args: argparse.Namespace, argv: list) -> None:
    """The device's default ``--repeats``, ``args.argv`` (the results record the command),
    and the checks: ``--repeats`` at least 1, ``--budget-s`` a finite number >= 0, and unless
    ``--dry-run`` (planning needs no device) a CUDA device for ``--device cuda``, where
    Triton's interpreter is switched off (the CPU tests set it; timing it would be
    meaningless)."""
    args.argv = list(argv)
    if args.repeats is None:
        args.repeats = REPEATS[args.device]
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    if args.budget_s is not None and not (args.budget_s >= 0 and math.isfinite(args.budget_s)):
        p.error("--budget-s must be a finite number of seconds >= 0")
    if args.dry_run:
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA device is available")
    if args.device == "cuda" and os.environ.pop("TRITON_INTERPRET", "0") not in ("", "0"):
        print("note: TRITON_INTERPRET unset for the CUDA run", file=sys.stderr)


def in_process(args: argparse.Namespace) -> bool:
    """Whether cases are measured in the run's own process: always on CUDA (the allocator's
    peak statistics are exact there), on CPU with ``--in-process``; else each in a fresh one."""
    return args.device == "cuda" or args.in_process
