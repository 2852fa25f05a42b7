"""The five-minute GPU check (bench/gpu_check/, bench/gpu_check.sh) on a machine without a
GPU: the plan, the command's files and exit status, a part that crashes or runs out of time,
the test selections, the headline part's per-process cases and oracle, the training parts,
the carried wheels, and that nothing it runs imports datasets or trl."""

import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from bench.gpu_check import check as gpu_check
from bench.gpu_check.check import PARTS, Check, main
from bench.gpu_check.report import main as report_main
from bench.gpu_check.report import render_markdown
from bench.gpu_check.environment import PROBE_MARKER, install_wheels
from bench.gpu_check.pytest_parts import BEHAVIOUR, CORRECTNESS, run_selection
from bench.driver.processes import run_logged
from bench.loss.shapes import FWD_BWD, Shape

REPO_ROOT = Path(__file__).resolve().parents[3]
MAX_FILES = 6

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _strict_json(path: Path) -> dict:
    def refuse(value):
        raise ValueError(f"non-finite number {value} in {path.name}")
    return json.loads(path.read_text(), parse_constant=refuse)


def _env(**extra) -> dict:
    path = [str(REPO_ROOT), str(REPO_ROOT / "kernels")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(path + [os.environ.get("PYTHONPATH", "")]),
                **extra)


@pytest.fixture
def without_datasets_and_trl(tmp_path) -> dict:
    """An environment in which ``import datasets`` and ``import trl`` fail, as on a GPU
    machine that lacks them: a process that imports either at module import time fails."""
    blocker = tmp_path / "blocked"
    for name in ("datasets", "trl"):
        (blocker / name).mkdir(parents=True)
        (blocker / name / "__init__.py").write_text(
            f"raise ImportError('{name} is not installed on this machine')\n")
    env = _env()
    env["PYTHONPATH"] = os.pathsep.join([str(blocker), env["PYTHONPATH"]])
    return env


# ---------------------------------------------------------------- the command

def test_dry_run_prints_every_part_its_budget_and_the_headline_cases(capsys):
    assert main(["--dry-run", "--budget", "headline=150"]) == 0
    out = capsys.readouterr().out
    for part in PARTS:
        assert part.name in out
    assert "headline     budget  150 s" in out
    assert "Llama-3-8B N=8192 D=4096 V=128256" in out
    for contender in ("reference", "floor", "ours", "ours_triton", "ours_torch", "liger_jsd",
                      "orda", "cce", "liger_flce"):
        assert f" {contender} " in out
    assert CORRECTNESS.keyword in out and BEHAVIOUR.keyword in out


@pytest.mark.parametrize("argv", [["--budget", "headline"], ["--budget", "nopart=3"],
                                  ["--budget", "headline=-1"], ["--deadline-s", "0"]])
def test_bad_budgets_are_refused(argv):
    with pytest.raises(SystemExit) as e:
        main(argv + ["--dry-run"])
    assert e.value.code == 2


def test_cpu_run_of_the_script_records_the_cuda_parts_as_skipped_and_exits_3(tmp_path):
    out, wheels = tmp_path / "out", tmp_path / "no-wheels"
    wheels.mkdir()
    env = dict(os.environ, GPU_PYTHON=sys.executable, GPU_OUT=str(out), GPU_CHECK_DEADLINE_S="120")
    proc = subprocess.run(["bash", "bench/gpu_check.sh", "--wheels", str(wheels)], cwd=REPO_ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == gpu_check.NO_CUDA_EXIT, proc.stdout + proc.stderr
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES, files
    (json_path,) = out.glob("gpu-check-*.json")
    results = _strict_json(json_path)
    assert results["meta"]["complete"] and sorted(results["meta"]["files"]) == files
    status = {p["name"]: p for p in results["parts"]}
    assert status["setup"]["status"] == "ok", status["setup"].get("reason")
    assert status["setup"]["probe"]["versions"]["torch"]
    for part in PARTS[1:]:
        assert status[part.name]["status"] == "skipped"
        assert status[part.name]["reason"].startswith("no CUDA device"), part.name
    md = json_path.with_suffix(".md").read_text()
    assert md.startswith("# GPU check") and "no CUDA device" in md
    assert "torch" in (out / f"{json_path.stem}-setup.log").read_text()
    assert "exit status 3" in (out / f"{json_path.stem}.log").read_text()


def test_a_second_check_that_day_writes_beside_the_first(tmp_path):
    out = tmp_path / "out"
    first = Check(out, 60.0, {}, tmp_path / "no-wheels")
    first.paths["json"].write_text("{}")
    second = Check(out, 60.0, {}, tmp_path / "no-wheels")
    headline = Check(out, 60.0, {}, tmp_path / "no-wheels", only=["headline"])
    assert second.stem == f"{first.stem}-2" and headline.stem == f"{first.stem}-headline"
    assert first.paths["json"].read_text() == "{}"  # the first run's files stay
    given = Check(out, 60.0, {}, tmp_path / "no-wheels", stem=first.stem)
    assert given.stem == first.stem and not first.paths["json"].exists()


# ---------------------------------------------------------------- parts that fail

def _check(tmp_path, deadline_s=60.0, **kw) -> Check:
    return Check(tmp_path / "out", deadline_s, {}, tmp_path / "no-wheels", stem="check", **kw)


def _pretend_cuda(check, budget):
    check.cuda, check.probe = True, {"importable": {}}
    return {"status": "ok", "reason": None}


def test_a_part_that_crashes_or_times_out_is_recorded_and_the_next_part_runs(tmp_path):
    seen = []

    def crash(check, budget):
        raise RuntimeError("illegal memory access")

    def sleep_past_the_budget(check, budget):
        seen.append(_strict_json(check.paths["json"]))  # written before this part started
        code = run_logged([sys.executable, "-c", "import time; time.sleep(60)"],
                          check.paths["log"], 1.0, grace_s=2.0)
        return {"status": "timed_out" if code is None else "ok", "reason": f"exit {code}"}

    def refused(check, budget):
        return {"status": "refused", "reason": "ValueError: FSDP shards the LM head"}

    def fine(check, budget):
        seen.append(_strict_json(check.paths["json"]))
        return {"status": "ok", "reason": None, "numbers": [1.5]}

    def out_of_time(check, budget):  # the last part, run if time remains: does not fail it
        return {"status": "timed_out", "reason": "stopped at its share"}

    check = _check(tmp_path)
    t0 = time.monotonic()
    code = check.run({"setup": _pretend_cuda, "correctness": crash,
                      "headline": sleep_past_the_budget, "behaviour": fine, "fsdp": refused,
                      "train_step": fine})
    assert time.monotonic() - t0 < 30  # the sleeping command was stopped at its budget
    assert code == 1
    results = _strict_json(check.paths["json"])
    status = {p["name"]: p for p in results["parts"]}
    assert status["correctness"]["status"] == "error"
    assert "illegal memory access" in status["correctness"]["reason"]
    assert "RuntimeError" in status["correctness"]["traceback"]
    assert status["headline"]["status"] == "timed_out"
    assert status["behaviour"]["status"] == "ok" and status["fsdp"]["status"] == "refused"
    assert status["train_step"]["numbers"] == [1.5]
    # Each part found the previous parts' results already on disk.
    before_headline = {p["name"]: p["status"] for p in seen[0]["parts"]}
    assert before_headline["correctness"] == "error" and before_headline["headline"] == "running"
    assert {p["name"]: p["status"] for p in seen[1]["parts"]}["headline"] == "timed_out"
    md = check.paths["md"].read_text()
    assert "illegal memory access" in md and "FSDP shards the LM head" in md
    assert len(list((tmp_path / "out").iterdir())) <= MAX_FILES

    seen.clear()
    again = _check(tmp_path / "again")
    assert again.run({"setup": _pretend_cuda, "train_step": out_of_time,
                      **{p.name: fine for p in PARTS[1:-1]}}) == 0


def test_a_part_starts_only_with_its_minimum_time_left_and_a_skip_for_time_passes(tmp_path):
    parts = (gpu_check.Part("setup", "set-up", 10, 0, False),
             gpu_check.Part("first", "runs", 10, 5, True),
             gpu_check.Part("long", "needs more than is left", 10, 100, True),
             gpu_check.Part("short", "fits in what is left", 10, 1, True))
    ran = []

    def run(check, budget):
        ran.append(budget)
        return {"status": "ok", "reason": None}

    check = _check(tmp_path, deadline_s=gpu_check.WRITE_RESERVE_S + 30, parts=parts)
    assert check.run({"setup": _pretend_cuda, "first": run, "long": run, "short": run}) == 0
    status = {p["name"]: p for p in _strict_json(check.paths["json"])["parts"]}
    assert [status[n]["status"] for n in ("first", "long", "short")] == ["ok", "skipped", "ok"]
    assert status["long"]["reason"].startswith("not enough time left")
    assert len(ran) == 2 and all(b <= 10 for b in ran)  # each capped by its own budget


def test_without_cuda_the_cuda_parts_do_not_run(tmp_path):
    ran = []

    def record(check, budget):
        ran.append(budget)
        return {"status": "ok", "reason": None}

    def no_cuda(check, budget):
        check.cuda, check.probe = False, {"torch": "2.x"}
        return {"status": "ok", "reason": None}

    check = _check(tmp_path)
    runners = {p.name: record for p in PARTS}
    runners["setup"] = no_cuda
    assert check.run(runners) == gpu_check.NO_CUDA_EXIT
    assert ran == []


# ---------------------------------------------------------------- test selections

def test_the_selections_pick_every_implementation_in_bf16_at_the_llama3_head(
        tmp_path, without_datasets_and_trl):
    # On CPU conftest skips the CUDA tests: collection, -k, the JUnit report and its parsing
    # still run; with pytest-xdist (two processes) for one selection, without for the other.
    env = without_datasets_and_trl
    r = run_selection(CORRECTNESS, 240, tmp_path / "tests.log", tmp_path, env, workers=2,
                      per_test_timeout=True)
    ids = [t["id"] for t in r["tests"]]
    assert len(ids) == CORRECTNESS.expected, ids
    for impl in ("triton", "triton_chunked", "torch"):
        for divergence in ("forward_kl", "reverse_kl", "jsd"):
            test = "test_matches_truth_within_rounding"
            assert f"{test}[bfloat16-{divergence}-V128256-{impl}]" in ids
    assert r["status"] == "skipped" and "needs a CUDA GPU" in r["reason"]
    assert "-n" in r["command"] and "--timeout=90" in r["command"]

    r = run_selection(BEHAVIOUR, 240, tmp_path / "tests.log", tmp_path, env, workers=1,
                      per_test_timeout=False)
    ids = {t["id"] for t in r["tests"]}
    assert len(ids) == BEHAVIOUR.expected
    assert {"test_no_logits_sized_allocation", "test_autocast_bfloat16_on_cuda",
            "test_deterministic[triton_chunked]", "test_no_host_synchronisation[triton]"} <= ids
    assert "-n" not in r["command"]
    log = (tmp_path / "tests.log").read_text()
    assert log.count("===== correctness") == 1 and log.count("===== behaviour") == 1


def test_a_test_part_past_its_budget_is_stopped_and_recorded(tmp_path):
    r = run_selection(CORRECTNESS, 0.5, tmp_path / "tests.log", tmp_path, _env(), workers=1,
                      per_test_timeout=False)
    assert r["status"] == "timed_out" and r["exit_code"] is None
    assert "budget of 0 s" in r["reason"] or "budget of 1 s" in r["reason"]


# ---------------------------------------------------------------- the headline part

def test_headline_cases_run_each_in_a_process_with_the_reference_as_oracle(tmp_path, monkeypatch):
    import bench.gpu_check.headline as headline

    real, specs = headline.in_fresh_process, []

    def crash_the_floor(module, args, marker, timeout_s, env=None):
        spec = json.loads(args[0])
        specs.append(spec)
        if spec["contender"] == "floor":  # as a CUDA fault ends its process
            return None, "measuring process failed, exit code -6: an illegal memory access"
        return real(module, args, marker, timeout_s, env)

    monkeypatch.setattr(headline, "in_fresh_process", crash_the_floor)
    saved = []
    order = ((FWD_BWD, "reference"), (FWD_BWD, "floor"), (FWD_BWD, "ours"),
             (FWD_BWD, "ours_triton"))
    record = headline.run_headline(300, _env(), lambda line: None,
                                   lambda rec: saved.append(json.loads(json.dumps(rec))),
                                   device="cpu", shape=Shape(48, 16, 300, model="tiny", headline=True),
                                   order=order, repeats=1)
    cases = {c["contender"]: c for c in record["cases"]}
    assert cases["reference"]["status"] == "ok" and cases["reference"]["agreement"]["is_oracle"]
    assert cases["floor"]["status"] == "error" and "illegal memory access" in cases["floor"]["reason"]
    assert cases["ours"]["status"] == "ok" and cases["ours"]["agreement"]["agrees"]
    assert cases["ours"]["oracle_values"] is None  # the reference's values came in its spec
    assert specs[2]["oracle"] == cases["reference"]["oracle_values"]
    assert cases["ours_triton"]["status"] == "skipped"
    assert all(c["headline"] for c in record["cases"])
    assert record["status"] == "failed" and "floor" in record["reason"]
    # Saved before the first case (all pending, the first in progress) and after every case.
    assert len(saved) == len(order) + 1
    assert [c["status"] for c in saved[0]["cases"]] == ["pending"] * len(order)
    assert saved[0]["cases"][0]["reason"].startswith("in progress")
    assert [c["status"] for c in saved[2]["cases"]] == ["ok", "error", "pending", "pending"]

    results = {"meta": {"date": "d", "complete": True, "deadline_s": 280, "stem": "s",
                        "elapsed_s": 1.0, "files": []},
               "parts": [dict(record, name="headline", title="Headline", budget_s=110)]}
    (tmp_path / "s.json").write_text(json.dumps(results))
    assert report_main([str(tmp_path / "s.json"), "--plots"]) == 0
    md = (tmp_path / "s.md").read_text()
    assert "ours (impl=\"auto\")" in md and "illegal memory access" in md
    assert (tmp_path / "s-headline.png").is_file()


def test_a_headline_budget_spent_before_ours_runs_is_a_timeout():
    import bench.gpu_check.headline as headline

    record = headline.run_headline(0, _env(), lambda line: None, lambda rec: None, device="cpu",
                                   shape=Shape(48, 16, 300, headline=True),
                                   order=((FWD_BWD, "reference"), (FWD_BWD, "ours")))
    assert [c["status"] for c in record["cases"]] == ["skipped", "skipped"]
    assert record["status"] == "timed_out" and "ours" in record["reason"]


# ---------------------------------------------------------------- training parts

def test_fsdp_and_train_step_parts_run_without_datasets_and_trl(tmp_path, without_datasets_and_trl):
    from bench.gpu_check.training import run_fsdp, run_train_step
    from bench.train_step.cases import QUICK_MODELS

    env = without_datasets_and_trl
    r = run_fsdp(240, env, device="cpu")
    assert r["status"] == "ok", (r.get("reason"), r.get("traceback"))

    r = run_train_step(400, env, tmp_path / "check.log", tmp_path, device="cpu",
                       model=QUICK_MODELS[1].name, cases=("sft_hf", "sdft_frozen"),
                       extra_args=("--quick", "--in-process", "--threads", "1"), min_run_s=1)
    assert r["status"] == "ok", r["reason"]
    assert [run["precision"] for run in r["runs"]] == ["bf16", "bf16_mixed"]
    plain, mixed = (run["results"] for run in r["runs"])
    assert plain["meta"]["dtype"] == "bfloat16" and plain["meta"]["autocast"] is None
    assert mixed["meta"]["dtype"] == "float32" and mixed["meta"]["autocast"] == "bfloat16"
    for results in (plain, mixed):
        assert {c["case"]: c["status"] for c in results["cases"]} == {"sft_hf": "ok", "sdft_frozen": "ok"}
    assert "training step, float32 weights" in (tmp_path / "check.log").read_text()

    results = {"meta": {"date": "d", "complete": True, "deadline_s": 280, "stem": "s",
                        "elapsed_s": 1.0, "files": []},
               "parts": [dict(r, name="train_step", title="Training step", budget_s=80)]}
    (tmp_path / "s.json").write_text(json.dumps(results))
    assert report_main([str(tmp_path / "s.json"), "--plots"]) == 0
    assert "SFT, HF loss (baseline)" in (tmp_path / "s.md").read_text()
    assert (tmp_path / "s-train-step.png").is_file()


def test_train_step_with_no_time_left_is_skipped(tmp_path):
    from bench.gpu_check.training import run_train_step

    r = run_train_step(10, _env(), tmp_path / "check.log", tmp_path, device="cpu")
    assert r["status"] == "skipped" and all(run["status"] == "skipped" for run in r["runs"])


# ---------------------------------------------------------------- set-up

def test_probe_imports_what_the_check_runs_without_datasets_and_trl(without_datasets_and_trl):
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_check.environment"], cwd=REPO_ROOT,
                          env=without_datasets_and_trl, capture_output=True, text=True, timeout=240)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(PROBE_MARKER))
    probe = json.loads(line[len(PROBE_MARKER):])
    assert probe["check_imports"]["failed"] == {}, probe["check_imports"]
    assert probe["check_imports"]["pulled_in"] == []
    assert probe["cuda_default_impl"] == "triton_chunked"


def _wheel(folder: Path, name: str) -> Path:
    """A minimal pure-Python wheel of distribution ``name`` with one module, ``name``."""
    path = folder / f"{name}-1.0-py3-none-any.whl"
    info = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}.py", "VALUE = 42\n")
        z.writestr(f"{info}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\n"
                                    "Root-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", "")
    return path


def _imports_probe_pkg(site: Path) -> str:
    out = subprocess.run([sys.executable, "-c", "import sdft_check_probe_pkg as m; print(m.VALUE)"],
                         env=dict(os.environ, PYTHONPATH=str(site)), capture_output=True,
                         text=True, timeout=60)
    return out.stdout.strip() or out.stderr


def test_carried_wheels_are_installed_only_where_missing(tmp_path):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "sdft_check_probe_pkg")
    _wheel(wheels, "pytest")  # this Python has pytest: its own stays in use
    lines = []
    r = install_wheels(wheels, tmp_path / "site", lines.append)
    assert r["installed"] == ["sdft_check_probe_pkg-1.0-py3-none-any.whl"], (r, lines)
    assert "pytest" in r["present"] and r["failed"] is None
    assert _imports_probe_pkg(tmp_path / "site") == "42"


def test_carried_wheels_are_unpacked_where_pip_does_not_run(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    _wheel(wheels, "sdft_check_probe_pkg")
    monkeypatch.setattr(sys, "executable", "/bin/false")  # a Python without a working pip
    lines = []
    r = install_wheels(wheels, tmp_path / "site", lines.append)
    monkeypatch.undo()
    assert r["installed"] == ["sdft_check_probe_pkg-1.0-py3-none-any.whl"] and r["failed"] is None
    assert any(line.startswith("pip install failed") for line in lines)
    assert _imports_probe_pkg(tmp_path / "site") == "42"


def test_report_renders_a_check_stopped_part_way(tmp_path):
    check = _check(tmp_path)
    check.save()  # as written before the first part: every part pending
    md = render_markdown(_strict_json(check.paths["json"]))
    assert "**Partial results**" in md and "0 of 6 parts" in md


def _gone(pid: int, within_s: float = 10.0) -> bool:
    end = time.monotonic() + within_s
    while time.monotonic() < end:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.1)
    return False


def test_a_case_past_its_time_limit_is_killed_with_the_processes_it_started(tmp_path):
    # As torch.compile's compile workers: a helper process the measuring process started.
    from bench.driver.processes import in_fresh_process

    (tmp_path / "spawns_and_hangs.py").write_text(
        "import subprocess, sys, time\n"
        "helper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(tmp_path / 'pid')!r}, 'w').write(str(helper.pid))\n"
        "time.sleep(120)\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    t0 = time.monotonic()
    result, why = in_fresh_process("spawns_and_hangs", [], "RESULT ", 5, env)
    assert result is None and why == "timed out after 5 s"
    assert time.monotonic() - t0 < 30
    assert _gone(int((tmp_path / "pid").read_text()))


def test_test_processes_are_bounded_by_the_gpu_memory(monkeypatch):
    from bench.gpu_check.pytest_parts import workers_for

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert workers_for(False, 11, 80 * 2**30) == 1
    assert workers_for(True, 11, 78 * 2**30) == 4     # an H100: 4 x 16 GiB
    assert workers_for(True, 11, 139 * 2**30) == 6    # an H200: the cap
    assert workers_for(True, 11, 8 * 2**30) == 1
    assert workers_for(True, 3, None) == 3


def test_a_check_that_cannot_start_leaves_its_error_in_the_setup_log(tmp_path):
    # A Python that cannot import torch, say: the check writes nothing itself.
    broken = tmp_path / "python"
    broken.write_text("#!/bin/sh\necho 'ImportError: libcudart.so.12: cannot open shared "
                      "object file' >&2\nexit 1\n")
    broken.chmod(0o755)
    out = tmp_path / "out"
    proc = subprocess.run(["bash", "bench/gpu_check.sh"], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60,
                          env=dict(os.environ, GPU_PYTHON=str(broken), GPU_OUT=str(out)))
    assert proc.returncode == 1
    (log,) = out.glob("gpu-check-*-setup.log")
    assert "did not start (exit status 1)" in log.read_text()
    assert "libcudart.so.12" in log.read_text()
