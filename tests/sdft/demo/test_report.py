"""Tests of sdft.demo.report: mean and spread over seeds, the lambda frontier and its verdict."""

from __future__ import annotations

import pytest

from sdft.demo.methods import build_methods
from sdft.demo.report import format_frontier, format_table, frontier, summarise

METHODS = build_methods(("sft", "sdft", "known_only"), (0.25, 0.5, 1.0), temperature=0.5)


def run(seed, method, new, old, n_new=200, n_old=400):
    """A two-record history: held-out accuracy starts at 1, ends at ``old``; new facts end at ``new``."""
    def record(step, new_acc, old_acc):
        nc, oc = round(new_acc * n_new), round(old_acc * n_old)
        return {"epoch": float(step), "step": step, "task": 1.0, "task_correct": 10, "task_n": 10,
                "new_facts": nc / n_new, "new_facts_correct": nc, "new_facts_n": n_new,
                "old_facts": oc / n_old, "old_facts_correct": oc, "old_facts_n": n_old}
    return {"seed": seed, "method": method, "history": [record(0, 0.0, 1.0), record(8, new, old)]}


def test_summary_mean_and_spread_over_seeds():
    table = summarise([run(0, "sft", 1.0, 0.8), run(1, "sft", 1.0, 0.9), run(2, "sft", 1.0, 0.7)], METHODS)
    mean, std = table["sft"]["old_facts"]
    assert mean == pytest.approx(0.8) and std == pytest.approx(0.1)
    assert table["sft"]["forgetting"][0] == pytest.approx(0.2)
    assert table["sft"]["seeds"] == [0, 1, 2] and table["sft"]["label"] == "SFT (all parameters)"
    assert "80.0 ± 10.0" in format_table(table)


def test_forgetting_is_the_drop_from_the_peak():
    r = run(0, "sft", 1.0, 0.85)
    r["history"].insert(1, {**r["history"][0], "epoch": 1.0, "step": 4})
    r["history"][1].update(old_facts=1.0)
    r["history"][0].update(old_facts=0.95)           # held-out accuracy rises first, then falls
    entry = summarise([r], METHODS)["sft"]
    assert entry["forgetting"][0] == pytest.approx(0.15)
    assert entry["forgetting_from_start"][0] == pytest.approx(0.10)


def _runs(points):
    """``points``: method -> (new-fact accuracy, held-out accuracy at the end), for seeds 0, 1."""
    return [run(seed, key, new + 0.01 * seed, old - 0.01 * seed) for key, (new, old) in points.items()
            for seed in (0, 1)]


def test_frontier_one_point_per_lambda_with_counts_and_the_best_lambda():
    runs = _runs({"sft": (0.95, 0.85), "sdft_0.25": (0.90, 0.90), "sdft_0.5": (0.86, 0.94),
                  "sdft_1": (0.60, 0.99), "known_only": (0.0, 0.99)})
    front = frontier(runs, METHODS)
    assert [p["kl_weight"] for p in front["points"]] == [0.25, 0.5, 1.0]
    for p in front["points"]:
        assert p["seeds"] == [0, 1]
        assert p["new_facts_n"] == [200, 200] and p["old_facts_n"] == [400, 400]
        assert [c / n for c, n in zip(p["new_facts_correct"], p["new_facts_n"])] == \
            pytest.approx([p["new_facts"][0] - 0.005, p["new_facts"][0] + 0.005])
    # lambda 1 learns 0.61 / 0.96 < 90% of SFT: excluded although it forgets least.
    assert [p["learns_enough"] for p in front["points"]] == [True, True, False]
    assert front["best_kl_weight"] == 0.5
    # SFT forgets 15.5 points, lambda 0.5 forgets 6.5: more than a third.
    assert front["best_forgets_at_most_a_third"] is False
    assert front["control"]["key"] == "known_only"
    text = format_frontier(front)
    assert "Lambda that forgets least among those learning >= 90% of SFT's new facts: 0.5" in text
    assert text.endswith("At most a third of SFT's forgetting: no.")


def test_frontier_verdicts():
    ok = frontier(_runs({"sft": (0.95, 0.85), "sdft_0.5": (0.90, 0.97)}), METHODS)
    assert ok["best_kl_weight"] == 0.5 and ok["best_forgets_at_most_a_third"] is True
    none = frontier(_runs({"sft": (0.95, 0.85), "sdft_1": (0.5, 0.99)}), METHODS)
    assert none["best_kl_weight"] is None and none["best_forgets_at_most_a_third"] is None
    assert "No lambda learns 90%" in format_frontier(none)
    assert frontier(_runs({"sdft_1": (0.5, 0.99)}), METHODS) is None
    assert frontier(_runs({"sft": (0.95, 0.85)}), METHODS) is None


def test_frontier_when_sft_forgets_nothing():
    # A short run can leave SFT's held-out accuracy at its peak: no ratio, but a verdict.
    front = frontier([run(0, "sft", 0.5, 1.0), run(0, "sdft_0.5", 0.5, 1.0)], METHODS)
    assert front["points"][0]["forgets_vs_sft"] is None
    text = format_frontier(front)
    assert "0.5 (forgets 0.0 points, against SFT's 0.0)" in text and "| 0.5 | 50.0 ± 0.0 | 0.0 ± 0.0 | 1.00x | - |" in text


def test_parameter_counts_in_thousands_or_millions():
    small = summarise([{**run(0, "sft", 1.0, 0.9), "trained_parameters": 131_072, "total_parameters": 549_000}], METHODS)
    large = summarise([{**run(0, "sft", 1.0, 0.9), "trained_parameters": 28_311_552,
                        "total_parameters": 134_515_008}], METHODS)
    assert "| 131k of 549k |" in format_table(small) and "| 28.3M of 134.5M |" in format_table(large)
