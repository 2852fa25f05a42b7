"""The GPU check's first part: the machine, the carried wheels, and what imports.

Three steps, all written to the setup log:

1. ``nvidia-smi``'s view of the GPUs (where the command exists);
2. the wheels carried in ``.whl/`` (``make gpu-wheels``): each one whose distribution this
   Python does not already have is installed, without network or dependencies, into a
   folder of its own that goes first on the ``PYTHONPATH`` of every later part (a
   distribution the machine has is used as it is, so that no plugin is present twice);
3. :func:`probe`, run in a fresh process with that path (``python -m bench.gpu_check.environment``):
   versions, which modules are importable (found, not imported: ``datasets`` and ``trl`` are
   never imported), the CUDA device, and whether importing what the check runs pulled in
   ``datasets`` or ``trl``.
"""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys
import traceback
import zipfile
from importlib import metadata, util
from pathlib import Path

PROBE_MARKER = "GPU_CHECK_PROBE "
# Distributions whose versions are recorded (absent ones as None).
DISTS = ("torch", "triton", "transformers", "numpy", "accelerate", "peft", "datasets", "trl",
         "pytest", "pytest-xdist", "pytest-timeout", "liger-kernel", "cut-cross-entropy",
         "orda-kernel", "matplotlib", "sdft-kernels")
# Modules whose presence decides what the check runs or how (found, never imported).
MODULES = ("torch", "triton", "transformers", "numpy", "pytest", "xdist", "pytest_timeout",
           "liger_kernel", "cut_cross_entropy", "orda_kernel", "peft", "accelerate", "datasets",
           "trl", "matplotlib")
# What the check's parts import; none of it may import these at module import time.
CHECK_IMPORTS = ("sdft_kernels", "sdft", "sdft.teacher", "transformers",
                 "transformers.models.llama.modeling_llama", "bench.loss.measure_case",
                 "bench.loss.contenders", "bench.train_step.cli", "bench.train_step.measure",
                 "bench.memory.fsdp_step")
MUST_NOT_IMPORT = ("datasets", "trl")


def _version(dist: str):
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _error(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"


def probe() -> dict:
    """What this Python has: versions, importable modules, the CUDA device, and the imports
    of the check's own modules. Every step is guarded: a failure is recorded, not raised."""
    out = {"python": sys.version.split()[0], "executable": sys.executable,
           "platform": platform.platform(),
           "versions": {d: _version(d) for d in DISTS},
           "importable": {m: util.find_spec(m) is not None for m in MODULES}}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_cuda"] = torch.version.cuda
        out["cuda_available"] = torch.cuda.is_available()
        if out["cuda_available"]:
            props = torch.cuda.get_device_properties(0)
            out["device"] = {"name": props.name, "capability": f"{props.major}.{props.minor}",
                             "memory_bytes": props.total_memory,
                             "count": torch.cuda.device_count(),
                             "bf16": torch.cuda.is_bf16_supported()}
    except Exception as e:  # noqa: BLE001 - recorded
        out["cuda_available"] = False
        out["torch_error"] = _error(e)
    imported, failed = [], {}
    for name in CHECK_IMPORTS:
        try:
            __import__(name)
            imported.append(name)
        except Exception as e:  # noqa: BLE001 - recorded
            failed[name] = _error(e)
    out["check_imports"] = {"imported": imported, "failed": failed,
                            "pulled_in": [m for m in MUST_NOT_IMPORT if m in sys.modules]}
    try:
        from sdft_kernels import default_impl

        out["sdft_kernels_file"] = sys.modules["sdft_kernels"].__file__
        out["cuda_default_impl"] = default_impl("cuda")
    except Exception as e:  # noqa: BLE001 - recorded
        out["sdft_kernels_error"] = _error(e)
    return out


# ---------------------------------------------------------------- carried wheels

def wheel_dist(path: Path) -> str:
    """The distribution a wheel file installs (its name's first field, normalised)."""
    return path.name.split("-")[0].replace("_", "-").lower()


def install_wheels(wheel_dir: Path, site: Path, log, timeout_s: float = 120.0) -> dict:
    """Install the wheels of ``wheel_dir`` whose distribution is missing here into ``site``
    (emptied first), offline and without dependencies: pip (given ``timeout_s``) where it
    runs, else by unpacking (wheels of pure-Python packages, which these are). ``log(line)``
    gets what happened."""
    wheels = sorted(Path(wheel_dir).glob("*.whl"))
    out = {"wheel_dir": str(wheel_dir), "site": str(site), "installed": [], "present": {},
           "failed": None}
    if not wheels:
        log(f"no wheels in {wheel_dir}: peers this Python lacks will be recorded as skipped "
            "(make gpu-wheels where there is network, and copy .whl/ with the project)")
        return out
    missing = []
    for w in wheels:
        have = _version(wheel_dist(w))
        if have is None:
            missing.append(w)
        else:
            out["present"][wheel_dist(w)] = have
            log(f"{w.name}: not installed, this Python has {wheel_dist(w)} {have}")
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    if not missing:
        return out
    try:
        proc = subprocess.run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps",
                               "--no-compile", "--no-cache-dir", "--disable-pip-version-check",
                               "--quiet", "--target", str(site), *map(str, missing)],
                              capture_output=True, text=True, timeout=timeout_s)
        pip = f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-600:]}"
        if proc.returncode == 0:
            out["installed"] = [w.name for w in missing]
            log(f"installed into {site} with pip: " + ", ".join(out["installed"]))
            return out
    except subprocess.TimeoutExpired:
        pip = f"no answer in {timeout_s:.0f} s"
    log(f"pip install failed ({pip})")
    shutil.rmtree(site, ignore_errors=True)
    site.mkdir(parents=True)
    try:  # a wheel is a zip of its files and its .dist-info: what pip --target lays out
        for w in missing:
            with zipfile.ZipFile(w) as z:
                z.extractall(site)
            out["installed"].append(w.name)
        log(f"unpacked into {site} instead: " + ", ".join(out["installed"]))
    except (OSError, zipfile.BadZipFile) as e:
        out["failed"] = f"pip: {pip}; unpacking: {_error(e)}"
        log(f"unpacking failed too: {_error(e)}")
    return out


def nvidia_smi() -> str:
    """``nvidia-smi``'s name, memory, driver and utilisation of each GPU, or why not."""
    if shutil.which("nvidia-smi") is None:
        return "nvidia-smi: not found"
    try:
        proc = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,memory.used,"
                               "driver_version,utilization.gpu", "--format=csv"],
                              capture_output=True, text=True, timeout=20)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi: {_error(e)}"


def probe_lines(p: dict) -> list:
    """The probe as the setup log shows it."""
    v = p.get("versions", {})
    lines = [f"python {p.get('python')} ({p.get('executable')}), {p.get('platform')}",
             "versions: " + ", ".join(f"{d} {v[d] or '-'}" for d in DISTS if d in v),
             "importable: " + ", ".join(f"{m} {'yes' if ok else 'no'}"
                                        for m, ok in p.get("importable", {}).items())]
    if p.get("torch_error"):
        lines.append(f"torch failed to import: {p['torch_error']}")
    lines.append(f"CUDA available: {p.get('cuda_available')} (torch built for CUDA "
                 f"{p.get('torch_cuda')}); device: {p.get('device')}")
    ci = p.get("check_imports", {})
    lines.append(f"the check's modules import: {len(ci.get('imported', []))} of "
                 f"{len(CHECK_IMPORTS)}; failed: {ci.get('failed') or 'none'}; "
                 f"pulled in {', '.join(MUST_NOT_IMPORT)}: {ci.get('pulled_in') or 'no'}")
    if p.get("cuda_default_impl"):
        lines.append(f"sdft_kernels from {p.get('sdft_kernels_file')}; impl='auto' on CUDA runs "
                     f"{p['cuda_default_impl']!r}")
    return lines


def main(argv=None) -> int:
    try:
        result = probe()
    except Exception:  # noqa: BLE001 - the probe itself must answer
        result = {"probe_error": traceback.format_exc(limit=5)}
    print(PROBE_MARKER + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
