"""pytest-benchmark suite, CPU fp32: ``pytest bench/loss/test_cpu.py --benchmark-json=cpu.json``.

Quick grid by default; ``SDFT_BENCH_GRID=full`` runs the full CPU grid (see bench.loss.shapes).
"""

import pytest

from .pytest_support import cases, run_case


@pytest.mark.parametrize("shape,group,name", cases("cpu"))
def test_cpu(benchmark, shape, group, name):
    run_case(benchmark, "cpu", shape, group, name, rounds=3)
