"""The processes of a benchmark run: the one it runs in (threads, garbage collector), a
measurement in a fresh process (so that its peak-RSS growth is its own, and a crash stays in
it), and a command run with its output logged under a time limit."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
from typing import Callable, Optional

import torch

from .files import REPO_ROOT


def run_with(threads: Optional[int], body: Callable[[], object]):
    """``body()`` with ``threads`` torch intra-op threads (if given) and the objects that exist
    now frozen out of the garbage collector: an in-process case's full collection would rescan
    every imported library's objects (~0.3 s with transformers loaded). Both are restored."""
    threads_before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    gc.collect()
    gc.freeze()
    try:
        return body()
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads_before)


def in_fresh_process(module: str, args: list, marker: str, timeout_s: float,
                     env: Optional[dict] = None) -> tuple:
    """Run ``python -m module *args`` from the repository root, in ``env`` (default: this
    process's environment); ``(result, None)`` from the JSON after its last ``marker`` line,
    or ``(None, why it failed)``. It runs in a process group of its own, killed whole when it
    ends, times out or this process is interrupted: helpers it started (torch.compile's
    compile workers) go with it."""
    env = dict(os.environ if env is None else env)
    # bench/ from the repository root, sdft_kernels from the checkout's kernels/ (installed or not).
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), str(REPO_ROOT / "kernels"),
                                                      env.get("PYTHONPATH")]))
    proc = subprocess.Popen([sys.executable, "-m", module, *args], cwd=REPO_ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s"
    finally:
        _signal_group(proc, signal.SIGKILL)
        if proc.poll() is None:
            proc.communicate()
    for line in reversed(stdout.splitlines()):
        if line.startswith(marker):
            return json.loads(line[len(marker):]), None
    tail = (stderr or stdout).strip().splitlines()[-3:]
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else f"exit code {proc.returncode}"
    return None, f"measuring process failed, {why}: {' / '.join(tail)[:400]}"


def run_logged(command: list, log_path, timeout_s: float, env: Optional[dict] = None,
               grace_s: float = 15.0) -> Optional[int]:
    """Run ``command`` from the repository root with its output appended to ``log_path``;
    its exit status, or None when it ran past ``timeout_s``. It runs in a process group of
    its own: at the limit the group gets SIGINT (pytest then still writes its summary and
    its report files), and SIGKILL ``grace_s`` seconds later if it has not ended; a kill of
    this process (an exception here) kills the group too."""
    with open(log_path, "a") as log:
        log.flush()
        proc = subprocess.Popen(command, cwd=REPO_ROOT, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout=max(timeout_s, 0.1))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGINT)
            try:
                proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                pass
            return None
        finally:
            if proc.poll() is None:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
            elif os.name == "posix":  # workers it left behind (pytest-xdist's, say)
                _signal_group(proc, signal.SIGKILL)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError, OSError):
        pass
