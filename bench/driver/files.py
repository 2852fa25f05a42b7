"""Where a benchmark's files go and how they are written: the repository root (the default
``--out`` is its ``bench/results``), the atomic, strict-JSON rewrite of a results file, and
a report rendered beside it."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Callable

REPO_ROOT = Path(__file__).resolve().parents[2]
RESULTS_DIR = REPO_ROOT / "bench" / "results"


def write_json_atomic(path: Path, obj) -> None:
    """Write ``obj`` as strict JSON to ``path`` through a temporary file and a rename, so that
    a reader, or a kill at any moment, sees either the previous file or the new one whole."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(json.dumps(strict_json(obj), indent=1, allow_nan=False))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def strict_json(obj):
    """``obj`` with non-finite floats as None, so that the file is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def render_beside(json_path: Path, render_markdown: Callable, write_plots: Callable = None) -> tuple[Path, list]:
    """Read a results file and write ``<stem>.md`` (``render_markdown(results, png names)``)
    and, with ``write_plots(results, folder, stem) -> [paths]``, its plots beside it; returns
    ``(md path, plot paths)``."""
    json_path = Path(json_path)
    results = json.loads(json_path.read_text())
    plots = write_plots(results, json_path.parent, json_path.stem) if write_plots is not None else []
    md_path = json_path.with_suffix(".md")
    md_path.write_text(render_markdown(results, [p.name for p in plots]))
    return md_path, plots
