"""The GPU check's test parts: selections of ``tests/kernels/test_cuda.py`` run by pytest.

Each selection is one pytest command, its output appended to the check's one test log and
its per-test outcomes read back from a JUnit XML report (in a temporary folder, not among the
check's files). Tests run in parallel processes where pytest-xdist is installed (the Triton
compilations of the first calls then overlap), each test is stopped by pytest-timeout where
installed, and the whole command always by the part's budget (SIGINT first, so that pytest
still reports what finished).

Tests are selected by ``-k`` expressions over their names and parameter ids, so that edits
inside the test file (its tolerance helpers, new tests) leave the selection as it is.
"""

from __future__ import annotations

import os
import shlex
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from ..driver.processes import run_logged

TEST_FILE = "tests/kernels/test_cuda.py"


@dataclass(frozen=True)
class Selection:
    name: str
    title: str
    keyword: str            # pytest -k expression
    expected: int           # how many tests it selects today (checked on CPU by the test suite)
    per_test_timeout_s: int


CORRECTNESS = Selection(
    "correctness",
    "every implementation (triton, triton_chunked, torch) in bf16 at the Llama-3 head "
    "(N=2048, D=1024, V=128256) against a float32 oracle, for each divergence; float32 "
    "weight-gradient sums; impl='auto' on CUDA",
    "test_weight_gradient_sums_are_float32_on_cuda or test_auto_is_triton_chunked_on_cuda or "
    "(test_matches_truth_within_rounding and bfloat16 and V128256)",
    expected=11, per_test_timeout_s=90)
BEHAVIOUR = Selection(
    "behaviour",
    "memory (no logits-sized allocation; the chunked path's buffers), no host "
    "synchronisation, determinism, autocast to bf16",
    "test_no_logits_sized_allocation or test_chunked_memory_is_its_chunk_buffers_plus_gradients "
    "or test_no_host_synchronisation or test_deterministic or test_autocast_bfloat16_on_cuda",
    expected=7, per_test_timeout_s=60)


def pytest_command(sel: Selection, junit: Path, workers: int, per_test_timeout: bool,
                   python: str = sys.executable) -> list:
    """The pytest command line of ``sel``: ``workers`` > 1 uses pytest-xdist, and
    ``per_test_timeout`` pytest-timeout (each only where installed)."""
    cmd = [python, "-m", "pytest", "-q", "-rfEs", "--durations=5", "-p", "no:cacheprovider",
           TEST_FILE, "-k", sel.keyword, f"--junitxml={junit}"]
    if workers > 1:
        cmd += ["-n", str(workers)]
    if per_test_timeout:
        cmd += [f"--timeout={sel.per_test_timeout_s}"]
    return cmd


def parse_junit(path: Path) -> list:
    """``[{"id", "outcome", "duration_s", "message"}]`` of a JUnit XML report; outcome one of
    passed, failed, error, skipped."""
    tests = []
    for case in ET.parse(path).getroot().iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = {"failure": "failed"}.get(child.tag, child.tag)
                text = child.get("message") or (child.text or "")
                message = " ".join(text.split())[:400]
                break
        tests.append({"id": case.get("name"), "outcome": outcome,
                      "duration_s": round(float(case.get("time") or 0), 2), "message": message})
    return tests


def run_selection(sel: Selection, budget_s: float, tests_log: Path, tmp: Path, env: dict,
                  workers: int, per_test_timeout: bool) -> dict:
    """Run ``sel`` within ``budget_s``; the part's record (status ok when every selected test
    passed, failed when one failed or errored, timed_out when stopped at the budget, error
    when pytest could not run them or selected none)."""
    junit = Path(tmp) / f"{sel.name}.xml"
    junit.unlink(missing_ok=True)
    cmd = pytest_command(sel, junit, workers, per_test_timeout)
    with open(tests_log, "a") as log:
        log.write(f"\n===== {sel.name}: {sel.title}\n===== {shlex.join(cmd)}\n"
                  f"===== budget {budget_s:.0f} s\n")
    t0 = time.monotonic()
    code = run_logged(cmd, tests_log, budget_s, env)
    record = {"command": cmd, "exit_code": code, "workers": workers,
              "per_test_timeout_s": sel.per_test_timeout_s if per_test_timeout else None,
              "selected_expected": sel.expected, "seconds": round(time.monotonic() - t0, 1)}
    tests = parse_junit(junit) if junit.is_file() else []
    counts = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    record.update(tests=tests, counts=counts)
    bad = [t["id"] for t in tests if t["outcome"] in ("failed", "error")]
    if code is None:
        record.update(status="timed_out", reason=f"stopped at its budget of {budget_s:.0f} s "
                      f"after {len(tests)} test(s) reported" + (f"; failed: {bad}" if bad else ""))
    elif bad:
        record.update(status="failed", reason=f"{len(bad)} of {len(tests)} failed: {', '.join(bad)}")
    elif code == 0 and tests and all(t["outcome"] == "skipped" for t in tests):
        record.update(status="skipped", reason=f"all {len(tests)} skipped: {tests[0]['message']}")
    elif code == 0 and tests:
        record.update(status="ok", reason=None)
    else:
        why = {5: "no test selected", 2: "interrupted", 3: "pytest's internal error",
               4: "bad pytest usage"}.get(code, f"exit code {code}")
        record.update(status="error", reason=f"pytest: {why} (see the test log)")
    if tests and len(tests) != sel.expected and record["status"] == "ok":
        record["note"] = f"{len(tests)} tests ran where {sel.expected} were expected"
    return record


MAX_WORKERS = 6
# GPU memory one test process may need at once: the accuracy tests at the Llama-3 head hold a
# float64 problem (2 GiB of heads), the float32 reference's [2048, 128256] logits, their
# log-softmaxes and gradients, and the bf16 runs: about 10-14 GiB at their peak.
GPU_BYTES_PER_WORKER = 16 * 2**30


def workers_for(xdist: bool, tests: int, gpu_bytes=None) -> int:
    """pytest-xdist processes: enough to overlap the compilations, bounded by the CPUs, the
    number of tests and the GPU's memory (``gpu_bytes``, if known; each process holds its
    own problem and CUDA context)."""
    if not xdist:
        return 1
    by_memory = MAX_WORKERS if gpu_bytes is None else int(gpu_bytes // GPU_BYTES_PER_WORKER)
    return max(1, min(MAX_WORKERS, (os.cpu_count() or 2) - 1, tests, by_memory))


def describe(sel: Selection, xdist: bool, per_test_timeout: bool) -> list:
    """Dry-run lines of ``sel``."""
    w = workers_for(xdist, sel.expected)  # the GPU's memory may lower it
    return [f"{sel.title}",
            f"pytest {TEST_FILE} -k \"{sel.keyword}\" ({sel.expected} tests; "
            + (f"{w} pytest-xdist processes" if w > 1 else
               "one process" + ("" if xdist else ": pytest-xdist not installed"))
            + (f", {sel.per_test_timeout_s} s per test" if per_test_timeout
               else ", no per-test timeout: pytest-timeout not installed") + ")"]

