"""The plain, materialised SDFT loss: the single source of truth for the semantics.

Tests, benchmarks and documentation compare every fast path against this file. It builds the
full ``[N, V]`` logits of student and teacher, so it is only meant for checking and for small
problems.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .options import LossOptions, jsd_log_weights
from .reduction import combine, counted_masks, normaliser


class SDFTLossOutput(NamedTuple):
    """Loss plus its parts, as returned with ``return_components=True``.

    ``ce`` and ``kl`` are reduced like ``loss`` (scalars, or ``[N]`` for ``reduction="none"``)
    and carry no weights: ``loss = ce_weight * ce + kl_weight * tau**2 * kl``. ``ce``, ``kl``
    and ``n_tokens`` (int64 count of positions whose label is not ignored) are detached.
    """

    loss: Tensor
    ce: Tensor
    kl: Tensor
    n_tokens: Tensor


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss statistics are float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_softcap(logits: Tensor, softcap: Optional[float]) -> Tensor:
    """Gemma-style ``softcap * tanh(logits / softcap)``; identity when ``softcap`` is None."""
    if softcap is None:
        return logits
    return softcap * torch.tanh(logits / softcap)


def divergence_rows(logp_s: Tensor, logp_t: Tensor, divergence: str, jsd_beta: float) -> Tensor:
    """Row-wise divergence between teacher and student log-probabilities ``[N, V] -> [N]``.

    ``forward_kl`` = KL(p_t || p_s) (the paper's), ``reverse_kl`` = KL(p_s || p_t),
    ``jsd`` = beta * KL(p_t || m) + (1 - beta) * KL(p_s || m), m = beta * p_t + (1 - beta) * p_s.
    Works in log space so that underflowed probabilities give 0 * finite, never NaN.
    """
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if divergence == "forward_kl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    if divergence == "reverse_kl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    if divergence == "jsd":
        beta = jsd_beta
        # log m as a log-sum-exp so that beta in {0, 1} (log 0 = -inf) stays exact.
        log_beta, log_1m_beta = jsd_log_weights(beta)
        log_m = torch.logaddexp(logp_t + log_beta, logp_s + log_1m_beta)
        kl_t = (p_t * (logp_t - log_m)).sum(-1)
        kl_s = (p_s * (logp_s - log_m)).sum(-1)
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

    Logits are computed in the input dtype (as ``nn.Linear`` would), then promoted to float32
    (float64 for float64 inputs) for the loss. The teacher is a constant: no gradient reaches
    ``teacher_*`` tensors. Shapes: hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]``.
    """
    o = options
    acc = accumulation_dtype(student_hidden.dtype)
    label_mask, kl_rows = counted_masks(labels, kl_mask, o.ignore_index)
    if teacher_hidden is None:
        kl_rows = torch.zeros_like(label_mask)
    # Positions counted by neither term contribute nothing, not even a NaN in their hidden state.
    counted = (label_mask | kl_rows).unsqueeze(-1)
    student_hidden = torch.where(counted, student_hidden, student_hidden.new_zeros(()))
    z_s = apply_softcap(F.linear(student_hidden, student_weight, student_bias).to(acc), o.softcap)
    safe_labels = labels.masked_fill(~label_mask, 0).unsqueeze(-1)
    ce_rows = torch.where(label_mask, torch.logsumexp(z_s, -1) - z_s.gather(-1, safe_labels).squeeze(-1), 0.0)

    if teacher_hidden is not None:
        with torch.no_grad():
            teacher_hidden = torch.where(counted, teacher_hidden, teacher_hidden.new_zeros(()))
            z_t = F.linear(teacher_hidden, teacher_weight, teacher_bias).to(acc)
            z_t = apply_softcap(z_t, o.softcap)
        tau = o.temperature
        div = divergence_rows(
            torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1), o.divergence, o.jsd_beta
        )
        kl_rows_val = torch.where(kl_rows, div, 0.0)
    else:
        kl_rows_val = torch.zeros_like(ce_rows)

    loss, ce, kl = combine(ce_rows, kl_rows_val, normaliser(label_mask, num_items, acc), o)
    return SDFTLossOutput(loss, ce.detach(), kl.detach(), label_mask.sum())
