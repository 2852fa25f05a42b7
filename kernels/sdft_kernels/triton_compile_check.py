"""Compile every Triton kernel for sm_80 and sm_90 without a GPU; report registers and spills.

Run by hand (triton must not be in interpreter mode)::

    TRITON_INTERPRET=0 python -m sdft_kernels.triton_compile_check

Each kernel (the fused forward and backward kernels, and the chunked path's epilogue) is
compiled at its default config for float32 and bfloat16 inputs and the main flag combinations,
and for the specialisations real inputs add (:func:`all_variants`). ``triton.compile`` gives the PTX and the shared memory; registers and spill
stores come from running triton's own ``ptxas -v`` on that PTX. Prints one table row per
compilation and exits with status 1 if any compilation failed or spilled.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from .triton_backward import default_backward_configs, sdft_backward_hidden_kernel, sdft_backward_weight_kernel
from .triton_chunked import default_epilogue_config, sdft_chunk_epilogue_kernel
from .reduction import accumulation_dtype
from .triton_common import DIVERGENCE_CODES, INTERPRET, dot_precision, extra_transforms, teacher_dot_dtype, tile_dtype
from .triton_forward import default_forward_config, sdft_forward_kernel

# Each kernel (its jit function, under the flag heuristics) with the launcher's choice of
# default config for the widest tile dtype and the alignment.
KERNELS = {
    "forward": (sdft_forward_kernel.fn, default_forward_config),
    "backward_hidden": (sdft_backward_hidden_kernel.fn, lambda dtype, aligned: default_backward_configs(dtype, aligned)[0]),
    "backward_weight": (sdft_backward_weight_kernel.fn, lambda dtype, aligned: default_backward_configs(dtype, aligned)[1]),
    "chunk_epilogue": (sdft_chunk_epilogue_kernel.fn, lambda dtype, aligned: default_epilogue_config(dtype)),
}
FUSED = ("forward", "backward_hidden", "backward_weight")
# The main flag combinations: CE only; teacher with biases and softcap; JSD (two sweeps).
_FKL, _RKL, _JSD = (DIVERGENCE_CODES[d] for d in ("forward_kl", "reverse_kl", "jsd"))
_NO_SCALES = dict(HAS_LOGIT_SCALE=False, HAS_TEACHER_LOGIT_SCALE=False)
_NO_CAPS = dict(HAS_SOFTCAP=False, HAS_TEACHER_SOFTCAP=False, OWN_TEACHER_SOFTCAP=False, **_NO_SCALES)
FLAG_SETS = {
    "ce-only": dict(HAS_BIAS=True, HAS_TEACHER=False, HAS_TEACHER_BIAS=False, **_NO_CAPS, DIVERGENCE=_FKL),
    "fkl+softcap": dict(HAS_BIAS=True, HAS_TEACHER=True, HAS_TEACHER_BIAS=True, HAS_SOFTCAP=True,
                        HAS_TEACHER_SOFTCAP=True, OWN_TEACHER_SOFTCAP=False, **_NO_SCALES, DIVERGENCE=_FKL),
    "rkl": dict(HAS_BIAS=False, HAS_TEACHER=True, HAS_TEACHER_BIAS=False, **_NO_CAPS, DIVERGENCE=_RKL),
    "jsd": dict(HAS_BIAS=False, HAS_TEACHER=True, HAS_TEACHER_BIAS=False, **_NO_CAPS, DIVERGENCE=_JSD),
}
# Beyond the main grid, teachers of another family: a softcapped teacher of an uncapped
# student (JSD); each model its own softcap and logit scale (forward KL, biases).
EXTRA_FLAG_SETS = {
    "jsd+tsoftcap": dict(HAS_BIAS=False, HAS_TEACHER=True, HAS_TEACHER_BIAS=False, HAS_SOFTCAP=False,
                         HAS_TEACHER_SOFTCAP=True, OWN_TEACHER_SOFTCAP=True, **_NO_SCALES, DIVERGENCE=_JSD),
    # The chunked epilogue's dynamic fine-tuning weight (the fused kernels apply it on the host).
    "fkl+softcap+dft": dict(FLAG_SETS["fkl+softcap"], DFT=True),
    "fkl+own-caps+scales": dict(HAS_BIAS=True, HAS_TEACHER=True, HAS_TEACHER_BIAS=True, HAS_SOFTCAP=True,
                                HAS_TEACHER_SOFTCAP=True, OWN_TEACHER_SOFTCAP=True, HAS_LOGIT_SCALE=True,
                                HAS_TEACHER_LOGIT_SCALE=True, DIVERGENCE=_FKL),
    # The student's entropy and top-1, in the forward sweeps (the fused forward, the epilogue).
    "ce-only+metrics": dict(FLAG_SETS["ce-only"], METRICS=True),
    "fkl+softcap+metrics": dict(FLAG_SETS["fkl+softcap"], METRICS=True),
    "jsd+metrics": dict(FLAG_SETS["jsd"], METRICS=True),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp64": torch.float64}
ARCHS = (80, 90)


class Variant(NamedTuple):
    """One specialisation a launcher can produce."""

    kernel: str
    arch: int
    dtype: str  # the student's
    flags: str
    teacher_dtype: str = ""  # "" = the student's
    aligned: bool = True  # sizes and strides multiples of 16 (D = 4096, V = 128256), else not
    rounded_logits: bool = False  # LossOptions.logits_dtype="input"

    @property
    def label(self) -> str:
        extra = (f"+t{self.teacher_dtype}" if self.teacher_dtype else "") + ("" if self.aligned else "+odd")
        return self.flags + extra + ("+rnd" if self.rounded_logits else "")


def all_variants() -> list[Variant]:
    """Every kernel x arch x {fp32, bf16} x flag set, then the specialisations real inputs add:
    a float32 teacher for a bfloat16 student (FrozenCopy of another dtype, a float32 cache),
    sizes or strides that are not multiples of 16 (D = 2100, a vocabulary of 50257), float64,
    bfloat16 logits rounded as the model's head would (``logits_dtype="input"``), teachers of
    another family (their own softcaps and logit scales), dynamic fine-tuning, and the
    student's metrics."""
    main = [Variant(k, a, d, f) for k in KERNELS for a in ARCHS for d in ("fp32", "bf16") for f in FLAG_SETS]
    teacher = [Variant(k, a, "bf16", f, teacher_dtype="fp32") for k in FUSED for a in ARCHS
               for f in ("fkl+softcap", "rkl", "jsd")]
    odd = [Variant(k, a, d, f, aligned=False) for k in KERNELS for a in ARCHS for d in ("fp32", "bf16")
           for f in ("fkl+softcap", "jsd")]
    fp64 = [Variant(k, a, "fp64", f) for k in KERNELS for a in ARCHS for f in ("fkl+softcap", "jsd")]
    rounded = [Variant(k, a, "bf16", f, rounded_logits=True) for k in KERNELS for a in ARCHS
               for f in ("fkl+softcap", "jsd")]
    fp64_metrics = [Variant(k, a, "fp64", "fkl+softcap+metrics") for k in ("forward", "chunk_epilogue") for a in ARCHS]
    extra = [Variant(k, a, d, f, aligned=aligned) for k in KERNELS for a in ARCHS for d in ("fp32", "bf16")
             for f in EXTRA_FLAG_SETS for aligned in (True, False)
             if (aligned or f in ("fkl+own-caps+scales", "fkl+softcap+metrics"))
             and not set(EXTRA_FLAG_SETS[f]) & _ONLY_SOME - set(KERNELS[k][0].arg_names)]
    return main + teacher + odd + fp64 + rounded + extra + fp64_metrics


# Flags that only some kernels take (the others never see the feature).
_ONLY_SOME = {"DFT", "METRICS"}

# Pointer arguments by role: the teacher's inputs, the chunked path's logits (float32, or the
# inputs' dtypes when rounded as the head would), the float32 (float64) statistics, the rest
# in the student's dtype.
_OTHER_POINTERS = {"labels_ptr": "*i64", "kl_mask_ptr": "*u8", "top1_ptr": "*u8"}
_STUDENT_POINTERS = {"h_ptr", "w_ptr", "b_ptr", "dh_ptr", "dw_ptr", "db_ptr", "dz_ptr"}
_TEACHER_POINTERS = {"ht_ptr", "wt_ptr", "bt_ptr"}
_LOGIT_POINTERS = {"zs_ptr": "student", "zt_ptr": "teacher"}
_FLOAT64_SCALARS = {"inv_tau", "softcap", "teacher_softcap", "logit_scale", "teacher_logit_scale", "log_beta",
                    "log_1m_beta", "beta"}
# Optional inputs, by the flag that says they are given: the launchers pass None otherwise,
# which Triton specialises as a constexpr None.
_OPTIONAL_POINTERS = {"b_ptr": "HAS_BIAS", "ht_ptr": "HAS_TEACHER", "wt_ptr": "HAS_TEACHER", "zt_ptr": "HAS_TEACHER",
                      "bt_ptr": "HAS_TEACHER_BIAS", "dw_ptr": "COMPUTE_DW", "dw_acc_ptr": "COMPUTE_DW",
                      "db_ptr": "COMPUTE_DB", "ce_scale_ptr": "COMPUTE_GRAD", "kl_scale_ptr": "COMPUTE_GRAD",
                      "entropy_ptr": "METRICS", "top1_ptr": "METRICS"}
_TL = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32, torch.float64: tl.float64}


class CompileResult(NamedTuple):
    kernel: str
    arch: int
    dtype: str
    flags: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared_bytes: int
    error: str = ""


def variant_config(v: Variant):
    """The config the launcher picks for this variant (from the widest tile dtype; the chunked
    epilogue's from its logits' and gradient's dtypes)."""
    _, default_config = KERNELS[v.kernel]
    student = DTYPES[v.dtype]
    teacher = DTYPES[v.teacher_dtype or v.dtype]
    metrics = _flags(v).get("METRICS", False)
    if v.kernel == "chunk_epilogue":
        return default_epilogue_config(student if v.rounded_logits else accumulation_dtype(student), student, metrics)
    if v.kernel == "forward":
        return default_forward_config(tile_dtype(student, teacher), v.aligned, metrics)
    if v.kernel.startswith("backward"):
        configs = default_backward_configs(tile_dtype(student, teacher), v.aligned, extra_transforms(_flags(v)))
        return configs[v.kernel == "backward_weight"]
    return default_config(tile_dtype(student, teacher), v.aligned)


def _flags(v: Variant) -> dict:
    return {**FLAG_SETS, **EXTRA_FLAG_SETS}[v.flags]


def kernel_signature(kernel, v: Variant, config):
    """``(signature, constexprs, attrs)`` as the launcher would specialise them.

    Aligned variants have sizes and strides that are multiples of 16 and 16-byte aligned
    pointers, as for real LLM shapes (D = 4096, V = 128256), so loads vectorise; the others
    have pointers aligned (torch allocates them so) but no size or stride divisible by 16. The
    token count (``N``, ``C``) is never assumed divisible: batches have any number of tokens.
    """
    student, teacher = DTYPES[v.dtype], DTYPES[v.teacher_dtype or v.dtype]
    acc = "fp64" if student == torch.float64 else "fp32"
    flags = _flags(v)
    common = dict(
        DOT_DTYPE=_TL[student], TEACHER_DOT_DTYPE=teacher_dot_dtype(student, teacher, teacher),
        ACC=tl.float64 if acc == "fp64" else tl.float32, PRECISION=dot_precision(),
        BLOCK_N=config.block_n, BLOCK_V=config.block_v, BLOCK_D=getattr(config, "block_d", None),
        COMPUTE_DW=True, COMPUTE_DB=flags["HAS_BIAS"], COMPUTE_GRAD=True, ROUND_LOGITS=v.rounded_logits,
        DFT=flags.get("DFT", False), METRICS=flags.get("METRICS", False),
    )
    # Each kernel takes the shared constexprs it has a parameter for.
    constexprs = dict({k: v_ for k, v_ in flags.items() if k not in _ONLY_SOME},
                      **{k: v_ for k, v_ in common.items() if k in kernel.arg_names})
    constexprs.update({name: None for name, flag in _OPTIONAL_POINTERS.items()
                       if name in kernel.arg_names and flag in kernel.arg_names and not constexprs[flag]})
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in _FLOAT64_SCALARS:
            signature[name] = "fp64"
        elif name.endswith("_ptr"):
            if name in _LOGIT_POINTERS:
                model = student if _LOGIT_POINTERS[name] == "student" else teacher
                signature[name] = f"*{_short(model)}" if v.rounded_logits else f"*{acc}"
            elif name in _STUDENT_POINTERS:
                signature[name] = f"*{_short(student)}"
            elif name in _TEACHER_POINTERS:
                signature[name] = f"*{_short(teacher)}"
            else:
                signature[name] = _OTHER_POINTERS.get(name, f"*{acc}")
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            signature[name] = "i32"
            if name not in ("ignore_index", "N", "C") and v.aligned:
                attrs[(i,)] = [["tt.divisibility", 16]]
    missing = set(constexprs) - set(kernel.arg_names)
    assert not missing, f"{kernel.fn.__name__} has no parameters {missing}"
    return signature, constexprs, attrs


def _short(dtype: torch.dtype) -> str:
    return {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64"}[dtype]


def ptxas_usage(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v``."""
    gpu = "sm_90a" if arch == 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            # The flags triton's own make_cubin passes (triton 3.9), so that the counts are the
            # launched binary's.
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", path,
             "-o", os.path.join(tmp, "kernel.cubin")],
            capture_output=True, text=True,
        )
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log}")
    registers = re.search(r"Used (\d+) registers", log)
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    if registers is None or spills is None:
        raise RuntimeError(f"cannot parse ptxas output:\n{log}")
    return int(registers.group(1)), int(spills.group(1)), int(spills.group(2))


def compile_one(v: Variant) -> CompileResult:
    kernel, _ = KERNELS[v.kernel]
    config = variant_config(v)
    try:
        signature, constexprs, attrs = kernel_signature(kernel, v, config)
        compiled = triton.compile(
            ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs),
            target=GPUTarget("cuda", v.arch, 32),
            options=dict(num_warps=config.num_warps, num_stages=getattr(config, "num_stages", 1)),
        )
        registers, stores, loads = ptxas_usage(compiled.asm["ptx"], v.arch)
        return CompileResult(v.kernel, v.arch, v.dtype, v.label, registers, stores, loads, compiled.metadata.shared)
    except Exception as e:  # reported in the table, and the exit status
        return CompileResult(v.kernel, v.arch, v.dtype, v.label, -1, -1, -1, -1, f"{type(e).__name__}: {e}")


def format_table(results: list[CompileResult]) -> str:
    header = f"{'kernel':<16} {'arch':<6} {'dtype':<5} {'flags':<25} {'regs':>5} {'spill st':>9} {'spill ld':>9}"
    lines = [header + f" {'smem B':>8}"]
    for r in results:
        line = (f"{r.kernel:<16} sm_{r.arch:<3} {r.dtype:<5} {r.flags:<25} {r.registers:>5} "
                f"{r.spill_stores:>9} {r.spill_loads:>9} {r.shared_bytes:>8}")
        lines.append(line + (f"  ERROR {r.error.splitlines()[0][:200]}" if r.error else ""))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compilations")
    args = parser.parse_args(argv)
    if INTERPRET:
        print("TRITON_INTERPRET=1: kernels are interpreted and cannot be compiled; unset it", file=sys.stderr)
        return 2
    for name, (_, default_config) in KERNELS.items():
        for dtype, torch_dtype in DTYPES.items():
            print(f"{name} {dtype}: {default_config(torch_dtype, True)}")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        results = list(pool.map(compile_one, all_variants()))
    print(format_table(results))
    failed = [r for r in results if r.error or r.spill_stores != 0]
    print(f"{len(results)} compilations, {len(failed)} failed or spilled")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
