"""Ours and the peers behind one interface: ``build(inputs, group, device) -> step``.

A *step* is one call as a training loop makes it: the forward and, in the backward groups,
``loss.backward()`` into ``inputs.hidden.grad`` / ``inputs.weight.grad``. It returns the
detached loss (None for the floor). In the forward-only group the inputs do not require
grad and the step runs under ``torch.no_grad()``, as in evaluation.

Every contender is configured to the same objective (see :mod:`bench.loss.inputs`). Peers are
called through their public APIs only, and imported inside ``build`` so that a fresh
measuring process pays only for the package it measures.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .floor import floor_step
from .inputs import IGNORE_INDEX, LAMBDA, TAU, Inputs
from .shapes import CE_FWD_BWD, FWD, FWD_BWD

Step = Callable[[], Optional[Tensor]]


class Skip(Exception):
    """The contender cannot run this case; the message is the reason recorded."""


@dataclass(frozen=True)
class Contender:
    name: str
    title: str
    groups: tuple
    settings: str                                 # how it is configured, for the report
    build: Callable[[Inputs, str, str], Step]
    cpu_warmup: int = 0                           # calls before measuring (compiled code)
    cpu_runs: str = "all"                         # on CPU: "all" shapes, "headline" only, "never"
    cpu_reason: str = ""                          # why not everywhere on CPU
    cuda_reason: str = ""                         # why not on CUDA (empty: it runs there)
    impl: Optional[str] = None                    # ours' variants: the fused_linear_sdft_loss impl
    # On CPU, time the floor beside its own calls (bench.loss.measure_case): ours' CPU
    # variants, whose ratio to the floor the targets judge.
    paired_floor: bool = False


def auto_impl(device: str) -> str:
    """What ``fused_linear_sdft_loss(impl="auto")`` runs on ``device``. The bench uses it to
    skip the variant of ours that would re-measure what "ours" already runs, and to name what
    ours ran."""
    from sdft_kernels import default_impl

    return default_impl(device)


SAME_AS_OURS = "same implementation as ours (impl='auto')"


def same_as_ours(contender: "Contender", device: str) -> bool:
    """Whether ``contender`` is a variant of ours pinned to what "auto" runs on ``device``."""
    return contender.impl is not None and contender.impl == auto_impl(device)


def _as_step(loss_fn: Callable[[], Tensor], group: str) -> Step:
    if group == FWD:
        def step():
            with torch.no_grad():
                return loss_fn().detach()
    else:
        def step():
            loss = loss_fn()
            loss.backward()
            return loss.detach()
    return step


def _teacher(inputs: Inputs, group: str):
    return (None, None) if group == CE_FWD_BWD else (inputs.teacher_hidden, inputs.teacher_weight)


def _sdft(impl: str, compile_mode: Optional[str] = None):
    """Ours with ``impl``; ``compile_mode``: the ``SDFT_COMPILE`` setting during each call (None:
    the environment's)."""
    def build(inputs: Inputs, group: str, device: str) -> Step:
        from sdft_kernels import fused_linear_sdft_loss

        if compile_mode is not None and device != "cpu":
            raise Skip("the compiled epilogue is CPU-only: elsewhere impl='torch' always runs the eager one")
        ht, Wt = _teacher(inputs, group)

        def loss():
            before = os.environ.get("SDFT_COMPILE")
            if compile_mode is not None:
                os.environ["SDFT_COMPILE"] = compile_mode
            try:
                return fused_linear_sdft_loss(inputs.hidden, inputs.weight, inputs.labels, ht, Wt, kl_weight=LAMBDA,
                                              temperature=TAU, ignore_index=IGNORE_INDEX, impl=impl)
            finally:
                if before is None:
                    os.environ.pop("SDFT_COMPILE", None)
                else:
                    os.environ["SDFT_COMPILE"] = before
        return _as_step(loss, group)
    return build


def _floor(inputs: Inputs, group: str, device: str) -> Step:
    return floor_step(inputs, group)


def _liger_jsd(inputs: Inputs, group: str, device: str) -> Step:
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
    except ImportError as e:
        raise Skip(f"liger-kernel not importable: {e}") from e
    # beta=0 is KL(teacher || student); Liger divides both logits by the temperature, keeps CE
    # at temperature 1 and applies no tau^2, so the soft weight carries lambda * tau^2.
    loss = LigerFusedLinearJSDLoss(
        weight_hard_loss=1.0, weight_soft_loss=LAMBDA * TAU**2, beta=0.0, temperature=TAU,
        ignore_index=IGNORE_INDEX, compiled=(device == "cuda"),
    )
    return _as_step(lambda: loss(inputs.hidden, inputs.weight, inputs.teacher_hidden,
                                 inputs.teacher_weight, inputs.labels), group)


def _orda(inputs: Inputs, group: str, device: str) -> Step:
    try:
        import orda_kernel
    except ImportError as e:
        raise Skip(f"orda-kernel not importable: {e}") from e
    if device == "cuda" and not orda_kernel.is_available():
        raise Skip("orda-kernel reports its Triton kernels unavailable on this device")
    # A separate frozen teacher head; teacher CE off; "forward" is KL(q || p) with q the
    # teacher, and orda scales each KL row by T^2 itself.
    teacher = orda_kernel.SeparateTeacher(hidden=inputs.teacher_hidden, weight=inputs.teacher_weight)
    backend = "triton" if device == "cuda" else "torch"
    return _as_step(lambda: orda_kernel.distillation_loss(
        inputs.hidden, inputs.weight, inputs.labels, teacher,
        student_ce_weight=1.0, teacher_ce_weight=0.0, kl_weight=LAMBDA, kl_temperature=TAU,
        kl_divergence="forward", ignore_index=IGNORE_INDEX, backend=backend,
    ).loss, group)


def _cce(inputs: Inputs, group: str, device: str) -> Step:
    try:
        from cut_cross_entropy import linear_cross_entropy
    except ImportError as e:
        raise Skip(f"cut-cross-entropy not importable: {e}") from e
    # "cce" is its Triton kernel (CUDA only); "torch_compile" its CPU-capable path.
    impl = "cce" if device == "cuda" else "torch_compile"
    return _as_step(lambda: linear_cross_entropy(
        inputs.hidden, inputs.weight, inputs.labels, ignore_index=IGNORE_INDEX, impl=impl,
    ), group)


def _liger_flce(inputs: Inputs, group: str, device: str) -> Step:
    if device != "cuda":
        raise Skip("Liger's fused linear cross-entropy is Triton-only: its kernels need a GPU")
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError as e:
        raise Skip(f"liger-kernel not importable: {e}") from e
    loss = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX)
    return _as_step(lambda: loss(inputs.weight, inputs.hidden, inputs.labels), group)


_TEACHER_GROUPS = (FWD_BWD, FWD)
_ALL = (FWD_BWD, FWD, CE_FWD_BWD)

CONTENDERS = {
    c.name: c for c in (
        # The reference first: its loss and gradients are the oracle for the others.
        Contender("reference", "reference (materialised)", _ALL,
                  'fused_linear_sdft_loss(impl="reference"): full [N, V] logits, autograd',
                  _sdft("reference")),
        Contender("floor", "GEMM floor", _ALL,
                  "plain torch.matmul of the group's GEMMs into preallocated outputs",
                  _floor),
        # What a user gets: the library's default. The variants below pin one implementation
        # each; on CUDA the one that "auto" resolves to is skipped as a duplicate of ours.
        Contender("ours", 'ours (impl="auto")', _ALL,
                  'fused_linear_sdft_loss(impl="auto"), the library default: the implementation '
                  "sdft_kernels.default_impl(device) names (see the header for this run's); on CPU "
                  "its chunk epilogue compiles on the first call (SDFT_COMPILE=auto)",
                  _sdft("auto"), cpu_warmup=1, paired_floor=True),  # on CPU its first call compiles
        Contender("ours_triton", "ours, fused Triton", _ALL,
                  'fused_linear_sdft_loss(impl="triton"): fully fused Triton kernels (online '
                  "log-sum-exp forward, logit tiles recomputed in the backward), CUDA only",
                  _sdft("triton"), cpu_runs="never", impl="triton",
                  cpu_reason="impl='triton' is CUDA-only (on CPU only Triton's interpreter runs it, "
                             "far too slowly to time)"),
        Contender("ours_chunked", "ours, chunked cuBLAS + Triton epilogue", _ALL,
                  'fused_linear_sdft_loss(impl="triton_chunked"): logits in row chunks with '
                  "cuBLAS GEMMs, a fused Triton epilogue per chunk, CUDA only",
                  _sdft("triton_chunked"), cpu_runs="never", impl="triton_chunked",
                  cpu_reason="impl='triton_chunked' is CUDA-only (cuBLAS GEMMs and a Triton epilogue)"),
        Contender("ours_torch", "ours, chunked torch", _ALL,
                  'fused_linear_sdft_loss(impl="torch"): the chunked pure-torch path',
                  _sdft("torch"), cpu_runs="never", impl="torch", paired_floor=True,
                  cpu_reason="on CPU ours (impl='auto') already runs impl='torch'"),
        Contender("ours_eager", "ours, eager CPU epilogue", _ALL,
                  'fused_linear_sdft_loss(impl="torch") with SDFT_COMPILE=never: the chunk epilogue '
                  "as plain torch operations, uncompiled (what ours runs where compiling is not "
                  "possible), CPU only",
                  _sdft("torch", compile_mode="never"), paired_floor=True,
                  cuda_reason="the compiled epilogue is CPU-only: on CUDA there is nothing to compare"),
        Contender("liger_jsd", "Liger fused linear JSD", _TEACHER_GROUPS,
                  "LigerFusedLinearJSDLoss(weight_hard_loss=1, weight_soft_loss=lambda*tau^2, "
                  "beta=0, temperature=tau, compiled on CUDA only)",
                  _liger_jsd),
        Contender("orda", "orda-kernel", _TEACHER_GROUPS,
                  'distillation_loss(SeparateTeacher, student_ce_weight=1, teacher_ce_weight=0, '
                  'kl_weight=lambda, kl_temperature=tau, kl_divergence="forward"), '
                  'backend "triton" on CUDA, "torch" on CPU',
                  _orda,
                  cpu_runs="headline",
                  cpu_reason="on CPU orda-kernel has no fused path (its torch backend "
                                   "materialises full logits, like the reference, at higher cost); "
                                   "timed at the headline shape only to keep the CPU grid near 15 minutes"),
        Contender("cce", "cut-cross-entropy", (CE_FWD_BWD,),
                  'linear_cross_entropy(impl="cce") on CUDA, impl="torch_compile" on CPU; '
                  "default gradient filtering",
                  _cce, cpu_warmup=1),
        Contender("liger_flce", "Liger fused linear CE", (CE_FWD_BWD,),
                  "LigerFusedLinearCrossEntropyLoss() (Triton, CUDA only)",
                  _liger_flce, cpu_runs="never",
                  cpu_reason="Liger's fused linear cross-entropy is Triton-only: its kernels need a GPU"),
    )
}


def contenders_for(group: str) -> list:
    """Contenders of ``group`` in run order (the reference first)."""
    return [c for c in CONTENDERS.values() if group in c.groups]
