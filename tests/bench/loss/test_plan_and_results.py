"""The benchmark runner's planning and bookkeeping, CPU only and fast (nothing is measured):
the time budget, the results JSON rewritten after every case, the CUDA order, the CUDA
dry-run estimate, and the skip reasons of ours' pinned implementations."""

import json

import pytest
import torch

import bench.loss.cli as bench_run
from bench.loss.contenders import CONTENDERS, SAME_AS_OURS, auto_impl, same_as_ours
from bench.loss.estimate import estimate_seconds
from bench.loss.plan import plan
from bench.loss.report import render_markdown
from bench.loss.report import main as report_main
from bench.driver.files import write_json_atomic
from bench.driver.loop import IN_PROGRESS_REASON, PENDING_REASON, budget_reason
from bench.loss.results import failed
from bench.loss.cli import main
from bench.loss.shapes import CPU_GRID, FWD_BWD, GPU_GRID, GPU_HEADLINE, GROUPS

VARIANTS = ("ours_triton", "ours_chunked", "ours_torch")


def _only(tmp_path, pattern="cpu-quick-*.json"):
    (path,) = tmp_path.glob(pattern)
    return path


def test_budget_zero_skips_every_case_and_still_writes_json_and_markdown(tmp_path):
    main(["--device", "cpu", "--quick", "--in-process", "--budget-s", "0", "--out", str(tmp_path)])
    json_path = _only(tmp_path)
    results = json.loads(json_path.read_text())
    planned = {(s.N, s.D, s.V, g, n): reason for s, g, n, reason in plan("cpu", True)}
    assert results["meta"]["complete"] and results["meta"]["budget_s"] == 0
    assert len(results["cases"]) == len(planned) == results["meta"]["cases_planned"]
    for c in results["cases"]:
        assert c["status"] == "skipped", c
        # A case the plan would run gets the budget's reason; one it skips keeps its own.
        own = planned[(c["N"], c["D"], c["V"], c["group"], c["contender"])]
        assert c["reason"] == (own or "time budget of 0 s spent"), c
    assert budget_reason(400.0) == "time budget of 400 s spent"
    assert all(t["passed"] is None for t in results["targets"])
    md = json_path.with_suffix(".md").read_text()
    assert "time budget of 0 s spent" in md and "Time budget: 0 s" in md


def test_negative_budget_is_refused():
    with pytest.raises(SystemExit):
        bench_run.parse_args(["--device", "cpu", "--budget-s", "-1"])


def test_write_json_atomic_replaces_whole_and_leaves_no_temp(tmp_path):
    path = tmp_path / "r.json"
    write_json_atomic(path, {"a": [1, float("nan")]})
    write_json_atomic(path, {"a": [2, float("inf")], "b": None})
    assert json.loads(path.read_text()) == {"a": [2, None], "b": None}  # strict JSON
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def _fake_result(spec):
    return failed(spec, "fake measurement")


def test_results_json_is_rewritten_after_every_case_and_survives_a_kill(tmp_path, monkeypatch):
    # Stand-in measurements: each one first reads the file as it is on disk at that moment;
    # the third "dies" as a killed run would.
    seen = []
    entries = plan("cpu", True, groups=["fwd_bwd"])

    def fake_measure(spec):
        (path,) = tmp_path.glob("*.json")
        on_disk = json.loads(path.read_text())
        seen.append(on_disk)
        if len(seen) == 3:
            raise KeyboardInterrupt  # a BaseException: nothing in the loop catches it
        return _fake_result(spec)

    monkeypatch.setattr(bench_run, "measure", fake_measure)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--quick", "--in-process", "--groups", "fwd_bwd",
              "--out", str(tmp_path)])

    runs = [i for i, e in enumerate(entries) if not e[3]]  # cases that call measure
    for k, on_disk in enumerate(seen):
        cases = on_disk["cases"]
        assert not on_disk["meta"]["complete"] and len(cases) == len(entries)
        done = runs[k]  # every entry before the k-th measured one is finished on disk
        assert all(c["status"] != "pending" for c in cases[:done]), k
        assert all(c["status"] == "pending" for c in cases[done:]), k
        # The one being measured is marked as in progress; the later ones as not reached.
        assert cases[done]["reason"] == IN_PROGRESS_REASON, k
        assert all(c["reason"] == PENDING_REASON for c in cases[done + 1:]), k

    # What the killed run left: valid JSON, finished cases then pending ones, renderable.
    json_path = _only(tmp_path)
    left = json.loads(json_path.read_text())
    assert not left["meta"]["complete"]
    finished = [c for c in left["cases"] if c["status"] != "pending"]
    assert len(finished) == runs[2] and [c["contender"] for c in finished][:2] == ["reference", "floor"]
    assert report_main([str(json_path)]) == 0
    md = json_path.with_suffix(".md").read_text()
    assert "**Partial results**" in md and "## Never reached" in md
    stopped = entries[runs[2]]
    assert f"In progress when it stopped: {stopped[1]} N={stopped[0].N}" in md
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_complete_run_has_no_pending_case_and_renders_no_partial_note(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_run, "measure", _fake_result)
    main(["--device", "cpu", "--quick", "--in-process", "--out", str(tmp_path)])
    results = json.loads(_only(tmp_path).read_text())
    assert results["meta"]["complete"]
    assert {c["status"] for c in results["cases"]} == {"error", "skipped"}
    assert "Partial results" not in render_markdown(results)


def test_the_time_line_names_the_contenders_that_warm_up_on_cpu_only_there():
    cases = [_case("ours", 8, 4, 16, 1.0), _case("floor", 8, 4, 16, 1.0),
             _case("liger_jsd", 8, 4, 16, 1.0)]
    meta = {"device": "cpu", "dtype": "float32", "date": "d", "versions": {}, "objective": "o",
            "repeats": 3, "warmup": 0, "memory": "m"}
    (line,) = [l for l in render_markdown({"meta": meta, "cases": cases}).splitlines()
               if l.startswith("- Time:")]
    assert CONTENDERS["ours"].cpu_warmup == 1 and not CONTENDERS["liger_jsd"].cpu_warmup
    assert f"after 0 warm-up call(s) (1 more for {CONTENDERS['ours'].title}: their first" in line
    assert "Liger" not in line
    cuda = render_markdown({"meta": {**meta, "device": "cuda", "warmup": 2}, "cases": cases})
    assert "after 2 warm-up call(s); ratios" in cuda


def test_cuda_plan_runs_the_headline_shape_then_forward_backward_then_the_rest():
    entries = plan("cuda", quick=False)  # planning needs no GPU
    head = entries[0][0]
    assert head.headline and (head.model, head.N) == GPU_HEADLINE
    # All of the headline shape's groups before anything else.
    n_head = sum(1 for s, _, _, _ in entries if s == head)
    assert all(s == head for s, _, _, _ in entries[:n_head])
    assert [g for g in dict.fromkeys(g for s, g, _, _ in entries if s == head)] == list(head.groups)
    # Then forward+backward at every other shape, in grid order, then the other groups.
    rest = entries[n_head:]
    n_fb = sum(1 for _, g, _, _ in rest if g == FWD_BWD)
    assert all(g == FWD_BWD for _, g, _, _ in rest[:n_fb])
    assert list(dict.fromkeys(s for s, _, _, _ in rest[:n_fb])) == [s for s in GPU_GRID if not s.headline]
    assert all(g != FWD_BWD for _, g, _, _ in rest[n_fb:]) and rest[n_fb:]
    # Within each shape and group the reference runs first: it is the oracle.
    firsts = {}
    for s, g, name, _ in entries:
        firsts.setdefault((s, g), name)
    assert set(firsts.values()) == {"reference"}


def test_cpu_plan_keeps_the_grid_order():
    shapes = list(dict.fromkeys(s for s, _, _, _ in plan("cpu", quick=False)))
    assert shapes == list(CPU_GRID)


def test_ours_variants_on_cpu_are_skipped_with_their_reason():
    entries = plan("cpu", quick=True)
    for shape, group, name, reason in entries:
        if name in VARIANTS:
            assert reason and reason == CONTENDERS[name].cpu_reason, (name, reason)
        if name == "ours":
            assert reason is None
    assert {n for _, _, n, _ in entries} >= set(VARIANTS)
    assert all(CONTENDERS[n].cpu_runs == "never" for n in VARIANTS)


def test_on_cuda_only_the_variant_that_auto_runs_is_skipped():
    import sdft_kernels

    # The bench asks the library which implementation impl="auto" runs.
    assert auto_impl("cuda") == sdft_kernels.default_impl("cuda")
    assert auto_impl("cpu") == sdft_kernels.default_impl("cpu") == "torch"
    reasons = {n: r for _, _, n, r in plan("cuda", quick=True)}
    assert reasons["ours"] is None
    for name in VARIANTS:
        same = CONTENDERS[name].impl == auto_impl("cuda")
        assert reasons[name] == (SAME_AS_OURS if same else None), name
    assert sum(reasons[n] == SAME_AS_OURS for n in VARIANTS) == 1
    assert same_as_ours(CONTENDERS["ours_torch"], "cpu") and not same_as_ours(CONTENDERS["ours"], "cuda")


def test_ours_calls_impl_auto_and_each_variant_its_impl(monkeypatch):
    import sdft_kernels

    from bench.loss.inputs import build_inputs

    calls = []
    monkeypatch.setattr(sdft_kernels, "fused_linear_sdft_loss",
                        lambda *a, impl, **k: calls.append(impl) or a[0].sum())
    inputs = build_inputs(4, 3, 5, device="cpu", dtype=torch.float32,
                          teacher=True, requires_grad=False)
    for name in ("ours",) + VARIANTS:
        CONTENDERS[name].build(inputs, "fwd", "cpu")()
    assert calls == ["auto", "triton", "triton_chunked", "torch"]


def test_cuda_dry_run_needs_no_gpu_and_says_whether_the_grid_fits(capsys):
    assert main(["--device", "cuda", "--dry-run", "--budget-s", "400"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["fwd_bwd", "Llama-3-8B", "N=8192"] and "reference" in lines[0]
    assert "TFLOP/s bf16" in lines[-2]
    assert "--budget-s 400" in lines[-1] and lines[-1].split()[0] in ("fits", "does")
    est = estimate_seconds(plan("cuda", False), 5, True, device="cuda")
    assert 60 < est < 3600


def test_cpu_dry_run_estimate_is_unchanged_by_the_skipped_variants():
    entries = plan("cpu", quick=False)
    without = [e for e in entries if e[2] not in VARIANTS]
    assert estimate_seconds(entries, 3, False) == estimate_seconds(without, 3, False)


def test_a_shape_named_by_hand_keeps_its_headline_marking_on_either_device():
    from bench.loss.cli import parse_args

    cuda = parse_args(["--device", "cuda", "--dry-run", "--shape", "8192,4096,128256",
                       "--shape", "4096,4096,128256", "--shape", "100,64,1000"]).shape
    assert [s.headline for s in cuda] == [True, False, False]
    assert [s.model for s in cuda] == ["Llama-3-8B", "Llama-3-8B", None]
    cpu = parse_args(["--device", "cpu", "--dry-run", "--shape", "2048,512,32768",
                      "--shape", "1024,256,65536"]).shape
    assert [s.headline for s in cpu] == [True, False]
    assert all(s.groups == GROUPS for s in cuda + cpu)  # every group runs at a named shape


def _case(contender, N, D, V, median_s, headline=False):
    return {"group": FWD_BWD, "contender": contender, "N": N, "D": D, "V": V, "status": "ok",
            "median_s": median_s, "mem_bytes": 1, "headline": headline}


def test_the_d256_target_judges_the_worst_sweep_shape():
    from bench.loss.targets import evaluate

    cases = [_case("floor", 2048, 512, 32768, 1.0, True), _case("ours", 2048, 512, 32768, 0.9, True),
             _case("floor", 1024, 256, 32768, 1.0), _case("ours", 1024, 256, 32768, 1.1),
             _case("floor", 2048, 256, 65536, 2.0), _case("ours", 2048, 256, 65536, 2.6),
             _case("floor", 4096, 1024, 32768, 1.0), _case("ours", 4096, 1024, 32768, 9.0)]  # not D=256
    targets = {t["name"]: t for t in evaluate({"meta": {"device": "cpu"}, "cases": cases})}
    headline = targets["ours time / floor time"]
    assert headline["value"] == pytest.approx(0.9) and headline["passed"]
    sweep = targets["ours time / floor time, worst at D=256"]
    assert sweep["value"] == pytest.approx(1.3) and sweep["passed"] is False
    assert "N=2048 V=65536" in sweep["note"] and "2 shape(s)" in sweep["note"]


def test_the_floor_targets_take_ours_paired_ratio_where_there_is_one():
    from bench.loss.results import add_ratios
    from bench.loss.targets import evaluate

    # The floor's own process ran slow (2.0 s), so ours over it says 0.6; timed beside ours,
    # the floor took ~1.0 s and ours is 1.2x it: the paired ratio is the one judged.
    ours = _case("ours", 2048, 512, 32768, 1.2, True)
    ours.update(times_s=[1.2, 1.3, 1.1], floor_times_s=[1.0, 1.0, 1.0], paired_floor_ratio=1.2)
    eager = _case("ours_eager", 2048, 512, 32768, 1.5, True)  # no floor beside it: the floor row's
    cases = [_case("floor", 2048, 512, 32768, 2.0, True), ours, eager,
             _case("floor", 1024, 256, 32768, 1.0), _case("ours", 1024, 256, 32768, 1.1)]
    cases[-1].update(paired_floor_ratio=1.25)
    add_ratios(cases)
    assert ours["time_over_floor"] == pytest.approx(1.2) and ours["time_over_floor_case"] == pytest.approx(0.6)
    assert eager["time_over_floor"] == pytest.approx(0.75) == eager["time_over_floor_case"]
    targets = {t["name"]: t for t in evaluate({"meta": {"device": "cpu"}, "cases": cases})}
    headline = targets["ours time / floor time"]
    assert headline["value"] == pytest.approx(1.2) and headline["passed"] is False
    assert "beside ours" in headline["note"]
    sweep = targets["ours time / floor time, worst at D=256"]
    assert sweep["value"] == pytest.approx(1.25) and "beside ours" in sweep["note"]
    # Targets against other contenders stay ratios of medians.
    assert targets["ours time / reference time"]["value"] is None
    table = render_markdown({"meta": {"device": "cpu", "dtype": "float32", "date": "d", "versions": {},
                                      "objective": "o", "repeats": 3, "warmup": 0, "memory": "m"},
                             "cases": cases, "targets": evaluate({"meta": {"device": "cpu"}, "cases": cases})})
    row = next(line for line in table.splitlines() if line.startswith('| ours (impl="auto")'))
    assert "| 1.20x | 1 s |" in row  # its ratio, then the floor beside it


def test_only_ours_cpu_variants_time_the_floor_beside_them():
    from bench.loss.plan import case_spec

    shape = CPU_GRID[0]
    paired = {name for name in CONTENDERS if case_spec(shape, FWD_BWD, name, "cpu", 3, 0)["paired_floor"]}
    assert paired == {"ours", "ours_eager", "ours_torch"}
    assert not any(case_spec(shape, FWD_BWD, name, "cuda", 3, 0)["paired_floor"] for name in CONTENDERS)


def test_paired_ratio_is_the_median_of_the_rounds_ratios():
    from bench.loss.measure_case import paired_ratio

    # The machine slowed down in the last round: both calls took twice as long, the ratio held.
    assert paired_ratio([1.1, 1.2, 2.4], [1.0, 1.0, 2.0]) == pytest.approx(1.2)
    with pytest.raises(ValueError, match="3 calls, 2 floor calls"):
        paired_ratio([1.0, 1.0, 1.0], [1.0, 1.0])
