"""Which positions count, what ``mean`` divides by, the per-row gradient scales, and the dtype
of the loss statistics.

Shared by the fast paths (the chunk loop and the Triton kernels), so that they cannot disagree
with each other. The reference (:mod:`sdft_kernels.reference`) writes the same rules out on its
own, so that a bug here shows up as a difference from it rather than agreeing with itself.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from .options import LossOptions


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Loss statistics are float32 for half/bfloat16/float32 inputs, float64 for float64."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def counted_masks(labels: Tensor, kl_mask: Optional[Tensor], ignore_index: int) -> tuple[Tensor, Tensor]:
    """``(label_mask, kl_mask)`` as contiguous booleans ``[N]`` (the kernels read them with
    stride 1: a strided or expanded mask is copied); the KL defaults to the labelled positions."""
    label_mask = (labels != ignore_index).contiguous()
    return label_mask, (label_mask if kl_mask is None else kl_mask.bool().contiguous())


def normaliser(label_mask: Tensor, num_items: Union[None, int, float, Tensor], dtype: torch.dtype) -> Tensor:
    """The divisor of ``reduction="mean"``: ``num_items`` if given, else the labelled count.

    A 0-dim tensor of ``dtype``, at least 1, so that a batch with nothing counted (``num_items``
    0: an empty accumulated batch) gives 0 rather than 0 / 0. No host synchronisation: a Python
    number is filled in on the device, not copied there.
    """
    if num_items is None:
        count = label_mask.sum()
    elif isinstance(num_items, Tensor):
        count = num_items.detach().reshape(()).to(device=label_mask.device)
    else:
        count = torch.full((), float(num_items), dtype=dtype, device=label_mask.device)
    return count.to(dtype).clamp_min(1)


def ce_term_rows(ce_rows: Tensor, options: LossOptions) -> Tensor:
    """The per-row cross-entropy term from the (masked) cross-entropy rows: themselves, or with
    ``loss_type="dft"`` times the label's probability ``exp(-ce)``, a constant weight (the
    kernels form the gradient with it: :func:`dft_weights`). 0 stays 0."""
    return ce_rows * dft_weights(ce_rows) if options.loss_type == "dft" else ce_rows


def dft_weights(ce_rows: Tensor) -> Tensor:
    """``exp(-ce)``: each row's probability of its label, the weight of its cross-entropy under
    ``loss_type="dft"``; detached."""
    return torch.exp(-ce_rows.detach())


def reduce_rows(rows: Tensor, reduction: str, denom: Tensor) -> Tensor:
    """``[N] -> []`` by sum or sum / denom; ``"none"`` keeps the rows."""
    if reduction == "none":
        return rows
    total = rows.sum()
    return total / denom if reduction == "mean" else total


def combine(ce_rows: Tensor, div_rows: Tensor, denom: Tensor, options: LossOptions) -> tuple[Tensor, Tensor, Tensor]:
    """Reduce already-masked per-row CE terms (:func:`ce_term_rows`) and divergence into
    ``(loss, ce, kl)``."""
    ce = reduce_rows(ce_rows, options.reduction, denom)
    kl = reduce_rows(div_rows, options.reduction, denom)
    return options.ce_weight * ce + options.kl_coefficient * kl, ce, kl


def row_scales(
    grad: Tensor, denom: Tensor, label_mask: Tensor, kl_mask: Tensor, options: LossOptions
) -> tuple[Tensor, Tensor]:
    """Per-row factors of the logit gradient, ``[N]`` each, in ``denom``'s dtype.

    With upstream gradient ``grad`` (a scalar, or ``[N]`` for ``reduction="none"``)::

        d loss / d x_s[i] = ce_scale[i] * (softmax(z_s[i]) - onehot(y_i))
                          + kl_scale[i] * tau * dD_i / d(z_s[i] / tau)       [* softcap']

    for the student's logits ``z_s = softcap(s * x_s)``: both scales hold the logit scale ``s``
    (the softcap's derivative is the kernels'). ``kl_scale`` holds ``kl_weight`` and no
    ``tau``: the kernels apply the ``tau**2 / tau = tau`` factor.
    """
    g = grad.to(denom.dtype)
    if options.reduction == "mean":
        g = g / denom
    if options.student_logit_scale != 1.0:
        g = g * options.student_logit_scale
    ce_scale = label_mask.to(denom.dtype) * (g * options.ce_weight)
    kl_scale = kl_mask.to(denom.dtype) * (g * options.kl_weight)
    return ce_scale, kl_scale
