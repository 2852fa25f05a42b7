"""The checkout never answers to ``import kernels``, and ``sdft_kernels`` imports both from the
installed project and from a bare checkout.

transformers imports Hugging Face's ``kernels`` package whenever it is installed; a
``kernels/__init__.py`` here would shadow it for every command run from the repository root
(``python -m pytest``, ``python -m sdft``), which puts the current folder first on sys.path.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "kernels" / "sdft_kernels"


def run_python(code: str, cwd: Path, **env) -> list[str]:
    """The lines ``python -c code`` prints, run in ``cwd`` (so ``cwd`` is first on sys.path)."""
    environ = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | env
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=environ, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, f"python -c {code!r} in {cwd} failed:\n{done.stderr[-3000:]}"
    return done.stdout.split()


def test_kernels_folder_is_not_a_package():
    assert not (ROOT / "kernels" / "__init__.py").exists()
    assert (PACKAGE / "__init__.py").exists()


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None,
                    reason="Hugging Face's kernels package is not installed")
def test_from_the_repository_root_kernels_is_hugging_faces_and_transformers_imports():
    kernels_file, sdft_kernels_file = run_python(
        "import kernels, sdft_kernels; from transformers import Trainer; "
        "print(kernels.__file__); print(sdft_kernels.__file__)", cwd=ROOT)
    assert not Path(kernels_file).resolve().is_relative_to(ROOT / "kernels"), kernels_file
    assert Path(sdft_kernels_file).resolve().is_relative_to(ROOT) or "site-packages" in sdft_kernels_file


def test_installed_project_imports_from_anywhere(tmp_path):
    (where,) = run_python("import sdft_kernels, sdft; print(sdft_kernels.__file__)", cwd=tmp_path)
    assert Path(where).name == "__init__.py"


def test_a_checkout_imports_its_own_sdft_kernels(tmp_path):
    """``PYTHONPATH=kernels`` (what pytest's ``pythonpath`` setting does) takes the checkout's
    package before any installed one."""
    (where,) = run_python("import sdft_kernels; print(sdft_kernels.__file__)", cwd=tmp_path,
                          PYTHONPATH=str(ROOT / "kernels"))
    assert Path(where).resolve() == PACKAGE / "__init__.py"
    assert Path(importlib.import_module("sdft_kernels").__file__).resolve() == PACKAGE / "__init__.py"
