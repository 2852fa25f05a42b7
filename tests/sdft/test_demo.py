"""The quick demo end to end: loss, trainer, freezing and evaluation together (about a minute)."""

from __future__ import annotations

import json

import pytest

from sdft.demo import METHODS, DemoConfig, format_table, run_demo, summarise


@pytest.mark.slow
def test_quick_demo_runs_and_reports(tmp_path):
    cfg = DemoConfig.quick_config(out_dir=str(tmp_path / "out"), cache_dir=str(tmp_path / "cache"))
    results = run_demo(cfg, log=lambda *a: None)
    out = tmp_path / "out"
    assert (out / "accuracy_vs_step.png").stat().st_size > 1000
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["table"]) == set(METHODS)
    for method, stats in saved["table"].items():
        for key in ("task", "new_facts", "old_facts"):
            mean, std = stats[key]
            assert 0.0 <= mean <= 1.0 and std == 0.0  # one seed: no spread
    for run in results["runs"]:
        assert run["history"][0]["step"] == 0 and run["history"][-1]["step"] > 0
        for record in run["history"]:
            for label in ("task", "new_facts", "old_facts"):
                n, correct = record[f"{label}_n"], record[f"{label}_correct"]
                assert n > 0 and 0 <= correct <= n
                assert record[label] == correct / n
        # Stage 1 is the same for every method: each starts stage 2 from the same accuracies.
        assert run["history"][0] == {**results["runs"][0]["history"][0]}
    # SliCK filtering: the held-out split holds only facts the pretrained model answers.
    counts = saved["knowledge_counts"]["heldout_known"]
    assert run["history"][0]["old_facts_n"] == counts["known"]
    table = (out / "table.md").read_text()
    assert table.count("\n") == 2 + len(METHODS)
    for method in ("SFT", "SDFT", "FFN frozen"):
        assert method in table


def test_summary_mean_and_spread_over_seeds():
    def run(seed, method, old):
        history = [{"step": 0, "task": 1.0, "new_facts": 0.0, "old_facts": 1.0},
                   {"step": 10, "task": 1.0, "new_facts": 0.5, "old_facts": old}]
        return {"seed": seed, "method": method, "history": history}

    table = summarise([run(0, "sft", 0.8), run(1, "sft", 0.9), run(2, "sft", 0.7)])
    mean, std = table["sft"]["old_facts"]
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert table["sft"]["forgetting_from_start"][0] == pytest.approx(0.2)
    assert "80.0 ± 10.0" in format_table(table)
