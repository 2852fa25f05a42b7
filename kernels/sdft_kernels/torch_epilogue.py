"""The plain-torch epilogue of the chunk loop: what CPU users train with (``impl="torch"``).

Per chunk of rows, element-wise torch operations on float32 (float64) ``[chunk, V]`` buffers
give the loss rows and, when asked, the logit gradient. The buffers come from the loop's
workspace and are reused by every chunk.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .workspace import Workspace
from .logits_gemm import logits_into, rounded_logits_into
from .options import LossOptions
from .reduction import accumulation_dtype

# Transient bytes the torch epilogue may use by default: with the buffer counts of
# live_buffers, 110-token chunks at Qwen2.5's V = 151936 for the paper's forward KL. Each chunk
# streams the head through three GEMMs and reads and writes its float32 gradient once, so on a
# CPU fewer, larger chunks are faster, up to about 256 rows (beyond, the GEMMs gain nothing
# and the buffers only cost memory: 256 rows is 128 MiB at V = 32768).
DEFAULT_CHUNK_BUDGET_BYTES = 256 * 2**20
MAX_CHUNK_ROWS = 256


def live_buffers(options: LossOptions, has_teacher: bool, half_inputs: bool) -> float:
    """How many float32 (float64) ``[chunk, V]`` buffers a chunk holds at its peak.

    The student's logits and log-probabilities at temperature 1; with a teacher, both models'
    log-probabilities at tau; the tanh of a softcap, kept for the gradient; for the JSD the
    mixture's temporaries. Half-precision inputs add, with ``logits_dtype="input"``, their
    rounded GEMM output before it is copied up and, on a GPU, the gradient rounded for its
    GEMMs (half a buffer each; counted in either mode). On CPU their head is also upcast to
    float32 once per call (not per row: outside this count).
    """
    count = 4 if has_teacher else 2
    if has_teacher and options.effective_divergence == "jsd":
        count = 7
    return count + (options.student_cap is not None) + 1.0 * half_inputs


def _rowdot_into(a: Tensor, b: Tensor) -> Tensor:
    """``(a * b).sum(-1)`` for ``[C, V]`` inputs, overwriting ``a`` (cheaper on CPU than a
    batched matrix product, and no ``[C, V]`` temporary)."""
    return a.mul_(b).sum(-1)


def _logits_into(out: Tensor, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], scale: float, softcap,
                 options: LossOptions, ws: Workspace) -> Tensor:
    """``out = softcap(scale * (hidden @ weight.T + bias))`` in ``out``'s dtype, the GEMM's
    output rounded as ``options.logits_dtype`` says (:mod:`sdft_kernels.logits_gemm`); returns
    ``out``."""
    if options.logits_dtype == "input":
        rounded_logits_into(out, hidden, weight, bias)
    else:
        logits_into(out, hidden, weight, bias, lambda w: ws.upcast(w, out.dtype))
    if scale != 1.0:
        out.mul_(scale)
    if softcap is not None:
        out.div_(softcap).tanh_().mul_(softcap)
    return out


def _log_softmax_into(out: Tensor, x: Tensor) -> Tensor:
    """``out = log_softmax(x, -1)`` with no temporary (``out`` may be ``x``)."""
    try:
        return torch._log_softmax(x, -1, False, out=out)
    except (AttributeError, RuntimeError):  # pragma: no cover - a torch without the out= overload
        return torch.sub(x, torch.logsumexp(x, -1, keepdim=True), out=out)


def _zero_where_no_mass(log_ratio: Tensor, p: Tensor, guard: bool) -> Tensor:
    """``log_ratio`` with 0 where ``p`` is 0 (``0 log 0 = 0``), in place, if ``guard``.

    Only a logit of -inf (a masked vocabulary entry, through a bias) gives ``-inf - (-inf)``
    = NaN at ``p = 0``; finite logits never do, so the pass is skipped without a bias.
    """
    return log_ratio.masked_fill_(p == 0, 0.0) if guard else log_ratio


def _divergence(logp_s: Tensor, logp_t: Tensor, scratch: Tensor, options: LossOptions, want_grad: bool,
                guard_inf: bool):
    """Row divergence ``[C]`` and ``G = dD/d(z_s / tau)`` ``[C, V]`` (or None).

    Overwrites its three buffers; ``G`` is returned in one of them. ``guard_inf``: logits may
    hold -inf (see :func:`_zero_where_no_mass`).
    """
    divergence = options.effective_divergence
    if divergence == "forward_kl":
        p_t = torch.exp(logp_t, out=scratch)
        div = _rowdot_into(_zero_where_no_mass(logp_t.sub_(logp_s), p_t, guard_inf), p_t)
        return div, (logp_s.exp_().sub_(p_t) if want_grad else None)
    if divergence == "reverse_kl":
        p_s = torch.exp(logp_s, out=scratch)
        ratio = _zero_where_no_mass(logp_t.neg_().add_(logp_s), p_s, guard_inf)  # log p_s - log p_t
        if not want_grad:
            return _rowdot_into(ratio, p_s), None
        div = torch.mul(ratio, p_s, out=logp_s).sum(-1)  # logp_s is free: p_s is in scratch
        return div, ratio.sub_(div.unsqueeze(1)).mul_(p_s)
    beta = options.jsd_beta
    log_beta, log_1m_beta = options.jsd_log_weights
    log_m = torch.logaddexp(logp_t + log_beta, logp_s + log_1m_beta, out=scratch)
    p_t = logp_t.exp()
    kl_t = _rowdot_into(_zero_where_no_mass(logp_t.sub_(log_m), p_t, guard_inf), p_t)
    p_s = torch.exp(logp_s, out=logp_t)  # logp_t is free now
    ratio_s = _zero_where_no_mass(logp_s.sub_(log_m), p_s, guard_inf)  # log p_s - log m
    kl_s = torch.mul(ratio_s, p_s, out=p_t).sum(-1)  # p_t's buffer is free now
    div = beta * kl_t + (1.0 - beta) * kl_s
    if not want_grad:
        return div, None
    return div, ratio_s.sub_(kl_s.unsqueeze(1)).mul_(p_s).mul_(1.0 - beta)


def dft_row_scale(ce_scale: Tensor, ce: Tensor) -> Tensor:
    """``loss_type="dft"``: each row's cross-entropy factor ``[C]`` weighted by its
    probability of the label, ``exp(-ce)``, held constant (rows of factor 0 stay 0)."""
    return torch.where(ce_scale != 0, ce_scale * torch.exp(-ce), 0.0)


def _torch_chunk(h, W, b, ht, Wt, bt, y, options: LossOptions, ce_scale, kl_scale, ws: Workspace, metrics: bool):
    """Loss rows of one chunk and, if scales are given, its logit gradient ``[C, V]``.

    Returns ``(ce [C], div [C] or None, dz or None, (entropy [C], top1 [C]) or None)``;
    ``ce``, ``div`` and the metrics are unmasked. ``dz`` lives in the workspace: use it before
    the next chunk.
    """
    rows = h.shape[0]
    inv_tau = 1.0 / options.temperature
    want_grad = ce_scale is not None
    z = ws.get("z", rows)
    _logits_into(z, h, W, b, options.student_logit_scale, None, options, ws)
    cap = None
    softcap = options.student_cap
    if softcap is not None:  # keep tanh(z / c): the gradient needs 1 - tanh^2
        cap = torch.div(z, softcap, out=ws.get("cap", rows)).tanh_()
        torch.mul(cap, softcap, out=z)
    logp_1 = _log_softmax_into(ws.get("logp_1", rows), z)
    safe_y = y.clamp(0, z.shape[1] - 1).unsqueeze(1)  # ignored rows: any column, their scale is 0
    ce = logp_1.gather(1, safe_y).squeeze(1).neg()
    # A bias may mask the student's vocabulary with -inf; a softcap maps -inf to -softcap.
    student_inf = b is not None and softcap is None
    top1 = None if not metrics else z.argmax(1) == y  # on the transformed logits, as argmax picks

    div = grad_kl = entropy = None
    if ht is not None:
        logp_s = _log_softmax_into(ws.get("logp_s", rows), z.mul_(inv_tau))
        logp_t = ws.get("logp_t", rows)
        _logits_into(logp_t, ht, Wt, bt, options.teacher_logit_scale, options.teacher_cap, options, ws)
        _log_softmax_into(logp_t, logp_t.mul_(inv_tau))
        if metrics:  # z is free until the divergence takes it as scratch
            entropy = _entropy_rows(logp_1, z, student_inf)
        guard_inf = student_inf or (bt is not None and options.teacher_cap is None)
        div, grad_kl = _divergence(logp_s, logp_t, z, options, want_grad, guard_inf)
    elif metrics:
        entropy = _entropy_rows(logp_1, z, student_inf)
    out = None if not metrics else (entropy, top1)

    if not want_grad:
        return ce, div, None, out
    if options.loss_type == "dft":
        ce_scale = dft_row_scale(ce_scale, ce)
    dz = logp_1.exp_().mul_(ce_scale.unsqueeze(1))  # ce_scale * softmax(z)
    dz.scatter_add_(1, safe_y, -ce_scale.unsqueeze(1))
    if grad_kl is not None:
        dz.add_(grad_kl.mul_((kl_scale * options.temperature).unsqueeze(1)))
    if cap is not None:  # d(c tanh(x / c))/dx = 1 - tanh^2
        dz.mul_(cap.square_().neg_().add_(1.0))
    return ce, div, dz, out


def _entropy_rows(logp: Tensor, scratch: Tensor, guard_inf: bool) -> Tensor:
    """``-sum p log p`` per row ``[C]`` from log-probabilities ``[C, V]``, through ``scratch``.
    Where a logit is -inf (``guard_inf``), p log p is 0 there (xlogy), not 0 * -inf."""
    p = torch.exp(logp, out=scratch)
    terms = torch.special.xlogy(p, p, out=p) if guard_inf else p.mul_(logp)
    return terms.sum(-1).neg_()


class TorchEpilogue:
    """Element-wise torch ops on float32 (float64) buffers: runs anywhere; ``impl="torch"``."""

    budget_bytes = DEFAULT_CHUNK_BUDGET_BYTES

    @staticmethod
    def max_rows() -> int:
        """Rows beyond which a chunk gains nothing (:data:`MAX_CHUNK_ROWS`)."""
        return MAX_CHUNK_ROWS

    @staticmethod
    def chunk_buffers(options: LossOptions, has_teacher: bool, half_inputs: bool) -> float:
        """``[chunk, V]`` buffers a chunk holds at its peak (:func:`live_buffers`)."""
        return live_buffers(options, has_teacher, half_inputs)

    @classmethod
    def row_bytes(cls, V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype], options: LossOptions) -> int:
        half = dtype.itemsize == 2 or (teacher_dtype is not None and teacher_dtype.itemsize == 2)
        buffers = cls.chunk_buffers(options, teacher_dtype is not None, half)
        return int(buffers * accumulation_dtype(dtype).itemsize * max(V, 1))

    @staticmethod
    def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
        """The dtype of the gradient GEMMs: on a GPU the float32 dz of half-precision inputs is
        rounded to their dtype (tensor cores, as the Triton paths do); on CPU it stays float32."""
        return accumulation_dtype(dtype) if device.type == "cpu" else dtype

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws, metrics=False):
        """``(ce [C], div [C] or None, dz [C, V] or None, (entropy, top1) or None)``; unmasked,
        dz in float32."""
        return _torch_chunk(h, W, b, ht, Wt, bt, y, options, ce_scale, kl_scale, ws, metrics)
