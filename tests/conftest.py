"""Set-up shared by every test (pytest reads this file before it collects any test).

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before triton is first imported: hence this file sets the variable at import time.
"""

import os

import torch

# Subprocesses (torchrun, `sdft train`, the compile check) import this checkout's kernels, as
# pytest's own `pythonpath` setting does here, not an installed copy found first.
_KERNELS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
os.environ["PYTHONPATH"] = os.pathsep.join([_KERNELS, *filter(None, [os.environ.get("PYTHONPATH")])])

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU; none is present on this machine")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_cuda)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
