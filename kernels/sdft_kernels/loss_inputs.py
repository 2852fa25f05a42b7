"""The tensors of one loss call, carried as one object from the entry point to the kernels."""

from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
from torch import Tensor

from .options import LossOptions
from .reduction import accumulation_dtype, counted_masks, normaliser


class LossInputs(NamedTuple):
    """A call's tensors (the arguments of :func:`sdft_kernels.fused_linear_sdft_loss`).

    Shapes: ``student_hidden`` ``[N, D]``, ``student_weight`` ``[V, D]``, ``labels`` ``[N]``
    int64, ``teacher_hidden`` ``[N, Dt]``, ``teacher_weight`` ``[V, Dt]``, the biases ``[V]``,
    ``kl_mask`` ``[N]`` bool. As a caller gives them, ``kl_mask`` may be None (the labelled
    positions), ``num_items`` None (the labelled count) or a number, and ``label_mask`` is
    None; :meth:`counted` resolves all three for the kernels.

    An ``autograd.Function`` tracks only the tensors passed to it as direct arguments, so the
    fused ones take these as ``apply(options, run, *inputs)`` and rebuild them inside
    (``LossInputs(*tensors)``); their backward returns :meth:`gradients`, one per field.
    """

    student_hidden: Tensor
    student_weight: Tensor
    labels: Tensor
    teacher_hidden: Optional[Tensor] = None
    teacher_weight: Optional[Tensor] = None
    student_bias: Optional[Tensor] = None
    teacher_bias: Optional[Tensor] = None
    kl_mask: Optional[Tensor] = None
    num_items: Union[None, int, float, Tensor] = None
    label_mask: Optional[Tensor] = None

    def counted(self, options: LossOptions) -> "LossInputs":
        """These inputs as the kernels take them: ``label_mask`` ``[N]`` the labelled positions,
        ``kl_mask`` ``[N]`` the positions that carry the divergence (none without a teacher),
        both contiguous bool, and ``num_items`` the divisor of ``"mean"`` as a 0-dim tensor
        of the loss statistics' dtype (:func:`sdft_kernels.reduction.normaliser`)."""
        label_mask, kl_rows = counted_masks(self.labels, self.kl_mask, options.ignore_index)
        if self.teacher_hidden is None:
            kl_rows = torch.zeros_like(label_mask)
        denom = normaliser(label_mask, self.num_items, accumulation_dtype(self.student_hidden.dtype))
        return self._replace(kl_mask=kl_rows, num_items=denom, label_mask=label_mask)

    @classmethod
    def gradients(cls, hidden: Optional[Tensor], weight: Optional[Tensor], bias: Optional[Tensor]) -> "LossInputs":
        """The gradient of each field, as an ``autograd.Function``'s backward returns them: the
        student's hidden states, head and bias; None for the rest (the teacher is a constant,
        labels and masks are not differentiable)."""
        return cls(hidden, weight, None, student_bias=bias)
