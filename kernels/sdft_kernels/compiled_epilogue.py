"""The CPU epilogue compiled by ``torch.compile``: ``impl="torch"`` on CPU, opt-in (``SDFT_COMPILE``).

The eager epilogue (:mod:`sdft_kernels.torch_epilogue`) makes about a dozen passes over each
``[chunk, V]`` buffer, one per torch operation. Written once as plain tensor math, the same
work compiles with inductor's C++ backend into one kernel of a few vectorised, OpenMP-parallel
loops over the vocabulary (the row maxima, the exponential sums, the divergence, then the logit
gradient), which writes the gradient straight into the loop's workspace. The logit GEMMs stay outside, in the BLAS.

When it runs (:func:`compile_mode`): only where asked, as on the 2-core CPU it was measured on
the compiled pass made no reliable difference to a whole step (the GEMMs dominate) and costs a
compilation and a temporary. ``SDFT_COMPILE=auto`` compiles chunks of
:data:`MIN_COMPILED_ELEMENTS` to :data:`MAX_COMPILED_ELEMENTS` logits on CPU tensors (128 to
256 rows at V = 32768), where the seconds of the first compilation can buy back their cost
within a few dozen steps and its temporaries come from the heap; ``always`` compiles every
chunk (how the tests reach it at small shapes); ``never`` (the default) none. Anywhere it cannot
run the eager epilogue does the work: a chunk on another device, a call inside an outer
``torch.compile`` (which traces the eager operations itself), more loss variants in one process
than dynamo keeps compiled code for, and a compilation that fails (no C++ compiler, an
unsupported platform): that failure is reported once as a warning and the process stays eager.

Shapes are compiled dynamic: chunks of any row count and any vocabulary reuse one compiled
kernel per loss variant (the settings below, and the dtype), so the last, shorter chunk and a
new batch length do not recompile. Inductor keeps compiled kernels on disk, so a second process
compiles in a few seconds instead of the first one's tens of seconds.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .chunk_loop import Workspace
from .options import LossOptions
from .reduction import accumulation_dtype
from .torch_epilogue import TorchEpilogue, _logits_into

# Chunks of at least this many logits (rows x V) are compiled under SDFT_COMPILE=auto: 16 MiB
# of float32, 128 rows at V = 32768. Below it the eager passes cost milliseconds a call and a
# compilation (5-20 s) would not pay for itself in a short run or a test.
MIN_COMPILED_ELEMENTS = 2**22
# ... and at most this many: inductor keeps each model's exponentials in a [chunk, V] temporary
# of its own, allocated per call. Up to 32 MiB the C allocator reuses its heap for them; beyond,
# each is mapped afresh and faulted in page by page, which costs more than the fused passes save
# (1.16x the eager epilogue's step time at N=1024, D=256, V=65536, against 0.93x at the
# 2048 x 512 x 32768 headline, 2-core CPU).
MAX_COMPILED_ELEMENTS = 2**23
# Dynamo keeps compiled code for this many variants of one function (its default recompile
# limit) and runs any further one uncompiled; beyond it the eager epilogue serves new variants.
MAX_VARIANTS = 8
COMPILE_MODES = ("auto", "always", "never")
_MODE_ALIASES = {"1": "always", "on": "always", "true": "always", "0": "never", "off": "never", "false": "never"}


def compile_mode() -> str:
    """``SDFT_COMPILE`` (``never`` if unset): ``auto``, ``always`` or ``never``."""
    raw = os.environ.get("SDFT_COMPILE", "never")
    mode = _MODE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if mode not in COMPILE_MODES:
        raise ValueError(f"SDFT_COMPILE must be one of {COMPILE_MODES} (or 1/0), got {raw!r}")
    return mode


class ChunkMath(NamedTuple):
    """The settings that shape the compiled code; one compiled variant per distinct value."""

    student_scale: float
    student_cap: Optional[float]
    teacher_scale: float
    teacher_cap: Optional[float]
    temperature: float
    divergence: Optional[str]  # None: no teacher
    jsd_beta: float
    jsd_log_weights: tuple[float, float]
    student_inf: bool  # the student's logits may hold -inf (a bias without a softcap)
    teacher_inf: bool  # likewise the teacher's
    metrics: bool
    want_grad: bool
    dft: bool
    dtype: torch.dtype

    @staticmethod
    def of(options: LossOptions, has_teacher: bool, student_bias: bool, teacher_bias: bool, metrics: bool,
           want_grad: bool, dtype: torch.dtype) -> "ChunkMath":
        return ChunkMath(
            options.student_logit_scale, options.student_cap, options.teacher_logit_scale, options.teacher_cap,
            options.temperature, options.effective_divergence if has_teacher else None, options.jsd_beta,
            options.jsd_log_weights, student_bias and options.student_cap is None,
            has_teacher and teacher_bias and options.teacher_cap is None, metrics, want_grad,
            options.loss_type == "dft", dtype,
        )


def _capped(z: Tensor, scale: float, cap: Optional[float]) -> tuple[Tensor, Optional[Tensor]]:
    """``(c tanh(scale z / c), tanh(scale z / c))``, or ``(scale z, None)`` without a cap."""
    if scale != 1.0:
        z = z * scale
    if cap is None:
        return z, None
    t = torch.tanh(z / cap)
    return t * cap, t


class _Softmax(NamedTuple):
    """One row-wise softmax ``[C, V]``."""

    p: Tensor  # [C, V] probabilities
    logp: Tensor  # [C, V] log-probabilities


def _softmax(shifted: Tensor, e: Tensor) -> _Softmax:
    """The softmax of logits whose row maximum was subtracted (``shifted`` ``[C, V]``, <= 0),
    given ``e = exp(shifted)``: one exponential per entry, where ``log_softmax(x).exp()`` takes
    two."""
    total = e.sum(-1, keepdim=True)
    return _Softmax(e / total, shifted - total.log())


def _tempered_exp(e: Tensor, shifted: Tensor, inv_tau: float) -> Tensor:
    """``exp(shifted / tau)``: from ``e = exp(shifted)`` by multiplication where ``1 / tau``
    is a small integer (tau 0.5 gives ``e * e``), else one exponential more."""
    k = round(inv_tau)
    if k == inv_tau and 1 <= k <= 4:
        out = e
        for _ in range(k - 1):
            out = out * e
        return out
    return torch.exp(shifted * inv_tau)


def _no_mass(log_ratio: Tensor, p: Tensor, guard: bool) -> Tensor:
    """``log_ratio`` with 0 where ``p`` is 0 (``0 log 0 = 0``; -inf logits), if ``guard``."""
    return torch.where(p == 0, 0.0, log_ratio) if guard else log_ratio


def _divergence(s: _Softmax, t: _Softmax, m: ChunkMath) -> tuple[Tensor, Optional[Tensor]]:
    """Row divergence ``[C]`` and ``dD/d(z_s / tau)`` ``[C, V]`` (None without gradients) of the
    student's and the teacher's tempered softmax."""
    guard = m.student_inf or m.teacher_inf
    if m.divergence == "forward_kl":
        div = (t.p * _no_mass(t.logp - s.logp, t.p, guard)).sum(-1)
        return div, (s.p - t.p) if m.want_grad else None
    if m.divergence == "reverse_kl":
        ratio = _no_mass(s.logp - t.logp, s.p, guard)
        div = (s.p * ratio).sum(-1)
        return div, (s.p * (ratio - div.unsqueeze(1))) if m.want_grad else None
    log_beta, log_1m_beta = m.jsd_log_weights
    log_m = torch.logaddexp(t.logp + log_beta, s.logp + log_1m_beta)
    kl_t = (t.p * _no_mass(t.logp - log_m, t.p, guard)).sum(-1)
    ratio_s = _no_mass(s.logp - log_m, s.p, guard)
    kl_s = (s.p * ratio_s).sum(-1)
    div = m.jsd_beta * kl_t + (1.0 - m.jsd_beta) * kl_s
    return div, ((1.0 - m.jsd_beta) * s.p * (ratio_s - kl_s.unsqueeze(1))) if m.want_grad else None


def chunk_math(m: ChunkMath, z: Tensor, zt: Optional[Tensor], y: Tensor, ce_scale: Optional[Tensor],
               kl_scale: Optional[Tensor], dz_out: Optional[Tensor]):
    """The epilogue of one chunk as plain tensor math, the function that is compiled.

    ``z`` ``[C, V]``: the student's GEMM output (bias added, no logit scale or cap yet); ``zt``
    the teacher's (or None); ``y`` ``[C]`` labels (any value on rows whose ``ce_scale`` is 0);
    ``ce_scale``, ``kl_scale`` ``[C]`` the rows' gradient factors
    (:func:`sdft_kernels.reduction.row_scales`: they hold the logit scale) and ``dz_out``
    ``[C, V]`` where the logit gradient is written, when ``m.want_grad``. Returns
    ``(ce [C], div [C] or None, entropy [C] or None, top1 [C] or None)``, unmasked, as the
    eager epilogue does.

    Each softmax is formed from its row maximum and one exponential per entry, and the
    student's tempered softmax reuses that exponential where ``1 / tau`` is a small integer:
    the exponentials are most of the arithmetic once the passes are fused.
    """
    z, cap = _capped(z, m.student_scale, m.student_cap)
    shifted = z - z.amax(-1, keepdim=True)
    e = shifted.exp()
    s1 = _softmax(shifted, e)
    safe_y = y.clamp(0, z.shape[1] - 1).unsqueeze(1)
    ce = -s1.logp.gather(1, safe_y).squeeze(1)
    entropy = top1 = None
    if m.metrics:
        terms = torch.special.xlogy(s1.p, s1.p) if m.student_inf else s1.p * s1.logp
        entropy, top1 = -terms.sum(-1), z.argmax(1) == y
    div = grad_kl = None
    if m.divergence is not None:
        inv_tau = 1.0 / m.temperature
        student = _softmax(shifted * inv_tau, _tempered_exp(e, shifted, inv_tau))
        zt, _ = _capped(zt, m.teacher_scale, m.teacher_cap)
        shifted_t = (zt - zt.amax(-1, keepdim=True)) * inv_tau
        div, grad_kl = _divergence(student, _softmax(shifted_t, shifted_t.exp()), m)
    if not m.want_grad:
        return ce, div, entropy, top1
    if m.dft:  # the row's cross-entropy weighted by its constant p(label)
        ce_scale = torch.where(ce_scale != 0, ce_scale * torch.exp(-ce), 0.0)
    columns = torch.arange(z.shape[1], device=z.device).unsqueeze(0)
    dz = (s1.p - (columns == safe_y).to(z.dtype)) * ce_scale.unsqueeze(1)
    if grad_kl is not None:
        dz = dz + grad_kl * (kl_scale * m.temperature).unsqueeze(1)
    if cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
        dz = dz * (1.0 - cap * cap)
    dz_out.copy_(dz)
    return ce, div, entropy, top1


class _Compiled:
    """The compiled :func:`chunk_math`, the variants it has compiled, and whether compiling
    failed in this process."""

    function = None
    variants: set = set()
    failed: Optional[str] = None

    @classmethod
    def usable(cls, m: ChunkMath) -> bool:
        return cls.failed is None and (m in cls.variants or len(cls.variants) < MAX_VARIANTS)

    @classmethod
    def call(cls, m: ChunkMath, *args):
        """The compiled result, or None (and a warning, once) if compiling failed."""
        if cls.function is None:
            cls.function = torch.compile(chunk_math, dynamic=True, fullgraph=True)
        try:
            out = cls.function(m, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager epilogue serves
            cls.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(
                f"sdft_kernels: torch.compile of the CPU epilogue failed ({cls.failed}); the eager epilogue "
                "runs instead (the same loss, slower). Set SDFT_COMPILE=never to skip the attempt.",
                RuntimeWarning, stacklevel=3,
            )
            return None
        cls.variants.add(m)
        return out


def compiled_variants() -> int:
    """How many loss variants this process has compiled (each compiles once)."""
    return len(_Compiled.variants)


def _wants_compiled(ws: Workspace, rows: int, device: torch.device) -> bool:
    """Whether a chunk of ``rows`` goes through the compiled epilogue. Decided on the
    workspace (the call's chunk size), so that the last, shorter chunk takes the same path."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if rows < 2 or ws.vocab < 2:  # dynamo specialises sizes 0 and 1: one compilation more for a rare chunk
        return False
    mode = compile_mode()
    return mode == "always" or (mode == "auto" and MIN_COMPILED_ELEMENTS <= ws.rows * ws.vocab <= MAX_COMPILED_ELEMENTS)


class CompiledTorchEpilogue(TorchEpilogue):
    """``impl="torch"`` on CPU: the compiled epilogue where ``SDFT_COMPILE`` asks, else the eager one.

    The compiled path fills three of the workspace's buffers (the student's logits, the
    teacher's, the logit gradient) and inductor keeps each model's exponentials in a
    ``[chunk, V]`` temporary of its own: one buffer more than the eager path at its peak, which
    the chunk size allows for where compiling is asked for (:meth:`row_bytes`).
    """

    @staticmethod
    def row_bytes(V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype], options: LossOptions) -> int:
        """The eager path's bytes per row, and where compiling is asked for one float32 (float64)
        row of the temporary more."""
        eager = TorchEpilogue.row_bytes(V, dtype, teacher_dtype, options)
        return eager if compile_mode() == "never" else eager + accumulation_dtype(dtype).itemsize * max(V, 1)

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics=False):
        """``(ce [C], div [C] or None, dz [C, V] or None, (entropy, top1) or None)``; unmasked,
        dz in the workspace's dtype."""
        eager = (h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics)
        if not _wants_compiled(ws, h.shape[0], h.device):  # the default: no per-chunk bookkeeping
            return TorchEpilogue.chunk(*eager)
        want_grad = ce_scale is not None
        m = ChunkMath.of(options, ht is not None, b is not None, bt is not None, metrics, want_grad, ws.dtype)
        if not _Compiled.usable(m):
            return TorchEpilogue.chunk(*eager)
        rows = h.shape[0]
        z = ws.get("z", rows)
        _logits_into(z, h, W, b, 1.0, None, options, ws)
        zt = None
        if ht is not None:
            zt = ws.get("logp_t", rows)
            _logits_into(zt, ht, Wt, bt, 1.0, None, options, ws)
        dz = ws.get("logp_1", rows) if want_grad else None
        # Handed over detached: a view of the workspace would have dynamo guard on its base's
        # size and recompile for the shorter last chunk.
        out = _Compiled.call(m, *(None if t is None else t.detach() for t in (z, zt)), y, ce_scale, kl_scale,
                             None if dz is None else dz.detach())
        if out is None:
            return TorchEpilogue.chunk(*eager)
        ce, div, entropy, top1 = out
        return ce, div, dz, (None if not metrics else (entropy, top1))
