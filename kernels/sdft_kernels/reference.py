"""The plain, materialised SDFT loss: the single source of truth for the semantics.

Tests, benchmarks and documentation compare every fast path against this file. It builds the
full ``[N, V]`` logits of student and teacher, so it is only meant for checking and for small
problems. It shares no code with the fast paths beyond :class:`LossOptions`: which positions
count, what ``"mean"`` divides by and how the terms combine are written out here again in plain
torch (the fast paths take them from :mod:`sdft_kernels.reduction`), so that a bug there cannot
pass unnoticed by agreeing with itself.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .loss_output import SDFTLossOutput
from .options import LossOptions, jsd_log_weights


def apply_softcap(logits: Tensor, softcap: Optional[float]) -> Tensor:
    """Gemma-style ``softcap * tanh(logits / softcap)``; identity when ``softcap`` is None."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def transform_logits(logits: Tensor, scale: float, softcap: Optional[float]) -> Tensor:
    """A model's logit transforms after its head: ``scale * z``, then the softcap (TRL's order)."""
    return apply_softcap(logits if scale == 1.0 else logits * scale, softcap)


def gemm_inputs(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], logits_dtype: str
                ) -> tuple[Tensor, Tensor, Optional[Tensor]]:
    """``(hidden, weight, bias)`` in the dtype their logit GEMM runs in: the promoted dtype of
    hidden and weight (bf16 activations with a float32 master head: float32), as torch's type
    promotion would compute ``hidden @ weight.T``. The bias keeps its dtype (it is added in the
    logits' float32), except with ``logits_dtype="input"``, where ``F.linear`` needs one dtype
    for all three: then all three are promoted together. The casts are differentiable, so
    gradients come back in each tensor's own dtype; tensors already in the dtype are not copied.
    """
    dtype = torch.promote_types(hidden.dtype, weight.dtype)
    if logits_dtype == "input" and bias is not None:
        dtype = torch.promote_types(dtype, bias.dtype)
        bias = bias.to(dtype)
    return hidden.to(dtype), weight.to(dtype), bias


def head_logits(hidden: Tensor, weight: Tensor, bias: Optional[Tensor], acc: torch.dtype, logits_dtype: str) -> Tensor:
    """``hidden @ weight.T + bias`` ``[N, V]`` in ``acc``, rounded where ``logits_dtype`` says
    (:class:`LossOptions`): ``"input"`` as ``F.linear`` in the inputs' dtype returns them;
    ``"float32"`` computed in ``acc`` (or the inputs' dtype where that is wider) from the same
    values, so half-precision products are summed without rounding."""
    if logits_dtype == "input":
        return F.linear(hidden, weight, bias).to(acc)
    dtype = torch.promote_types(acc, hidden.dtype)
    return F.linear(hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)).to(acc)


def divergence_rows(logp_s: Tensor, logp_t: Tensor, divergence: str, jsd_beta: float) -> Tensor:
    """Row-wise divergence between teacher and student log-probabilities ``[N, V] -> [N]``.

    ``forward_kl`` = KL(p_t || p_s) (the paper's), ``reverse_kl`` = KL(p_s || p_t),
    ``jsd`` = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s
    (``divergence`` as :attr:`LossOptions.effective_divergence` names it: beta in (0, 1)).
    Every term is ``p * (log p - log q)`` with ``0 log 0 = 0``: an entry where ``p`` is 0 (an
    underflow, or a logit of -inf that masks a vocabulary entry) contributes exactly 0 to the
    value and to the gradient, never a NaN.
    """

    def plogp_ratio(logp: Tensor, logq: Tensor) -> Tensor:
        p = logp.exp()
        # The where comes first, so that no NaN of (-inf) - (-inf) reaches the gradient either.
        return p * torch.where(p > 0, logp - logq, 0.0)

    if divergence == "forward_kl":
        return plogp_ratio(logp_t, logp_s).sum(-1)
    if divergence == "reverse_kl":
        return plogp_ratio(logp_s, logp_t).sum(-1)
    if divergence == "jsd":
        beta = jsd_beta
        log_beta, log_1m_beta = jsd_log_weights(beta)
        a, b = logp_t + log_beta, logp_s + log_1m_beta
        # Where both are -inf, m = 0 is never used (p_t = p_s = 0 there); finite stand-ins keep
        # logaddexp's gradient, exp(-inf - (-inf)), from being NaN.
        unused = (a == float("-inf")) & (b == float("-inf"))
        log_m = torch.logaddexp(a.masked_fill(unused, 0.0), b.masked_fill(unused, 0.0))
        kl_t = plogp_ratio(logp_t, log_m).sum(-1)
        kl_s = plogp_ratio(logp_s, log_m).sum(-1)
        return beta * kl_t + (1.0 - beta) * kl_s
    raise ValueError(f"unknown divergence {divergence!r}")


def reference_sdft_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    kl_mask: Optional[Tensor] = None,
    num_items: Union[None, int, float, Tensor] = None,
    options: LossOptions = LossOptions(),
) -> SDFTLossOutput:
    """Materialise the logits and compute the SDFT objective with autograd.

    Logits are float32 (float64 for float64 inputs), from the GEMM's float32 sums by default,
    or rounded to the input dtype first (``options.logits_dtype="input"``, as ``nn.Linear``
    would round them). Hidden states and a head of different dtypes are computed in their
    promoted dtype (:func:`gemm_inputs`). The teacher is a constant: no gradient reaches
    ``teacher_*`` tensors. Shapes: hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]``.
    """
    o = options
    student_hidden, student_weight, student_bias = gemm_inputs(student_hidden, student_weight, student_bias,
                                                               o.logits_dtype)
    if teacher_hidden is not None:
        teacher_hidden, teacher_weight, teacher_bias = gemm_inputs(teacher_hidden, teacher_weight, teacher_bias,
                                                                   o.logits_dtype)
    acc = torch.float64 if student_hidden.dtype == torch.float64 else torch.float32
    label_mask = labels != o.ignore_index
    kl_rows = label_mask if kl_mask is None else kl_mask.bool()
    if teacher_hidden is None:
        kl_rows = torch.zeros_like(label_mask)
    # Positions counted by neither term contribute nothing, not even a NaN in their hidden state.
    counted = (label_mask | kl_rows).unsqueeze(-1)
    student_hidden = torch.where(counted, student_hidden, student_hidden.new_zeros(()))
    z_s = transform_logits(head_logits(student_hidden, student_weight, student_bias, acc, o.logits_dtype),
                           o.student_logit_scale, o.student_cap)
    safe_labels = labels.masked_fill(~label_mask, 0).unsqueeze(-1)
    ce_rows = torch.where(label_mask, torch.logsumexp(z_s, -1) - z_s.gather(-1, safe_labels).squeeze(-1), 0.0)

    if teacher_hidden is not None:
        with torch.no_grad():
            z_t = head_logits(teacher_hidden, teacher_weight, teacher_bias, acc, o.logits_dtype)
            # Rows outside the KL mask get constant teacher logits: whatever the teacher holds
            # there (a NaN) must not reach the student's gradient through a weight of 0.
            z_t = torch.where(kl_rows.unsqueeze(-1), transform_logits(z_t, o.teacher_logit_scale, o.teacher_cap), 0.0)
        tau = o.temperature
        div = divergence_rows(
            torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1), o.effective_divergence, o.jsd_beta
        )
        kl_rows_val = torch.where(kl_rows, div, 0.0)
    else:
        kl_rows_val = torch.zeros_like(ce_rows)

    if o.loss_type == "dft":  # each row's cross-entropy weighted by its probability of the label, a constant
        ce_rows = ce_rows * torch.exp(-ce_rows.detach())
    ce, kl = (_reduce(rows, o.reduction, label_mask, num_items) for rows in (ce_rows, kl_rows_val))
    loss = o.ce_weight * ce + o.kl_weight * o.temperature**2 * kl
    entropy = top1 = None
    if o.metrics:
        entropy, top1 = student_metrics(z_s.detach(), labels, label_mask)
    return SDFTLossOutput(loss, ce.detach(), kl.detach(), label_mask.sum(), entropy=entropy, top1=top1)


def _reduce(rows: Tensor, reduction: str, label_mask: Tensor, num_items: Union[None, int, float, Tensor]) -> Tensor:
    """``rows`` ``[N]`` reduced: kept (``"none"``), summed, or summed and divided by
    ``num_items`` (default: the labelled count), a divisor of at least 1 so that a batch with
    nothing to count gives 0."""
    if reduction == "none":
        return rows
    total = rows.sum()
    if reduction == "sum":
        return total
    if num_items is None:
        count = label_mask.sum()
    elif isinstance(num_items, Tensor):  # a one-element tensor, of any shape
        count = num_items.detach().reshape(()).to(rows.device)
    else:
        count = torch.tensor(float(num_items), dtype=rows.dtype, device=rows.device)
    return total / count.to(rows.dtype).clamp_min(1)


def student_metrics(z_s: Tensor, labels: Tensor, label_mask: Tensor) -> tuple[Tensor, Tensor]:
    """``(entropy [N], top1 [N])`` of the student's logits ``z_s`` ``[N, V]`` (after its
    transforms) at temperature 1: ``-sum p log p`` (0 log 0 = 0) and whether the label is the
    first maximal logit; 0 / False where the label is ignored."""
    logp = torch.log_softmax(z_s, -1)
    p = logp.exp()
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(-1)
    top1 = z_s.argmax(-1) == labels
    return torch.where(label_mask, entropy, 0.0), top1 & label_mask
