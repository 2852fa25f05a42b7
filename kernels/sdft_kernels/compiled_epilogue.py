"""The CPU epilogue compiled by ``torch.compile``: ``impl="torch"`` on CPU (``SDFT_COMPILE``).

The eager epilogue (:mod:`sdft_kernels.torch_epilogue`) makes about a dozen passes over each
``[chunk, V]`` buffer, one per torch operation, with six exponentials per entry. Written as
plain tensor math, the same work compiles with inductor's C++ backend into two vectorised,
OpenMP-parallel passes over the logits: :func:`chunk_stats` (row maxima, exponential sums and
the forward KL) and :func:`chunk_gradient` (the logit gradient, written over the logits it
reads), with four exponentials per entry for the forward KL at tau 0.5. The logit GEMMs stay
outside, in the BLAS.

The passes are split where they are so that inductor keeps nothing of its own: a value that
one loop produces and a later loop reads becomes a ``[C, V]`` temporary, allocated afresh on
every call and, beyond the C allocator's 32 MiB heap threshold, page-faulted in each time (one
compiled pass that kept the exponentials took 1.16x the eager step at N=1024, D=256,
V=65536 on a 2-core CPU). Values are recomputed instead: on that CPU an exponential
cost about as much as writing its result to the workspace and reading it back.

When it runs (:func:`compile_mode`): under ``SDFT_COMPILE=auto`` (the default), chunks of at
least :data:`MIN_COMPILED_ELEMENTS` logits on CPU tensors, where the seconds of a compilation
buy themselves back within a few dozen steps; ``always`` compiles every chunk (how the tests
reach it at small shapes); ``never`` keeps the eager operations. Anywhere it cannot run the eager
epilogue does the work: a chunk on another device, a call inside an outer ``torch.compile``
(which traces the eager operations itself), more loss variants in one process than dynamo
keeps compiled code for, and a compilation that fails (no C++ compiler, an unsupported
platform): that failure is reported once as a warning and the process stays eager.

Shapes are compiled dynamic: chunks of any row count and any vocabulary reuse one compiled
pass per loss variant (the settings below, and the dtype), so the last, shorter chunk and a
new batch length do not recompile. Inductor keeps compiled kernels on disk, so a second process
compiles in a few seconds instead of the first one's tens of seconds.
"""

from __future__ import annotations

import os
import warnings
from typing import NamedTuple, Optional

import torch
from torch import Tensor

from .workspace import Workspace
from .options import LossOptions
from .torch_epilogue import TorchEpilogue, _logits_into, dft_row_scale

# Chunks of at least this many logits (rows x V) are compiled under SDFT_COMPILE=auto: 16 MiB
# of float32, 128 rows at V = 32768. Below it the eager passes cost milliseconds a call and a
# compilation (5-20 s) would not pay for itself in a short run or a test.
MIN_COMPILED_ELEMENTS = 2**22
# Rows per chunk the compiled passes go up to (the eager path stops at 256). Each chunk streams
# the head through its GEMMs and reads and writes the [V, D] weight-gradient sums once, and the
# compiled passes hold fewer buffers than the eager ones, so fewer, larger chunks pay here.
# Measured on 2 cores, fp32, in one process with the floor interleaved: N=2048, D=512, V=32768
# in 384-row chunks 0.96x the floor, in the 256-row cap's 234-row chunks 1.06-1.09x (512 rows
# gained no more, for more memory); N=4096, D=256: 1.03x against 1.12x; N=1024, D=256: alike.
COMPILED_MAX_CHUNK_ROWS = 384
# Dynamo keeps compiled code for this many variants of one function (its default recompile
# limit) and runs any further one uncompiled; beyond it the eager epilogue serves new variants.
MAX_VARIANTS = 8
COMPILE_MODES = ("auto", "always", "never")
_MODE_ALIASES = {"1": "always", "on": "always", "true": "always", "0": "never", "off": "never", "false": "never"}


def compile_mode() -> str:
    """``SDFT_COMPILE`` (``auto`` if unset): ``auto``, ``always`` or ``never``."""
    raw = os.environ.get("SDFT_COMPILE", "auto")
    mode = _MODE_ALIASES.get(raw.strip().lower(), raw.strip().lower())
    if mode not in COMPILE_MODES:
        raise ValueError(f"SDFT_COMPILE must be one of {COMPILE_MODES} (or 1/0), got {raw!r}")
    return mode


class ChunkMath(NamedTuple):
    """The settings that shape the compiled code; one compiled variant per distinct value."""

    student_cap: Optional[float]  # the gradient's factor 1 - tanh^2 needs it
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
            options.student_cap,
            options.temperature, options.effective_divergence if has_teacher else None, options.jsd_beta,
            options.jsd_log_weights, student_bias and options.student_cap is None,
            has_teacher and teacher_bias and options.teacher_cap is None, metrics, want_grad,
            options.loss_type == "dft", dtype,
        )


class _Softmax(NamedTuple):
    """One row-wise softmax ``[C, V]``."""

    p: Tensor  # [C, V] probabilities
    logp: Tensor  # [C, V] log-probabilities


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


class RowStats(NamedTuple):
    """What the first pass learns of each row, ``[C, 1]`` each: enough for the later passes to
    form any probability with one exponential or none."""

    top: Tensor  # the student's row maximum
    total: Tensor  # sum of e = exp(z - top)
    tempered: Optional[Tensor]  # sum of exp((z - top) / tau); None without a teacher
    top_t: Optional[Tensor]  # the teacher's row maximum
    total_t: Optional[Tensor]  # sum of exp((zt - top_t) / tau)


def _student(m: ChunkMath, z: Tensor, r: RowStats) -> tuple[Tensor, Tensor, Optional[_Softmax]]:
    """``(shifted = z - top, p at temperature 1, the tempered softmax or None)``, ``[C, V]``."""
    shifted = z - r.top
    e = shifted.exp()
    tempered = None
    if m.divergence is not None:
        inv_tau = 1.0 / m.temperature
        tempered = _Softmax(_tempered_exp(e, shifted, inv_tau) / r.tempered, shifted * inv_tau - r.tempered.log())
    return shifted, e / r.total, tempered


def _teacher(m: ChunkMath, zt: Tensor, r: RowStats) -> _Softmax:
    logp = (zt - r.top_t) * (1.0 / m.temperature) - r.total_t.log()
    return _Softmax(logp.exp(), logp)


def _divergence_rows(s: _Softmax, t: _Softmax, m: ChunkMath) -> tuple[Tensor, Optional[Tensor]]:
    """``(divergence [C], centre [C] or None)``: the centre is the row sum that the gradient of
    the reverse KL (the divergence itself) and of the JSD (its student half) subtracts."""
    guard = m.student_inf or m.teacher_inf
    if m.divergence == "forward_kl":
        return (t.p * _no_mass(t.logp - s.logp, t.p, guard)).sum(-1), None
    if m.divergence == "reverse_kl":
        div = (s.p * _no_mass(s.logp - t.logp, s.p, guard)).sum(-1)
        return div, div
    log_m = _jsd_log_mixture(s, t, m)
    kl_t = (t.p * _no_mass(t.logp - log_m, t.p, guard)).sum(-1)
    kl_s = (s.p * _no_mass(s.logp - log_m, s.p, guard)).sum(-1)
    return m.jsd_beta * kl_t + (1.0 - m.jsd_beta) * kl_s, kl_s


def _jsd_log_mixture(s: _Softmax, t: _Softmax, m: ChunkMath) -> Tensor:
    log_beta, log_1m_beta = m.jsd_log_weights
    return torch.logaddexp(t.logp + log_beta, s.logp + log_1m_beta)


def _divergence_gradient(s: _Softmax, t: _Softmax, m: ChunkMath, centre: Optional[Tensor]) -> Tensor:
    """``dD/d(z_s / tau)`` ``[C, V]``, given the rows' centre of :func:`_divergence_rows`."""
    guard = m.student_inf or m.teacher_inf
    if m.divergence == "forward_kl":
        return s.p - t.p
    if m.divergence == "reverse_kl":
        return s.p * (_no_mass(s.logp - t.logp, s.p, guard) - centre.unsqueeze(1))
    ratio_s = _no_mass(s.logp - _jsd_log_mixture(s, t, m), s.p, guard)
    return (1.0 - m.jsd_beta) * s.p * (ratio_s - centre.unsqueeze(1))


def chunk_stats(m: ChunkMath, z: Tensor, zt: Optional[Tensor], y: Tensor):
    """The first compiled pass over a chunk: row reductions only.

    ``z`` ``[C, V]``: the student's logits (bias, logit scale and softcap applied); ``zt`` the
    teacher's at temperature 1 (or None); ``y`` ``[C]`` labels (any value on rows without a
    label). Returns the :class:`RowStats` fields, then ``[C]`` rows ``(ce, entropy or None,
    top1 or None, forward KL or None)``, unmasked as the eager epilogue's (the forward KL, the
    paper's divergence, is summed here; the others need a pass of their own).
    """
    top = z.amax(-1, keepdim=True)
    shifted = z - top
    e = shifted.exp()
    total = e.sum(-1, keepdim=True)
    log_total = total.log()
    ce = (log_total - shifted.gather(1, y.clamp(0, z.shape[1] - 1).unsqueeze(1))).squeeze(1)
    entropy = top1 = None
    if m.metrics:  # -sum p log p = log(sum e) - sum(e * shifted) / sum e; 0 * -inf is 0 here
        e_shifted = torch.where(e == 0, 0.0, e * shifted) if m.student_inf else e * shifted
        entropy, top1 = log_total.squeeze(1) - e_shifted.sum(-1) / total.squeeze(1), z.argmax(1) == y
    tempered = top_t = total_t = forward_kl = None
    if m.divergence is not None:
        inv_tau = 1.0 / m.temperature
        tempered = _tempered_exp(e, shifted, inv_tau).sum(-1, keepdim=True)
        top_t = zt.amax(-1, keepdim=True)
        w = ((zt - top_t) * inv_tau).exp()
        total_t = w.sum(-1, keepdim=True)
        if m.divergence == "forward_kl":
            # sum p_t (log p_t - log p_s), with p_t = w / total_t summing to 1, is
            # sum w (zt - z) / (tau total_t) - (top_t - top) / tau - log total_t + log tempered:
            # one more row sum here, so that the gradient pass holds no reduction and can
            # write the gradient over the logits it reads.
            gap = _no_mass(zt - z, w, m.student_inf or m.teacher_inf)
            forward_kl = ((w * gap).sum(-1) / total_t.squeeze(1) - (top_t - top).squeeze(1)) * inv_tau \
                - total_t.squeeze(1).log() + tempered.squeeze(1).log()
    return top, total, tempered, top_t, total_t, ce, entropy, top1, forward_kl


def chunk_divergence(m: ChunkMath, z: Tensor, zt: Tensor, *stats: Tensor) -> tuple[Tensor, Optional[Tensor]]:
    """The divergence pass: ``(divergence [C], centre [C] or None)`` (:func:`_divergence_rows`)
    from the logits and :func:`chunk_stats`' row statistics."""
    r = RowStats(*stats)
    _, _, student = _student(m, z, r)
    return _divergence_rows(student, _teacher(m, zt, r), m)


def chunk_gradient(m: ChunkMath, z: Tensor, zt: Optional[Tensor], y: Tensor, centre: Optional[Tensor],
                   ce_scale: Tensor, kl_scale: Optional[Tensor], *stats: Tensor) -> None:
    """The gradient pass: the logit gradient (with its scales), element-wise from the logits and
    the row statistics, written over the teacher's logits ``zt`` (without a teacher, over the
    student's ``z``): each entry is read, then replaced, so a chunk holds one ``[C, V]`` buffer
    less, and the store goes to memory the pass has just read."""
    r = RowStats(*stats)
    _, p, student = _student(m, z, r)
    column = torch.arange(z.shape[1], device=z.device).unsqueeze(0)
    dz = (p - (column == y.clamp(0, z.shape[1] - 1).unsqueeze(1)).to(z.dtype)) * ce_scale.unsqueeze(1)
    if m.divergence is not None:
        teacher = _teacher(m, zt, r)
        dz = dz + _divergence_gradient(student, teacher, m, centre) * (kl_scale * m.temperature).unsqueeze(1)
    if m.student_cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2, and z = c tanh(x / c)
        tanh = z / m.student_cap
        dz = dz * (1.0 - tanh * tanh)
    (z if zt is None else zt).copy_(dz)


class _Compiled:
    """The compiled passes, the loss variants compiled so far, and whether compiling failed in
    this process."""

    functions: dict = {}
    variants: set = set()
    failed: Optional[str] = None

    @classmethod
    def usable(cls, m: ChunkMath) -> bool:
        return cls.failed is None and (m in cls.variants or len(cls.variants) < MAX_VARIANTS)

    @classmethod
    def call(cls, m: ChunkMath, function, *args):
        """``function(m, *args)`` compiled, or :data:`FAILED` (and a warning, once) if compiling
        failed."""
        if function not in cls.functions:
            cls.functions[function] = torch.compile(function, dynamic=True, fullgraph=True)
        try:
            out = cls.functions[function](m, *args)
        except Exception as e:  # noqa: BLE001 - any compiler failure: the eager epilogue serves
            cls.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
            warnings.warn(
                f"sdft_kernels: torch.compile of the CPU epilogue failed ({cls.failed}); the eager epilogue "
                "runs instead (the same loss, slower). Set SDFT_COMPILE=never to skip the attempt.",
                RuntimeWarning, stacklevel=3,
            )
            return FAILED
        cls.variants.add(m)
        return out


FAILED = object()  # what _Compiled.call returns when compiling failed


def compiled_variants() -> int:
    """How many loss variants this process has compiled (each compiles once)."""
    return len(_Compiled.variants)


def _may_compile() -> bool:
    """Whether a CPU chunk of this call can go through the compiled passes at all: compiling
    is not switched off, has not failed in this process, is not inside an outer compile, and
    has room for another loss variant."""
    return (compile_mode() != "never" and _Compiled.failed is None and not torch.compiler.is_compiling()
            and len(_Compiled.variants) < MAX_VARIANTS)


def _wants_compiled(ws: Workspace, rows: int, device: torch.device) -> bool:
    """Whether a chunk of ``rows`` goes through the compiled epilogue. Decided on the
    workspace (the call's chunk size), so that the last, shorter chunk takes the same path."""
    if device.type != "cpu" or torch.compiler.is_compiling():
        return False
    if rows < 2 or ws.vocab < 2:  # dynamo specialises sizes 0 and 1: one compilation more for a rare chunk
        return False
    mode = compile_mode()
    return mode == "always" or (mode == "auto" and ws.rows * ws.vocab >= MIN_COMPILED_ELEMENTS)


class CompiledTorchEpilogue(TorchEpilogue):
    """``impl="torch"`` on CPU: the compiled epilogue where ``SDFT_COMPILE`` asks, else the eager one.

    The logit GEMMs (with scales and softcaps, in place) fill the workspace's logit buffers,
    then two compiled passes read them: :func:`chunk_stats` (row reductions, the forward KL
    among them) and :func:`chunk_gradient` (the logit gradient, written over the teacher's
    logits), with :func:`chunk_divergence` between them for the reverse KL and the JSD, whose
    gradient needs the row's divergence first (a reduction and the element-wise gradient that
    follows it in one pass would make inductor keep ``[C, V]`` temporaries). Two buffers where
    the eager path holds four, and no ``[C, V]`` memory of inductor's own.
    """

    @staticmethod
    def chunk_buffers(options: LossOptions, has_teacher: bool, half_inputs: bool) -> float:
        """``[chunk, V]`` buffers a chunk holds at its peak. Where the compiled passes can run,
        the student's logits and the teacher's, which the gradient replaces: two with a teacher,
        one without, whatever the divergence or softcap (the eager path holds four to eight), so
        a chunk takes more rows in the same budget and its GEMMs run larger. Elsewhere the eager
        count. (Where the budget decides the chunk, the chunk is far above ``auto``'s minimum;
        should the first compilation fail, that one call runs eager on the larger chunk, and
        the warning says so.)"""
        if not _may_compile():
            return TorchEpilogue.chunk_buffers(options, has_teacher, half_inputs)
        return 1 + has_teacher + 1.0 * half_inputs

    @staticmethod
    def max_rows() -> int:
        """:data:`COMPILED_MAX_CHUNK_ROWS` where the compiled passes can run, else the eager cap."""
        return COMPILED_MAX_CHUNK_ROWS if _may_compile() else TorchEpilogue.max_rows()

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics=False):
        """``(ce [C], div [C] or None, dz [C, V] or None, (entropy, top1) or None)``; unmasked,
        dz in the workspace's dtype."""
        eager = (h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics)
        if not _wants_compiled(ws, h.shape[0], h.device):  # small chunks: no per-chunk bookkeeping
            return TorchEpilogue.chunk(*eager)
        want_grad = ce_scale is not None
        m = ChunkMath.of(options, ht is not None, b is not None, bt is not None, metrics, want_grad, ws.dtype)
        if not _Compiled.usable(m):
            return TorchEpilogue.chunk(*eager)
        rows = h.shape[0]
        # Scales and softcaps are applied in place here: inside a compiled pass, inductor would
        # keep the capped logits in a [C, V] temporary of its own. The buffers are handed over
        # detached: a view of the workspace would have dynamo guard on its base's size and
        # recompile for the shorter last chunk.
        z = _logits_into(ws.get("z", rows), h, W, b, options.student_logit_scale, options.student_cap, options,
                         ws).detach()
        zt = None
        if ht is not None:
            zt = _logits_into(ws.get("logp_t", rows), ht, Wt, bt, options.teacher_logit_scale, options.teacher_cap,
                              options, ws).detach()
        stats = _Compiled.call(m, chunk_stats, z, zt, y)
        if stats is FAILED:
            return TorchEpilogue.chunk(*eager)
        row_stats, (ce, entropy, top1, div) = stats[:5], stats[5:]
        centre = dz = None
        if m.divergence in ("reverse_kl", "jsd"):  # the forward KL came with the statistics
            divergence = _Compiled.call(m, chunk_divergence, z, zt, *row_stats)
            if divergence is FAILED:
                return TorchEpilogue.chunk(*eager)
            div, centre = divergence
        if want_grad:
            if m.dft:
                ce_scale = dft_row_scale(ce_scale, ce)
            if _Compiled.call(m, chunk_gradient, z, zt, y, centre, ce_scale, kl_scale, *row_stats) is FAILED:
                return TorchEpilogue.chunk(*eager)
            dz = z if zt is None else zt
        return ce, div, dz, (None if not metrics else (entropy, top1))
