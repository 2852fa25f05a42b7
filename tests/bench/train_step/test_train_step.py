"""Smoke tests of the training-step benchmark (bench/train_step/) on tiny models: every
case builds and steps, the losses of cases that compute the same objective agree, the
results JSON, markdown and plot are written, and the CUDA plan needs no GPU. Timings at
these sizes mean nothing."""

import json
import math

import pytest

import bench.driver.loop as loop
import bench.train_step.cli as train_step
from bench.train_step.cli import main, plan
from bench.train_step.cases import CASES, QUICK_MODELS, peft_available
from bench.train_step.measure import PHASES, measure_times
from bench.train_step.report import main as report_main
from bench.train_step.results import case_record

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _load(tmp_path, pattern):
    (path,) = tmp_path.glob(pattern)
    return path, json.loads(path.read_text())


def _by_case(results, model):
    return {c["case"]: c for c in results["cases"] if c["model"] == model}


def test_quick_run_steps_every_case_and_writes_results(tmp_path):
    main(["--device", "cpu", "--quick", "--in-process", "--threads", "1", "--repeats", "2",
          "--out", str(tmp_path)])
    json_path, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    assert json_path.with_suffix(".md").is_file() and json_path.with_suffix(".png").is_file()
    meta = results["meta"]
    assert meta["complete"] and meta["dtype"] == "float32" and len(meta["load_average_start"]) == 3
    assert len(results["cases"]) == len(QUICK_MODELS) * len(CASES)

    lora = {n for n, c in CASES.items() if c.lora}
    for c in results["cases"]:
        if c["case"] in lora and not peft_available():
            assert c["status"] == "skipped" and "peft" in c["reason"]
            continue
        assert c["status"] == "ok", (c["model"], c["case"], c.get("reason"), c.get("traceback"))
        assert len(c["times_s"]) == 2 and c["median_s"] > 0 and c["mem_bytes"] > 0
        assert math.isfinite(c["time_over_sft"]) and math.isfinite(c["mem_over_sft"])
        b = c["breakdown"]
        assert b["weights"] > 0 and b["optimizer"] == 2 * b["gradients"] > 0
        assert b["activations"] > 0
        assert (b["teacher"] > 0) == (CASES[c["case"]].teacher not in (None, "adapter"))
        p = c["phases_s"]
        assert set(p) == set(PHASES) and min(p.values()) >= 0
        assert min(p["student_forward"], p["head_and_loss"], p["backward"], p["optimizer"]) > 0
        # A teacher decoder runs for a frozen copy and for the adapters-off base; not for a
        # cache (its lookup is part of the loss) nor without a teacher.
        assert (p["teacher_forward"] > 0) == (CASES[c["case"]].teacher not in (None, "cache"))

    for model in QUICK_MODELS:
        found = _by_case(results, model.name)
        loss = {name: c["first_loss"] for name, c in found.items()}
        # The same objective, computed two ways, on the same model and batch.
        assert loss["sft_ours"] == pytest.approx(loss["sft_hf"], rel=1e-5)
        assert loss["sdft_frozen"] == pytest.approx(loss["sdft_naive"], rel=1e-5)
        # The KL is not zero (the student moved away from the teacher) and is small.
        assert 0 < loss["sdft_frozen"] - loss["sft_hf"] < 0.1
        # A bf16 teacher (a copy, or cached hidden states) changes the loss only a little.
        for name in ("sdft_frozen_bf16", "sdft_cached"):
            assert loss[name] == pytest.approx(loss["sdft_frozen"], rel=1e-3)
        assert found["sdft_cached"]["cache_build_s"] > 0
        assert found["sdft_frozen"]["versus"] == "sdft_naive"
        assert found["sdft_frozen"]["time_over_versus"] > 0

    targets = results["targets"]
    assert targets and all(t["model"] == QUICK_MODELS[0].name for t in targets)
    assert all(t["passed"] is not None and math.isfinite(t["value"]) for t in targets)
    md = json_path.with_suffix(".md").read_text()
    assert "## Targets" in md and "Memory breakdown" in md and "SFT, HF loss (baseline)" in md
    assert "Where the step's time goes" in md
    assert report_main([str(json_path)]) == 0  # re-renders from the JSON alone


def test_bf16_student_runs_in_process_as_on_cuda(tmp_path):
    # The CUDA run's student dtype and in-process loop, on CPU: bf16 weights and optimizer
    # state, the bf16 copy skipped as a duplicate of the frozen copy.
    main(["--device", "cpu", "--quick", "--in-process", "--threads", "1", "--dtype", "bfloat16",
          "--warmup", "2", "--repeats", "1", "--models", QUICK_MODELS[1].name,
          "--cases", "sft_hf", "sdft_frozen", "sdft_frozen_bf16", "sdft_cached", "sdft_naive",
          "--out", str(tmp_path)])
    _, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    found = _by_case(results, QUICK_MODELS[1].name)
    assert found["sdft_frozen_bf16"]["status"] == "skipped"
    for name in ("sft_hf", "sdft_frozen", "sdft_cached", "sdft_naive"):
        c = found[name]
        assert c["status"] == "ok" and c["dtype"] == "bfloat16", (name, c.get("reason"))
        assert c["breakdown"]["weights"] == 2 * c["params"]  # bf16: two bytes a parameter
    assert found["sdft_frozen"]["first_loss"] == pytest.approx(found["sdft_naive"]["first_loss"], rel=2e-2)


def test_a_case_in_a_fresh_process(tmp_path):
    main(["--device", "cpu", "--quick", "--threads", "1", "--repeats", "1",
          "--models", QUICK_MODELS[1].name, "--cases", "sft_hf", "sdft_cached",
          "--out", str(tmp_path)])
    _, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    assert not results["meta"]["in_process"]
    for c in results["cases"]:
        assert c["status"] == "ok", (c["case"], c.get("reason"))
        assert c["breakdown"]["loss_and_rest"] == c["mem_bytes"] - sum(
            v for k, v in c["breakdown"].items() if k != "loss_and_rest")


def test_cuda_plan_needs_no_gpu_and_puts_the_headline_model_first(capsys):
    assert main(["--device", "cuda", "--dry-run", "--budget-s", "60"]) == 0
    lines = capsys.readouterr().out.splitlines()
    entries = plan("bfloat16", quick=False)
    assert entries[0][0].headline and entries[0][1] == "sft_hf"
    assert len(lines) == len(entries) + 2
    assert "skip: the student is bf16 already" in next(ln for ln in lines if "sdft_frozen_bf16" in ln)
    assert "8 x 1024 tokens" in lines[-2]
    assert "--budget-s 60" in lines[-1] and lines[-1].split()[0] in ("fits", "does")
    # On CPU (fp32) every case runs, the bf16 copy included.
    assert all(reason is None for _, name, reason in plan("float32", quick=False)
               if not CASES[name].lora)


def test_the_real_models_shape_is_run_only_when_named(capsys):
    """SmolLM2-135M's shape steps when --models names it, not by default; its config builds a
    model of exactly the real one's parameter count (134,515,008, tied head included)."""
    from transformers import AutoModelForCausalLM

    from bench.train_step.cases import NAMED_MODELS

    assert all(m.name != "smollm2-135m" for m, _, _ in plan("float32", quick=False))
    entries = plan("float32", quick=False, model_names=["smollm2-135m"])
    assert {m.name for m, _, _ in entries} == {"smollm2-135m"} and len(entries) == len(CASES)
    (spec,) = NAMED_MODELS
    model = AutoModelForCausalLM.from_config(spec.config(2048))
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert spec.body_params == sum(p.numel() for n, p in model.named_parameters()
                                   if ".layers." in n and p.dim() == 2)
    assert main(["--device", "cpu", "--models", "smollm2-135m", "--batch", "1", "512", "--dry-run"]) == 0
    assert "1 x 512 tokens" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["--device", "cpu", "--models", "no-such-model", "--dry-run"])


def test_budget_zero_skips_every_case_and_still_renders(tmp_path):
    main(["--device", "cpu", "--quick", "--in-process", "--budget-s", "0", "--out", str(tmp_path)])
    json_path, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    assert results["meta"]["complete"]
    assert {c["status"] for c in results["cases"]} == {"skipped"}
    assert all(t["passed"] is None for t in results["targets"])
    assert "time budget of 0 s spent" in json_path.with_suffix(".md").read_text()


def test_a_killed_run_leaves_its_finished_cases_and_the_rest_pending(tmp_path, monkeypatch):
    calls = []

    def fake_memory(spec):
        calls.append(spec["case"])
        if len(calls) == 2:
            raise KeyboardInterrupt  # as a kill would stop the loop
        return case_record(spec, "error", "fake measurement")

    monkeypatch.setattr(train_step, "measure_memory", fake_memory)
    with pytest.raises(KeyboardInterrupt):
        main(["--device", "cpu", "--quick", "--in-process", "--out", str(tmp_path)])
    json_path, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    assert not results["meta"]["complete"]
    statuses = [c["status"] for c in results["cases"]]
    assert statuses[0] == "error" and set(statuses[1:]) == {"pending"}
    assert results["cases"][1]["reason"].startswith("in progress")
    assert results["cases"][2]["reason"].startswith("not run yet")
    assert report_main([str(json_path)]) == 0
    assert "**Partial results**" in json_path.with_suffix(".md").read_text()


def test_the_timing_pass_interleaves_the_cases_and_rotates_their_order(tmp_path, monkeypatch):
    seen = []

    def fake_times(spec):
        seen.append(spec)
        return {"status": "ok", "reason": None,
                "times_s": {n: [1.0 + k, 2.0 + k, 3.0 + k] for k, n in enumerate(spec["cases"])}}

    monkeypatch.setattr(train_step, "measure_memory",
                        lambda spec: dict(case_record(spec), mem_bytes=100, first_loss=1.0))
    monkeypatch.setattr(train_step, "measure_times", fake_times)
    main(["--device", "cpu", "--quick", "--in-process", "--repeats", "3", "--out", str(tmp_path)])
    _, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    # One timing pass per model, over all of its cases that were measured.
    assert [s["model"] for s in seen] == [m.name for m in QUICK_MODELS]
    assert all(s["repeats"] == 3 and s["warmup"] == 1 for s in seen)
    found = _by_case(results, QUICK_MODELS[0].name)
    assert found["sft_hf"]["median_s"] == 2.0 and found["sft_ours"]["time_over_sft"] == 1.5
    assert found["sft_hf"]["time_reason"] is None


def test_measure_times_rotates_the_order_of_the_rounds():
    spec = {"model": QUICK_MODELS[1].name, "device": "cpu", "dtype": "float32", "sequences": 1,
            "seq_len": 8, "seed": 0, "threads": 1, "warmup": 1, "repeats": 3,
            "cases": ["sft_hf", "sft_ours", "sdft_cached"]}
    out = measure_times(spec)
    assert out["status"] == "ok", out.get("reason")
    assert [order[0] for order in out["order"]] == ["sft_hf", "sft_ours", "sdft_cached"]
    assert all(len(t) == 3 and min(t) > 0 for t in out["times_s"].values())


def test_a_budget_spent_mid_model_still_times_the_cases_it_measured(tmp_path, monkeypatch):
    clock = {"now": 0.0}
    measured = []

    def fake_memory(spec):
        measured.append(spec["case"])
        if len(measured) == 2:
            clock["now"] = 1e6  # the budget runs out during the second case
        return dict(case_record(spec), mem_bytes=100, first_loss=1.0)

    def fake_times(spec):
        return {"status": "ok", "reason": None, "times_s": {n: [1.0] for n in spec["cases"]}}

    monkeypatch.setattr(loop.time, "monotonic", lambda: clock["now"])
    monkeypatch.setattr(train_step, "measure_memory", fake_memory)
    monkeypatch.setattr(train_step, "measure_times", fake_times)
    main(["--device", "cpu", "--quick", "--in-process", "--budget-s", "10", "--out", str(tmp_path)])
    _, results = _load(tmp_path, "train-step-cpu-quick-*.json")
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    assert [c["case"] for c in ok] == measured == ["sft_hf", "sft_ours"]
    assert all(c["median_s"] == 1.0 for c in ok)  # timed although the budget was spent
    rest = [c for c in results["cases"] if c["status"] != "ok"]
    assert rest and all(c["reason"] == "time budget of 10 s spent" for c in rest)


def test_autocast_runs_the_forward_in_bf16_with_float32_weights(tmp_path):
    # TrainingArguments(bf16=True): float32 weights, gradients and AdamW state, the forward
    # autocast to bf16. Its first loss must be near the float32 step's but not equal to it
    # (else the autocast did not reach the decoder and the loss).
    args = ["--device", "cpu", "--quick", "--in-process", "--threads", "1", "--warmup", "1",
            "--repeats", "1", "--models", QUICK_MODELS[1].name, "--cases", "sft_hf", "sdft_frozen"]
    main(args + ["--out", str(tmp_path / "fp32")])
    main(args + ["--autocast", "bfloat16", "--out", str(tmp_path / "amp")])
    _, plain = _load(tmp_path / "fp32", "train-step-cpu-quick-*.json")
    path, mixed = _load(tmp_path / "amp", "train-step-cpu-quick-autocast-bfloat16-*.json")
    assert mixed["meta"]["autocast"] == "bfloat16" and mixed["meta"]["dtype"] == "float32"
    for name in ("sft_hf", "sdft_frozen"):
        a, b = _by_case(plain, QUICK_MODELS[1].name)[name], _by_case(mixed, QUICK_MODELS[1].name)[name]
        assert b["status"] == "ok" and b["autocast"] == "bfloat16", (name, b.get("reason"))
        assert b["breakdown"]["weights"] == 4 * b["params"]  # the weights stay float32
        assert b["first_loss"] == pytest.approx(a["first_loss"], rel=2e-2), name
        assert b["first_loss"] != a["first_loss"], name
        assert b["median_s"] is not None, name
    assert "float32 weights, bfloat16 autocast" in path.with_suffix(".md").read_text()
