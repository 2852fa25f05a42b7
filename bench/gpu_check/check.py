"""The five-minute GPU check: the most valuable evidence first, each part within its own time
budget inside one deadline, every result written as soon as it exists.

    make gpu-check                              # or: bash bench/gpu_check.sh (no make needed)
    python -m bench.gpu_check --dry-run         # the plan and the budgets; needs no GPU
    python -m bench.gpu_check --out DIR --deadline-s 280 --budget headline=150

Parts, in order (seconds: default budget; a part starts only when its minimum is left):

1. ``setup`` (40): ``nvidia-smi``, the carried wheels of ``.whl/`` installed offline where
   missing, versions and what is importable (:mod:`bench.gpu_check.environment`);
2. ``correctness`` (75): every implementation in bf16 at a Llama-3 head against a float32
   oracle, in parallel pytest processes (:mod:`bench.gpu_check.pytest_parts`);
3. ``headline`` (130): the Llama-3-8B head at N=8192, forward + backward, the reference, the
   GEMM floor, ours and its implementations, Liger, cut-cross-entropy and orda, each in a
   process of its own (:mod:`bench.gpu_check.headline`);
4. ``behaviour`` (40): the memory, host-synchronisation, determinism and autocast tests;
5. ``fsdp`` (60, if time remains): FSDP2 steps in a world of one (:mod:`bench.memory.fsdp_step`):
   SDFTModel, a plain student through its forward, SDFTTrainer with accelerate's FSDP2;
6. ``train_step`` (80, if time remains): SFT against SDFT, bf16 and bf16 mixed precision
   (:mod:`bench.gpu_check.training`).

Unused time passes on: every budget is capped by what is left of the deadline (less a few
seconds to write the files), and the last parts run only if time remains. A part that fails,
crashes or runs out of time is recorded as such and the next part runs.

Files, in ``--out`` (default ``$GPU_OUT``, else ``$OUT``, else ``bench/results``), named
``gpu-check-<date>`` (a second run that day ``gpu-check-<date>-2``, and so on): ``-setup.log``,
``-tests.log`` (both test parts' pytest output), ``.log`` (this command's own output and the
benchmarks'), ``.json`` (every number, rewritten atomically after every part and every headline
case, so a run cut short leaves what it finished) and ``.md`` (rendered from the JSON after
every part). Plots are rendered later, anywhere with matplotlib: ``python -m
bench.gpu_check.report FILE.json --plots``.

Exit status: 0 when every part that ran passed (parts left out for lack of time, the last two
parts cut by their budget, peers that are not installed and an FSDP refusal by the library
do not fail it); 1 when a part failed, crashed or ran out of its budget; 2 for bad arguments;
3 when there is no CUDA device (the CUDA parts are recorded as skipped, the files written all
the same).
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import signal
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from importlib import util
from pathlib import Path
from typing import Optional

from .environment import PROBE_MARKER, install_wheels, nvidia_smi, probe_lines
from .pytest_parts import BEHAVIOUR, CORRECTNESS, run_selection, workers_for
from ..driver.files import REPO_ROOT, write_json_atomic
from ..driver.loop import results_path
from ..driver.meta import git
from ..driver.processes import in_fresh_process

DEFAULT_DEADLINE_S = 280.0
WRITE_RESERVE_S = 5.0  # kept at the end of the deadline to write the files
PASSING = ("ok", "skipped", "refused")
NO_CUDA_EXIT = 3


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    budget_s: float   # its time limit (capped by what is left of the deadline)
    min_s: float      # it starts only with at least this much of the deadline left
    needs_cuda: bool
    if_time_remains: bool = False  # running out of time here does not fail the check


PARTS = (
    Part("setup", "Versions, carried wheels, what imports", 40, 0, False),
    Part("correctness", "Correctness of every implementation, bf16 at a real head", 75, 20, True),
    Part("headline", "Headline shape: Llama-3-8B head, N=8192, forward + backward", 130, 25, True),
    Part("behaviour", "Memory, host synchronisation, determinism, autocast", 40, 15, True),
    Part("fsdp", "FSDP2 steps in a world of one: SDFTModel, a plain student, SDFTTrainer", 60, 20, True,
         if_time_remains=True),
    Part("train_step", "Training step, SFT against SDFT, bf16 and bf16 mixed precision", 80, 35,
         True, if_time_remains=True),
)


def default_out() -> Path:
    return Path(os.environ.get("GPU_OUT") or os.environ.get("OUT") or REPO_ROOT / "bench" / "results")


class Check:
    """One run of the check: its files, its deadline, its results, its subprocess environment."""

    def __init__(self, out_dir: Path, deadline_s: float, budgets: dict, wheels: Path,
                 stem: Optional[str] = None, only=None, device: str = "cuda",
                 argv=(), parts=PARTS):
        self.start = time.monotonic()
        self.deadline_s = deadline_s
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        date = datetime.date.today().isoformat()
        # A rerun of some parts (--only) keeps the full run's files of the day, and a second
        # run of the same parts that day writes -2, -3... beside the first (a --stem is taken as given).
        self.stem = stem or results_path(
            self.out, f"gpu-check-{date}" + "".join(f"-{n}" for n in sorted(only or ()))).stem
        self.paths = {"setup_log": self.out / f"{self.stem}-setup.log",
                      "tests_log": self.out / f"{self.stem}-tests.log",
                      "log": self.out / f"{self.stem}.log",
                      "json": self.out / f"{self.stem}.json",
                      "md": self.out / f"{self.stem}.md"}
        for p in self.paths.values():
            p.unlink(missing_ok=True)  # every file of this stem is this run's
        self.tmp = Path(tempfile.mkdtemp(prefix="sdft-gpu-check-"))
        self.wheels, self.site = Path(wheels), self.tmp / "site"
        self.device, self.only = device, set(only or ())
        self.parts = tuple(parts)
        self.budgets = {p.name: budgets.get(p.name, p.budget_s) for p in self.parts}
        self.cuda: Optional[bool] = None
        self.probe: dict = {}
        self.env = self.environment(site=None)
        self.results = {
            "meta": {"check": "gpu_check", "date": date, "stem": self.stem,
                     "started": datetime.datetime.now().isoformat(timespec="seconds"),
                     "commit": git("rev-parse", "--short", "HEAD"),
                     "dirty": bool(git("status", "--porcelain")),
                     "command": " ".join(["python -m bench.gpu_check", *argv]),
                     "deadline_s": deadline_s, "budgets": self.budgets, "elapsed_s": 0.0,
                     "complete": False, "files": []},
            "parts": [{"name": p.name, "title": p.title, "status": "pending",
                       "reason": "not reached yet", "budget_s": self.budgets[p.name]}
                      for p in self.parts],
        }

    # ------------------------------------------------------------ helpers

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def left(self) -> float:
        """Seconds of the deadline left for parts (the files' reserve excluded)."""
        return self.deadline_s - WRITE_RESERVE_S - self.elapsed()

    def log(self, message: str) -> None:
        line = f"gpu-check [{self.elapsed():5.0f} s] {message}"
        print(line, flush=True)
        with open(self.paths["log"], "a") as f:
            f.write(line + "\n")

    def environment(self, site: Optional[Path]) -> dict:
        """The environment of every subprocess: the carried wheels' folder (if any), the
        repository (bench/, tests/) and kernels/ (sdft_kernels) first on the path; Triton's
        interpreter off on CUDA (the CPU test suite switches it on)."""
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        path = [str(site)] if site else []
        path += [str(REPO_ROOT), str(REPO_ROOT / "kernels")]
        env["PYTHONPATH"] = os.pathsep.join(path + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
        if self.device == "cuda":
            env.pop("TRITON_INTERPRET", None)
        return env

    def record(self, name: str) -> dict:
        return next(r for r in self.results["parts"] if r["name"] == name)

    def save(self) -> None:
        """The JSON (atomically), then its markdown; a rendering error is logged, not raised."""
        self.results["meta"]["elapsed_s"] = round(self.elapsed(), 1)
        self.results["meta"]["files"] = [p.name for key, p in self.paths.items()
                                         if p.exists() or key in ("json", "md")]
        write_json_atomic(self.paths["json"], self.results)
        try:
            from .report import render_markdown

            tmp = self.paths["md"].with_name(f".{self.paths['md'].name}.tmp")
            tmp.write_text(render_markdown(self.results))
            os.replace(tmp, self.paths["md"])
        except Exception:  # noqa: BLE001 - the JSON holds everything; the report can be redone
            self.log("rendering the markdown failed:\n" + traceback.format_exc(limit=5))

    # ------------------------------------------------------------ the run

    def run(self, runners: Optional[dict] = None) -> int:
        """Every part in order; the exit status (see the module docstring)."""
        try:
            return self._run(dict(RUNNERS, **(runners or {})))
        finally:
            shutil.rmtree(self.tmp, ignore_errors=True)  # the carried wheels' folder too

    def _run(self, runners: dict) -> int:
        self.save()
        self.log(f"start: deadline {self.deadline_s:.0f} s, files {self.out}/{self.stem}*")
        stopped = None
        for part in self.parts:
            rec = self.record(part.name)
            if stopped:
                rec.update(status="skipped", reason=f"not run: the check was {stopped}")
                continue
            why = self._why_not(part)
            if why:
                rec.update(status="skipped", reason=why)
                self.log(f"{part.name}: skipped: {why}")
                self.save()
                continue
            budget = min(self.budgets[part.name], self.left())
            rec.update(status="running", reason="in progress when the check stopped",
                       started_s=round(self.elapsed(), 1), budget_given_s=round(budget, 1))
            self.save()
            self.log(f"{part.name}: start, budget {budget:.0f} s ({part.title})")
            t0 = time.monotonic()
            try:
                data = runners[part.name](self, budget)
            except (KeyboardInterrupt, _Stopped) as e:
                stopped = f"stopped ({e or type(e).__name__}) at {self.elapsed():.0f} s"
                data = {"status": "error", "reason": f"the check was {stopped}"}
            except Exception as e:  # noqa: BLE001 - one part's crash must not stop the check
                data = {"status": "error", "reason": f"{type(e).__name__}: {e}"[:500],
                        "traceback": traceback.format_exc(limit=8)}
            if data.get("status") not in PASSING + ("failed", "error", "timed_out"):
                data = dict(data, status="error", reason=f"the part returned status "
                            f"{data.get('status')!r}: {data.get('reason')}")
            rec.update(data)
            rec["elapsed_s"] = round(time.monotonic() - t0, 1)
            self.save()
            self.log(f"{part.name}: {rec['status']}" + (f": {rec['reason']}" if rec.get("reason") else "")
                     + f" ({rec['elapsed_s']:.0f} s)")
        self.results["meta"]["complete"] = not stopped
        self.save()
        code = self.exit_code()
        self.log(f"done in {self.elapsed():.0f} s, exit status {code}; files: "
                 + ", ".join(p.name for p in self.paths.values() if p.exists()))
        return code

    def _why_not(self, part: Part) -> Optional[str]:
        if self.only and part.name not in self.only and part.name != "setup":
            return f"not selected (--only {' '.join(sorted(self.only))})"
        if part.needs_cuda and self.device == "cuda" and not self.cuda:
            return ("no CUDA device: " + (self.probe.get("torch_error") or
                    f"torch {self.probe.get('torch', '?')} reports torch.cuda.is_available() False"
                    if self.probe else "the set-up did not run or did not report one"))
        if self.left() < part.min_s:
            return (f"not enough time left: {max(0.0, self.left()):.0f} s of the "
                    f"{self.deadline_s:.0f} s deadline, the part needs at least {part.min_s:.0f} s")
        return None

    def exit_code(self) -> int:
        for part in self.parts:
            status = self.record(part.name)["status"]
            if status not in PASSING and not (part.if_time_remains and status == "timed_out"):
                return 1
        if self.device == "cuda" and not self.cuda:
            return NO_CUDA_EXIT
        return 0


class _Stopped(Exception):
    """SIGTERM (a time limit around the whole check): stop, record, write the files."""


# ---------------------------------------------------------------- the parts

def run_setup(check: Check, budget: float) -> dict:
    t0 = time.monotonic()

    def setup_log(line: str) -> None:
        with open(check.paths["setup_log"], "a") as f:
            f.write(line.rstrip("\n") + "\n")

    meta = check.results["meta"]
    setup_log(f"gpu-check {meta['started']} at commit {meta['commit']}"
              f"{' (uncommitted changes)' if meta['dirty'] else ''}: {meta['command']}")
    smi = nvidia_smi()
    setup_log(smi)
    wheels = install_wheels(check.wheels, check.site, setup_log, timeout_s=budget / 2)
    check.env = check.environment(check.site if wheels["installed"] else None)
    setup_log(f"PYTHONPATH={check.env['PYTHONPATH']}")
    probe, why = in_fresh_process("bench.gpu_check.environment", [], PROBE_MARKER,
                                  max(5.0, budget - (time.monotonic() - t0)), check.env)
    record = {"nvidia_smi": smi, "wheels": wheels, "probe": probe}
    if probe is None or "probe_error" in probe:
        setup_log(f"the probe failed: {why or probe['probe_error']}")
        check.cuda = False
        return dict(record, status="error", reason=f"the probe failed: {why or probe['probe_error']}"[:500])
    for line in probe_lines(probe):
        setup_log(line)
    check.probe, check.cuda = probe, bool(probe.get("cuda_available"))
    problems = []
    if wheels["failed"]:
        problems.append(f"installing the carried wheels failed ({wheels['failed']})")
    imports = probe["check_imports"]
    if imports["failed"]:
        problems.append("the check's modules do not import: " + "; ".join(
            f"{k}: {v}" for k, v in imports["failed"].items()))
    if imports["pulled_in"]:
        problems.append(f"importing the check's modules imported {', '.join(imports['pulled_in'])}")
    if problems:
        return dict(record, status="failed", reason="; ".join(problems))
    return dict(record, status="ok", reason=None)


def _pytest_runner(selection):
    def run(check: Check, budget: float) -> dict:
        importable = check.probe.get("importable", {})
        gpu_bytes = (check.probe.get("device") or {}).get("memory_bytes")
        return run_selection(selection, budget, check.paths["tests_log"], check.tmp, check.env,
                             workers_for(importable.get("xdist", False), selection.expected,
                                         gpu_bytes),
                             importable.get("pytest_timeout", False))
    return run


def run_headline_part(check: Check, budget: float) -> dict:
    from .headline import run_headline

    rec = check.record("headline")

    def save(partial: dict) -> None:
        rec.update(partial)
        check.save()

    return run_headline(budget, check.env, check.log, save, device=check.device)


def run_fsdp_part(check: Check, budget: float) -> dict:
    from .training import run_fsdp

    return run_fsdp(budget, check.env, device=check.device)


def run_train_step_part(check: Check, budget: float) -> dict:
    from .training import run_train_step

    return run_train_step(budget, check.env, check.paths["log"], check.tmp, device=check.device)


RUNNERS: dict = {
    "setup": run_setup,
    "correctness": _pytest_runner(CORRECTNESS),
    "headline": run_headline_part,
    "behaviour": _pytest_runner(BEHAVIOUR),
    "fsdp": run_fsdp_part,
    "train_step": run_train_step_part,
}


# ---------------------------------------------------------------- command line

def dry_run_lines(args) -> list:
    from .headline import describe as describe_headline
    from .pytest_parts import describe as describe_tests
    from .training import describe_train_step

    xdist = util.find_spec("xdist") is not None
    timeout = util.find_spec("pytest_timeout") is not None
    detail = {
        "setup": [f"nvidia-smi; wheels of {args.wheels} missing here installed offline; "
                  "versions and importable modules (a fresh process)"],
        "correctness": describe_tests(CORRECTNESS, xdist, timeout),
        "headline": describe_headline(),
        "behaviour": describe_tests(BEHAVIOUR, xdist, timeout),
        "fsdp": ["python -m bench.memory.fsdp_step --device cuda: fully_shard over every decoder layer and an "
                 "SDFTModel, then over a plain student (the loss through its forward), each with a sharded "
                 "teacher, and SDFTTrainer with accelerate's FSDP2 (bf16), each step against the same step "
                 "unsharded"],
        "train_step": describe_train_step(),
    }
    budgets = _budgets(args.budget)
    lines = [f"gpu-check plan: deadline {args.deadline_s:.0f} s ({WRITE_RESERVE_S:.0f} s of it "
             "kept to write the files); every budget is capped by what is left of it", ""]
    total = 0.0
    for p in PARTS:
        b = budgets.get(p.name, p.budget_s)
        skip = args.only and p.name not in args.only and p.name != "setup"
        total += 0 if skip else b
        lines.append(f"{p.name:12s} budget {b:4.0f} s, starts with >= {p.min_s:.0f} s left"
                     f"{'  (not selected)' if skip else ''}: {p.title}")
        lines += [f"    {line}" for line in detail[p.name]]
    lines += ["", f"sum of the budgets: {total:.0f} s against {args.deadline_s - WRITE_RESERVE_S:.0f} s "
              "(parts that end early leave their time to the next; the last run only if time remains)",
              f"files: {args.out}/gpu-check-<date>-setup.log, -tests.log, .log, .json, .md"
              " (plots later: python -m bench.gpu_check.report FILE.json --plots)",
              f"pytest-xdist {'installed' if xdist else 'NOT installed'} here, pytest-timeout "
              f"{'installed' if timeout else 'NOT installed'} here (the check uses them where "
              "the GPU machine has them or the carried wheels bring them)"]
    return lines


def _budgets(items) -> dict:
    names = {p.name for p in PARTS}
    out = {}
    for item in items or ():
        name, _, value = item.partition("=")
        if name not in names:
            raise ValueError(f"--budget {item!r}: no part named {name!r} (parts: {', '.join(sorted(names))})")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--budget {item!r}: {value!r} is not a number of seconds") from None
        if not out[name] >= 0:
            raise ValueError(f"--budget {item!r}: must be >= 0 seconds")
    return out


def parse_args(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=default_out(),
                   help="folder of the files (default: $GPU_OUT, else $OUT, else bench/results)")
    p.add_argument("--deadline-s", type=float, default=DEFAULT_DEADLINE_S,
                   help=f"seconds for the whole check (default {DEFAULT_DEADLINE_S:.0f})")
    p.add_argument("--budget", action="append", metavar="PART=SECONDS",
                   help="another budget for a part (repeatable), e.g. headline=150")
    p.add_argument("--only", nargs="+", choices=[q.name for q in PARTS if q.name != "setup"],
                   help="run only these parts (the set-up always runs)")
    p.add_argument("--wheels", type=Path, default=REPO_ROOT / ".whl",
                   help="folder of carried wheels (default: .whl/ of the repository)")
    p.add_argument("--stem", help="file name stem (default: gpu-check-<date>, with --only the "
                                  "parts' names after it, then -2, -3... where that day's run left "
                                  "files; a given stem replaces its files)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and budgets; run nothing")
    args = p.parse_args(argv)
    args.argv = argv
    if not (args.deadline_s > 0):
        p.error(f"--deadline-s must be a positive number of seconds, got {args.deadline_s}")
    try:
        args.budgets = _budgets(args.budget)
    except ValueError as e:
        p.error(str(e))
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.dry_run:
        print("\n".join(dry_run_lines(args)))
        return 0
    check = Check(args.out, args.deadline_s, args.budgets, args.wheels, stem=args.stem,
                  only=args.only, argv=args.argv)

    def stop(signum, frame):
        raise _Stopped(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        return check.run()
    except (KeyboardInterrupt, _Stopped):  # between parts: what finished is written
        check.results["meta"]["complete"] = False
        check.save()
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
