"""The shared driver of bench/ on its own: the run's bookkeeping (pending, in progress,
skipped for the budget, the metadata it keeps), the common flags and the run's metadata.
The benchmarks' own tests run it through their loops; these pin what both rely on."""

import argparse
import json

import pytest
import torch

import bench.driver.loop as loop
from bench.driver.flags import REPEATS, add_run_flags, check_run_flags
from bench.driver.loop import IN_PROGRESS_REASON, PENDING_REASON, Run, budget_reason
from bench.driver.meta import memory_method, run_meta


def _records(n):
    return [{"name": f"c{i}", "status": "pending", "reason": PENDING_REASON} for i in range(n)]


def test_every_change_is_saved_with_the_case_in_progress_named(monkeypatch):
    saved = []
    run = Run({"device": "cpu"}, _records(3), lambda r: saved.append(json.loads(json.dumps(r))),
              budget_s=None)
    assert run.results["meta"] == {"device": "cpu", "budget_s": None, "cases_planned": 3,
                                   "complete": False, "elapsed_s": 0.0}
    run.starting(0)
    run.finished(0, {"name": "c0", "status": "ok", "reason": None}, next_starts=True)
    run.finished(1, {"name": "c1", "status": "skipped", "reason": "why"})
    run.complete()
    assert [[c["reason"] for c in s["cases"]] for s in saved] == [
        [IN_PROGRESS_REASON, PENDING_REASON, PENDING_REASON],
        [None, IN_PROGRESS_REASON, PENDING_REASON],
        [None, "why", PENDING_REASON],
        [None, "why", PENDING_REASON],
    ]
    assert [s["meta"]["complete"] for s in saved] == [False, False, False, True]
    run.starting(3)  # past the last case: only a save
    assert len(saved) == 5


def test_the_budget_starts_no_case_once_spent_and_keeps_the_plans_reasons(monkeypatch):
    clock = {"now": 100.0}
    monkeypatch.setattr(loop.time, "monotonic", lambda: clock["now"])
    run = Run({}, _records(2), lambda r: None, budget_s=10.0, min_left_s=3.0)
    assert run.skip_reason(None) is None and run.skip_reason("not on CPU") == "not on CPU"
    clock["now"] = 106.0  # 4 s left, more than min_left_s
    assert run.skip_reason(None) is None and run.left() == pytest.approx(4.0)
    clock["now"] = 107.5  # 2.5 s left: no case starts
    assert run.skip_reason(None) == budget_reason(10.0) == "time budget of 10 s spent"
    assert run.skip_reason("not on CPU") == "not on CPU"
    unbounded = Run({}, _records(1), lambda r: None, budget_s=None)
    clock["now"] = 1e9
    assert unbounded.skip_reason(None) is None


def test_a_part_of_a_larger_file_keeps_no_bookkeeping_in_its_meta():
    meta = {"device": "cuda"}
    run = Run(meta, _records(1), lambda r: None, budget_s=5.0, bookkeeping=False)
    run.save()
    assert meta == {"device": "cuda"}


def _parse(argv):
    p = argparse.ArgumentParser()
    add_run_flags(p, quick_help="q", repeats_help="r", in_process_help="i", budget_help="b")
    args = p.parse_args(argv)
    check_run_flags(p, args, argv)
    return args


@pytest.mark.parametrize("device", ["cpu", "cuda"], ids=["cpu-defaults", "gpu-defaults"])
def test_flags_take_the_devices_default_repeats_and_record_the_command(device):
    args = _parse(["--device", device, "--dry-run"])
    assert args.repeats == REPEATS[device] and args.argv == ["--device", device, "--dry-run"]
    assert _parse(["--repeats", "2"]).repeats == 2


@pytest.mark.parametrize("argv, message", [
    (["--repeats", "0"], "--repeats must be at least 1"),
    (["--budget-s", "-1"], "--budget-s must be a finite number"),
    (["--budget-s", "nan"], "--budget-s must be a finite number"),
    (["--budget-s", "inf"], "--budget-s must be a finite number"),
])
def test_flags_reject_what_cannot_run(argv, message, capsys):
    with pytest.raises(SystemExit):
        _parse(argv)
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_device_is_refused_unless_only_planned(capsys):
    assert _parse(["--device", "cuda", "--dry-run"]).device == "cuda"
    with pytest.raises(SystemExit):
        _parse(["--device", "cuda"])
    assert "no CUDA device is available" in capsys.readouterr().err


def test_run_meta_puts_each_benchmarks_fields_between_the_common_ones():
    args = _parse(["--in-process", "--threads", "1"])
    meta = run_meta(args, "2026-01-01", "python -m bench.x", {"torch": "t"}, dtype="float32")
    assert meta["command"] == "python -m bench.x --in-process --threads 1"
    assert meta["in_process"] is True and meta["dtype"] == "float32" and meta["quick"] is False
    assert list(meta)[:3] == ["device", "date", "quick"] and list(meta)[-1] == "command"
    assert memory_method(args, "peak RSS") == "peak RSS, this process (--in-process)"
    assert memory_method(_parse([]), "peak RSS") == "peak RSS, a fresh process per case"


def test_a_second_run_on_the_same_day_gets_a_name_of_its_own(tmp_path):
    from bench.driver.loop import results_path

    first = results_path(tmp_path / "results", "cpu-2026-12-07")
    assert first == tmp_path / "results" / "cpu-2026-12-07.json"
    first.write_text("{}")
    (tmp_path / "results" / "cpu-2026-12-07-vs-N.png").write_text("")  # a plot: not a run of that name
    second = results_path(tmp_path / "results", "cpu-2026-12-07")
    assert second.name == "cpu-2026-12-07-2.json"
    second.with_suffix(".md").write_text("")  # a rendered report alone also claims the name
    assert results_path(tmp_path / "results", "cpu-2026-12-07").name == "cpu-2026-12-07-3.json"
    assert first.read_text() == "{}"


def test_the_rss_probe_charges_a_call_for_the_chunk_buffers_it_kept_from_the_last(monkeypatch):
    """Our loss keeps its CPU chunk buffers between calls; a probed second call must still be
    charged for them, as a first call in a fresh process would be."""
    monkeypatch.setenv("SDFT_COMPILE", "never")  # the eager epilogue keeps buffers alike, uncompiled
    from bench.driver.probes import RssProbe
    from sdft_kernels import fused_linear_sdft_loss, kept_workspace_bytes

    g = torch.Generator().manual_seed(0)
    N, D, V = 256, 16, 32768
    h, W = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    ht, Wt = torch.randn(N, D, generator=g), torch.randn(V, D, generator=g)
    labels = torch.randint(0, V, (N,), generator=g)

    def call():
        fused_linear_sdft_loss(h, W, labels, ht, Wt, impl="torch", chunk_size=N)

    call()
    kept = kept_workspace_bytes()
    assert kept >= 2 * N * V * 4  # the student's and the teacher's logits at least: 64 MiB
    with RssProbe() as probe:
        call()
    if not probe.method.startswith("peak"):
        pytest.skip("no resettable peak RSS on this system")
    assert probe.bytes >= 0.9 * kept, (probe.bytes, kept)
