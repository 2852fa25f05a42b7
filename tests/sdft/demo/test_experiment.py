"""``sdft demo --quick`` end to end, as a user runs it: world, pretraining, every row, the frontier,
the outputs, and a clean console (about a minute from a cold cache on 2 cores)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdft.demo.cli import parse_config
from sdft.demo.experiment import CURVES_PNG, LOG, RESULTS, TABLE, TRADEOFF_PNG, DemoConfig
from sdft.demo.methods import ROW_NAMES

LABELS = ("task", "new_facts", "old_facts")


@pytest.mark.slow
def test_quick_demo_runs_and_reports(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "sdft", "demo", "--quick", "--out", str(out), "--cache-dir",
                           str(cache)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    # The console: progress lines on stderr and nothing else; the tables on stdout.
    progress = [line for line in proc.stderr.splitlines() if line.strip()]
    assert progress and all(line.startswith("[sdft demo]") for line in progress), proc.stderr[-3000:]
    assert "runs 7/7" in progress[-1]
    assert "| stage 2 trains |" in proc.stdout and "| lambda |" in proc.stdout
    for noise in ("Loading weights", "train_runtime", "leaked", "Warning"):
        assert noise not in proc.stdout + proc.stderr
    assert (out / LOG).stat().st_size > 0
    for png in (CURVES_PNG, TRADEOFF_PNG):
        assert (out / png).stat().st_size > 1000

    saved = json.loads((out / RESULTS).read_text())
    cfg = DemoConfig.quick_config()
    keys = ["sft", "sdft_0.5", "sdft_2", "attention_only", "ffn_only", "mlp_frozen", "known_only"]
    assert [m["key"] for m in saved["methods"]] == keys
    assert list(saved["table"]) == keys
    assert len(saved["runs"]) == len(keys) * len(cfg.seeds)
    counts = saved["knowledge_counts"]
    n_split = {"task": counts["train_known"]["known"], "new_facts": counts["train_unknown"]["unknown"],
               "old_facts": counts["heldout_known"]["known"]}
    for run in saved["runs"]:
        history = run["history"]
        every = cfg.eval_every_epochs
        assert [h["epoch"] for h in history] == [float(e) for e in range(0, int(cfg.stage2_epochs) + 1, every)]
        # Stage 2 starts where stage 1 ended: the first record is the stage-1 model's accuracy.
        assert {k: history[0][k] for k in run["after_stage1"]} == run["after_stage1"]
        for record in history:
            for label in LABELS:
                # SliCK filtering: every split holds exactly the facts classified for it.
                assert record[f"{label}_n"] == n_split[label]
                assert 0 <= record[f"{label}_correct"] <= record[f"{label}_n"]
                assert record[label] == record[f"{label}_correct"] / record[f"{label}_n"]
        assert 0 < run["trained_parameters"] <= run["total_parameters"]
    # Stage 1 is the same for every method of a seed.
    assert len({json.dumps(r["after_stage1"], sort_keys=True) for r in saved["runs"]}) == 1
    for key, stats in saved["table"].items():
        for metric in LABELS + ("forgetting",):
            mean, std = stats[metric]
            assert 0.0 <= mean <= 1.0 and std == 0.0  # one seed: no spread
        assert stats["seeds"] == list(cfg.seeds)
    full = {k: v["total_parameters"] for k, v in saved["table"].items()}
    trained = {k: v["trained_parameters"] for k, v in saved["table"].items()}
    assert all(trained[k] == full[k] for k in ("sft", "sdft_0.5", "sdft_2", "known_only"))
    assert all(trained[k] < full[k] for k in ("attention_only", "ffn_only", "mlp_frozen"))

    # The frontier: one point per lambda, with its per-seed counts.
    front = saved["frontier"]
    assert [p["kl_weight"] for p in front["points"]] == list(cfg.kl_weights)
    for p in front["points"]:
        final = next(r for r in saved["runs"] if r["method"] == p["key"])["history"][-1]
        assert p["new_facts_correct"] == [final["new_facts_correct"]]
        assert p["new_facts_n"] == [n_split["new_facts"]] and p["old_facts_n"] == [n_split["old_facts"]]
        assert p["new_facts"][0] == final["new_facts"]
    assert front["best_kl_weight"] in (None, *cfg.kl_weights)
    table_md = (out / TABLE).read_text()
    assert table_md.count("\n| SDFT lambda") == len(cfg.kl_weights)
    assert all(stats["label"] in table_md for stats in saved["table"].values())


def test_command_line_selects_rows_lambdas_and_settings():
    cfg = parse_config(["--rows", "sft", "sdft", "--lambdas", "0.5", "0.75", "--seeds", "3", "4", "--epochs", "12",
                        "--eval-every", "1", "--lr", "2e-4", "--layers", "4", "--out", "x"])
    assert cfg.rows == ("sft", "sdft") and cfg.kl_weights == (0.5, 0.75) and cfg.seeds == (3, 4)
    assert (cfg.stage2_epochs, cfg.eval_every_epochs, cfg.learning_rate, cfg.layers, cfg.out_dir) == \
        (12, 1, 2e-4, 4, "x")
    assert [m.key for m in cfg.methods()] == ["sft", "sdft_0.5", "sdft_0.75"]
    assert parse_config([]) == DemoConfig()
    assert set(DemoConfig().rows) == set(ROW_NAMES)
    quick = parse_config(["--quick"])
    assert quick.quick and quick.seeds == (0,) and quick.world.n_old < DemoConfig().world.n_old
    with pytest.raises(SystemExit):
        parse_config(["--rows", "lora"])
