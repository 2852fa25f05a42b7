"""Input checks run before any kernel: every error names the offending shape, dtype or value."""

from __future__ import annotations

import math
from typing import Optional, Union

import torch
from torch import Tensor

from .loss_inputs import LossInputs

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _matrix(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")


def _bias(name: str, bias: Optional[Tensor], weight: Tensor, weight_name: str) -> None:
    if bias is None:
        return
    if bias.shape != (weight.shape[0],):
        raise ValueError(f"{name} must have shape ({weight.shape[0]},) to match {weight_name}, got {tuple(bias.shape)}")
    if bias.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {bias.dtype}")
    if bias.device != weight.device:
        raise ValueError(f"{name} is on {bias.device} but {weight_name} is on {weight.device}")


def _same_device(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but student_hidden is on {device}")


def check_inputs(inputs: LossInputs) -> None:
    """Raise ``ValueError``/``TypeError`` for inconsistent shapes, dtypes or devices of a call's
    tensors, as given (not yet counted). The floating tensors may have different dtypes
    (:func:`sdft_kernels.reference.gemm_inputs`)."""
    student_hidden, student_weight, labels = inputs.student_hidden, inputs.student_weight, inputs.labels
    teacher_hidden, teacher_weight = inputs.teacher_hidden, inputs.teacher_weight
    student_bias, teacher_bias = inputs.student_bias, inputs.teacher_bias
    kl_mask, num_items = inputs.kl_mask, inputs.num_items
    _matrix("student_hidden", student_hidden)
    _matrix("student_weight", student_weight)
    N, D = student_hidden.shape
    V = student_weight.shape[0]
    if student_weight.shape[1] != D:
        raise ValueError(
            f"student_weight has hidden size {student_weight.shape[1]} but student_hidden has {D} "
            f"(shapes {tuple(student_weight.shape)} and {tuple(student_hidden.shape)})"
        )
    _bias("student_bias", student_bias, student_weight, "student_weight")

    if not isinstance(labels, Tensor) or labels.dtype != torch.int64:
        got = labels.dtype if isinstance(labels, Tensor) else type(labels).__name__
        raise TypeError(f"labels must be an int64 tensor, got {got}")
    if labels.shape != (N,):
        raise ValueError(f"labels must have shape ({N},) to match student_hidden, got {tuple(labels.shape)}")

    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("teacher_hidden and teacher_weight must be given together (or both None)")
    if teacher_hidden is not None:
        _matrix("teacher_hidden", teacher_hidden)
        _matrix("teacher_weight", teacher_weight)
        if teacher_hidden.shape[0] != N:
            raise ValueError(f"teacher_hidden has {teacher_hidden.shape[0]} tokens but student_hidden has {N}")
        if teacher_weight.shape[0] != V:
            raise ValueError(f"teacher_weight has vocab size {teacher_weight.shape[0]} but student_weight has {V}")
        if teacher_weight.shape[1] != teacher_hidden.shape[1]:
            raise ValueError(
                f"teacher_weight has hidden size {teacher_weight.shape[1]} but teacher_hidden has "
                f"{teacher_hidden.shape[1]}"
            )
        _bias("teacher_bias", teacher_bias, teacher_weight, "teacher_weight")
    elif teacher_bias is not None:
        raise ValueError("teacher_bias given without teacher_hidden/teacher_weight")

    if kl_mask is not None:
        if not isinstance(kl_mask, Tensor) or kl_mask.dtype != torch.bool or kl_mask.shape != (N,):
            desc = f"{kl_mask.dtype} {tuple(kl_mask.shape)}" if isinstance(kl_mask, Tensor) else type(kl_mask).__name__
            raise ValueError(f"kl_mask must be a bool tensor of shape ({N},), got {desc}")

    check_num_items(num_items)

    _same_device(
        student_hidden.device, student_weight=student_weight, labels=labels, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias, kl_mask=kl_mask,
        num_items=num_items if isinstance(num_items, Tensor) else None,
    )


_NUM_ITEMS_RULE = "a count >= 1, or 0 for an accumulated batch with nothing to count"


def check_num_items(num_items: Union[None, int, float, Tensor]) -> None:
    """``num_items``: None, a number >= 1 or 0, or a one-element real tensor.

    A tensor's value is checked by :func:`check_label_range` (reading it needs a host sync).
    """
    if num_items is None:
        return
    if isinstance(num_items, Tensor):
        if num_items.numel() != 1 or num_items.dtype == torch.bool or num_items.is_complex():
            raise ValueError(
                f"num_items must be a one-element real tensor ({_NUM_ITEMS_RULE}), got {num_items.dtype} of "
                f"shape {tuple(num_items.shape)}"
            )
        return
    ok = not isinstance(num_items, bool) and isinstance(num_items, (int, float)) and (
        num_items == 0 or 1 <= num_items < math.inf)
    if not ok:
        raise ValueError(f"num_items must be {_NUM_ITEMS_RULE}, got {num_items!r}")


def check_label_range(labels: Tensor, vocab_size: int, ignore_index: int,
                      num_items: Union[None, int, float, Tensor] = None, mean: bool = True) -> None:
    """Every label is ``ignore_index`` or in ``[0, vocab_size)``, a tensor ``num_items`` holds a
    valid count, and, for ``reduction="mean"`` (``mean``), ``num_items`` is not 0 while some
    position has a label: 0 means an accumulated batch with nothing to count, and dividing
    that batch's labelled positions by it would return their plain sum. Costs one host sync
    for all of them."""
    labelled = labels != ignore_index
    bad = labelled & ((labels < 0) | (labels >= vocab_size))
    checks = [bad.any()]
    if isinstance(num_items, Tensor):
        n = num_items.detach().reshape(()).to(device=labels.device, dtype=torch.float64)
        checks.append(~((n == 0) | ((n >= 1) & torch.isfinite(n))))
        if mean:
            checks.append((n == 0) & labelled.any())
    elif mean and num_items is not None and num_items == 0:
        checks.append(labelled.any())
    bad_labels, *bad_count = torch.stack(checks).tolist()
    if isinstance(num_items, Tensor) and bad_count[0]:
        raise ValueError(f"num_items must be {_NUM_ITEMS_RULE}, got {num_items.item()!r}")
    if bad_count and bad_count[-1]:
        raise ValueError(
            f"num_items is 0 (an accumulated batch with nothing to count) but {int(labelled.sum())} positions have "
            "labels: pass the count of labelled positions of the whole batch, or None to count them here"
        )
    if bad_labels:
        pos = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"labels[{pos}] = {int(labels[pos])} is neither ignore_index ({ignore_index}) nor in [0, {vocab_size})"
        )
