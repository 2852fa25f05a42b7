"""Smoke test of the benchmark harness (bench/) on tiny shapes: it runs, checks agreement,
and writes a results JSON, its markdown and a plot. Timings at these shapes mean nothing."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.loss.measure_case import RESULT_MARKER
from bench.loss.cli import main
from bench.loss.plan import PAIRED_ROUNDS

REPO_ROOT = Path(__file__).resolve().parents[3]


def test_quick_run_writes_consistent_results(tmp_path):
    # In-process and on one thread to stay within seconds on a shared machine (tiny GEMMs on
    # two contended OpenMP threads crawl). The quick grid has two vocabularies: a V plot.
    main(["--device", "cpu", "--quick", "--in-process", "--repeats", "2", "--threads", "1",
          "--out", str(tmp_path)])
    (json_path,) = tmp_path.glob("cpu-quick-*.json")
    assert json_path.with_suffix(".md").is_file()
    assert (tmp_path / f"{json_path.stem}-vs-V.png").is_file()
    results = json.loads(json_path.read_text())

    cases = results["cases"]
    assert {c["group"] for c in cases} == {"fwd_bwd", "fwd", "ce_fwd_bwd"}
    for c in cases:
        name = f"{c['group']} V={c['V']} {c['contender']}"
        if c["status"] == "skipped":
            assert c["reason"], name
            continue
        assert c["status"] == "ok", (name, c.get("reason"))
        # --repeats 2, except ours' variants: the probed call and their paired rounds
        calls = 1 + PAIRED_ROUNDS if c.get("floor_times_s") else 2
        assert len(c["times_s"]) == calls and math.isfinite(c["time_over_floor"]), name
        assert math.isfinite(c["flop_rate"]) and c["mem_bytes"] is not None, name
        if c["contender"] == "floor":
            continue
        assert c["agreement"] is not None and c["agreement"]["agrees"], name
        assert math.isfinite(c["mem_over_reference"]), name
        if c["contender"] != "reference":
            assert "loss_rel_err" in c["agreement"], name
            if c["group"] != "fwd":
                assert "grad_weight_rel_err" in c["agreement"], name
    ran = {c["contender"] for c in cases if c["status"] == "ok"}
    assert {"reference", "floor", "ours", "liger_jsd", "orda", "cce"} <= ran
    # The quick grid has no D=256 sweep: that target alone says so instead of judging.
    sweep = [t for t in results["targets"] if "worst at D=" in t["name"]]
    assert len(sweep) == 1 and sweep[0]["value"] is None and "no evaluable" in sweep[0]["note"]
    assert all(math.isfinite(t["value"]) for t in results["targets"] if t not in sweep)
    ours = next(c for c in cases if c["contender"] == "ours" and c["group"] == "fwd_bwd")
    assert ours["first_call_s"] > 0  # its warm-up call, compilation (if any) and all, is reported
    assert any(c["contender"] == "ours_eager" and c["status"] == "ok" for c in cases)


def test_measure_case_in_a_fresh_process_rebuilds_the_oracle():
    # No oracle passed: the measuring process must compute the reference's values itself.
    spec = {"group": "fwd_bwd", "contender": "ours", "device": "cpu", "dtype": "float32",
            "N": 48, "D": 16, "V": 300, "repeats": 1, "warmup": 0, "seed": 3, "oracle": None}
    proc = subprocess.run([sys.executable, "-m", "bench.loss.measure_case", json.dumps(spec)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER))
    result = json.loads(line[len(RESULT_MARKER):])
    assert result["status"] == "ok", result.get("reason")
    assert result["agreement"]["agrees"] and result["oracle_values"] is not None
    assert result["mem_bytes"] >= 0 and result["median_s"] > 0


def test_a_contender_that_disagrees_is_not_timed():
    from bench.loss.measure_case import measure

    spec = {"group": "fwd", "contender": "ours", "device": "cpu", "dtype": "float32",
            "N": 32, "D": 8, "V": 100, "repeats": 3, "warmup": 0, "seed": 5,
            "oracle": {"loss": 1.0}}  # not this problem's loss
    result = measure(spec)
    assert result["status"] == "disagrees" and not result["agreement"]["agrees"]
    assert result["times_s"] is None and result["median_s"] is None


def test_ours_times_the_floor_beside_its_calls_on_the_same_inputs():
    from bench.loss.measure_case import measure
    from bench.loss.plan import case_spec
    from bench.loss.shapes import Shape

    spec = case_spec(Shape(64, 16, 500), "fwd_bwd", "ours", "cpu", repeats=3, warmup=0)
    assert spec["paired_floor"] and spec["paired_rounds"] == PAIRED_ROUNDS
    result = measure(spec)
    assert result["status"] == "ok", result.get("reason")
    times, floor_times = result["times_s"], result["floor_times_s"]
    # the probed call, then the rounds: the probed call has no floor call of its own
    assert len(floor_times) == len(times) - 1 == PAIRED_ROUNDS and all(t > 0 for t in floor_times)
    ratios = sorted(t / f for t, f in zip(times[1:], floor_times))
    assert result["paired_floor_ratio"] == pytest.approx(ratios[len(ratios) // 2])
    reference = measure({**spec, "contender": "reference", "paired_floor": False})
    assert "floor_times_s" not in reference
