"""Every Triton kernel compiles for sm_80 and sm_90 at its default config without spilling.

No GPU is needed: ``triton.compile`` targets a named architecture and ptxas reports the
registers. The compilation runs in a fresh process (``sdft_kernels.triton_compile_check``)
because tests/conftest.py puts triton in interpreter mode, which triton reads when the kernels
are decorated. The first run compiles every variant of ``all_variants()`` (130: about two
minutes on two cores); triton's cache makes later runs fast. ``pytest -s`` shows the table.
"""

import os
import re
import shutil
import subprocess
import sys

import pytest

ROW = re.compile(
    r"^(?P<kernel>\w+)\s+sm_(?P<arch>\d+)\s+(?P<dtype>\w+)\s+(?P<flags>\S+)\s+(?P<regs>-?\d+)\s+"
    r"(?P<spill_stores>-?\d+)\s+(?P<spill_loads>-?\d+)\s+(?P<smem>-?\d+)"
)


def _ptxas_available() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return all(os.access(get_ptxas(arch).path, os.X_OK) for arch in (80, 90))
    except Exception:
        return shutil.which("ptxas") is not None


@pytest.mark.skipif(not _ptxas_available(), reason="triton's ptxas is not available")
def test_kernels_compile_without_spills():
    # tests/conftest.py puts the checkout's kernels first on PYTHONPATH: the subprocess compiles
    # the kernels this test imports, not an installed copy.
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    proc = subprocess.run(
        [sys.executable, "-m", "sdft_kernels.triton_compile_check"],
        env=env, capture_output=True, text=True, timeout=900,
    )
    print(proc.stdout)
    rows = [m.groupdict() for m in map(ROW.match, proc.stdout.splitlines()) if m]
    from sdft_kernels.triton_compile_check import all_variants

    expected = all_variants()
    assert len(rows) == len(expected), f"expected {len(expected)} rows, got {len(rows)}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    # Besides the main grid: a float32 teacher of a bfloat16 student, unaligned sizes, float64.
    assert {"fp64"} < {r["dtype"] for r in rows}
    assert any("+tfp32" in r["flags"] for r in rows) and any("+odd" in r["flags"] for r in rows)
    assert {r["kernel"] for r in rows} == {"forward", "backward_hidden", "backward_weight", "chunk_epilogue"}
    errors = [line for line in proc.stdout.splitlines() if "ERROR" in line]
    assert not errors, "compilation failed:\n" + "\n".join(errors)
    spilled = [r for r in rows if int(r["spill_stores"]) != 0 or int(r["spill_loads"]) != 0]
    assert not spilled, "register spills at the default config:\n" + "\n".join(map(str, spilled))
    assert {r["arch"] for r in rows} == {"80", "90"}
    assert all(0 < int(r["regs"]) <= 255 and int(r["smem"]) > 0 for r in rows)
    assert proc.returncode == 0, proc.stderr[-3000:]
