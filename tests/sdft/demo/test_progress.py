"""Tests of sdft.demo.progress: the one progress line and its time estimate."""

from __future__ import annotations

import io

import pytest

from sdft.demo.progress import Progress


def test_remaining_time_from_the_work_done_and_the_workers():
    out = io.StringIO()
    progress = Progress(4, workers=2, stream=out, start=0.0)
    progress.set_costs([1.0, 1.0, 2.0, 2.0])
    assert progress.remaining() is None                  # nothing measured yet
    progress.run_finished("seed 0 sft", seconds=30.0, cost=2.0)
    # 15 s per unit of cost; 4 units left shared by 2 workers.
    assert progress.remaining() == pytest.approx(30.0)
    progress.run_finished("seed 0 sdft_1", seconds=30.0, cost=2.0)
    progress.run_finished("seed 1 sft", seconds=15.0, cost=1.0)
    progress.run_finished("seed 1 sdft_1", seconds=15.0, cost=1.0)
    assert progress.remaining() is None                   # all done
    lines = out.getvalue().splitlines()
    assert len(lines) == 4 and all(line.startswith("[sdft demo] fine-tuning | runs ") for line in lines)
    assert "runs 1/4" in lines[0] and "remaining ~30s" in lines[0] and "last: seed 0 sft (30 s)" in lines[0]
    assert "runs 4/4" in lines[-1] and "remaining" not in lines[-1]


def test_a_log_gets_a_line_per_phase_not_per_redraw():
    out = io.StringIO()
    progress = Progress(2, stream=out, start=0.0)
    progress.status("pretraining")
    progress.show()
    progress.show()
    progress.status("classifying")
    assert [line.split(" | ")[0] for line in out.getvalue().splitlines()] == \
        ["[sdft demo] pretraining", "[sdft demo] classifying"]
    silent = io.StringIO()
    Progress(2, stream=silent, enabled=False).status("pretraining")
    assert silent.getvalue() == ""


def test_the_line_names_its_command_and_the_phase_of_its_runs():
    out = io.StringIO()
    progress = Progress(3, stream=out, start=0.0, name="sdft demo real", run_phase="classifying")
    progress.run_finished("classified capital", seconds=10.0)
    assert out.getvalue().startswith("[sdft demo real] classifying | runs 1/3 |")
