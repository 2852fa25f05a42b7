"""pytest-benchmark suite, CUDA bf16: ``pytest bench/loss/test_gpu.py --benchmark-json=gpu.json``.

Quick grid by default; ``SDFT_BENCH_GRID=full`` runs the real LM heads (see bench.loss.shapes).
Skipped without a CUDA device.
"""

import pytest
import torch

from .pytest_support import cases, run_case

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("shape,group,name", cases("cuda"))
def test_gpu(benchmark, shape, group, name):
    run_case(benchmark, "cuda", shape, group, name, rounds=5)
