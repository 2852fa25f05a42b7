"""The public entry point: ``fused_linear_sdft_loss``."""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import Tensor

from .options import IMPLS, TRITON_IMPLS, LossOptions
from .reduction import counted_masks, normaliser
from .reference import SDFTLossOutput, accumulation_dtype, reference_sdft_loss
from .torch_chunked import TorchChunkedSDFT, TorchEpilogue, TritonEpilogue
from .validation import check_inputs, check_label_range


def fused_linear_sdft_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    labels: Tensor,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    *,
    student_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    ce_weight: float = 1.0,
    kl_weight: float = 1.0,
    temperature: float = 0.5,
    divergence: str = "forward_kl",
    jsd_beta: float = 0.5,
    ignore_index: int = -100,
    kl_mask: Optional[Tensor] = None,
    reduction: str = "mean",
    num_items: Union[None, int, float, Tensor] = None,
    softcap: Optional[float] = None,
    impl: str = "auto",
    return_components: bool = False,
    validate_labels: bool = True,
    chunk_size: Optional[int] = None,
) -> Union[Tensor, SDFTLossOutput]:
    """LM-head matmul + cross-entropy + teacher divergence, without materialising the logits.

    Computes the same thing as this plain torch over full logits (``forward_kl``, no softcap)::

        z_s = student_hidden @ student_weight.T + student_bias            # [N, V]
        z_t = teacher_hidden @ teacher_weight.T + teacher_bias            # [N, V], constant
        ce  = F.cross_entropy(z_s, labels, ignore_index=ignore_index, reduction="none")
        kl  = (p_t * (log_softmax(z_t / tau) - log_softmax(z_s / tau))).sum(-1) * kl_mask
        loss = (ce_weight * ce + kl_weight * tau**2 * kl).sum() / num_items_or_label_count

    Args:
        student_hidden: ``[N, D]`` final hidden states (float16/bfloat16/float32/float64).
        student_weight: ``[V, D]`` LM head, same dtype. With ``requires_grad=False`` its
            gradient GEMM is skipped.
        labels: ``[N]`` int64; ``ignore_index`` or a token id in ``[0, V)``.
        teacher_hidden: ``[N, Dt]`` teacher final hidden states, or None for plain
            (fused linear) cross-entropy. ``Dt`` may differ from ``D``.
        teacher_weight: ``[V, Dt]`` teacher head; may be the very tensor ``student_weight``.
            The teacher is a constant: no gradient reaches ``teacher_*``.
        student_bias, teacher_bias: optional ``[V]`` biases.
        ce_weight, kl_weight: weights of the two terms (``kl_weight`` is the paper's lambda).
        temperature: tau of the divergence; CE always uses temperature 1. The divergence term
            is scaled by ``tau**2``.
        divergence: ``"forward_kl"`` = KL(p_t || p_s) (the paper's), ``"reverse_kl"`` =
            KL(p_s || p_t), ``"jsd"`` = beta KL(p_t || m) + (1 - beta) KL(p_s || m) with
            ``m = beta p_t + (1 - beta) p_s``, beta = ``jsd_beta`` in [0, 1].
        kl_mask: ``[N]`` bool, the positions that carry the divergence; default: positions
            whose label is not ignored. Positions counted by neither term contribute nothing.
        reduction: ``"mean"`` (sum / normaliser), ``"sum"`` or ``"none"`` (``[N]`` rows).
        num_items: normaliser of ``"mean"`` (e.g. the token count of a whole accumulated
            batch); default: the number of positions whose label is not ignored. At least 1.
        softcap: if set, every logit z becomes ``softcap * tanh(z / softcap)`` (Gemma 2).
        impl: ``"auto"`` (:func:`default_impl`), ``"triton_chunked"`` (CUDA; the default
            there: chunks of logits from cuBLAS GEMMs and one fused Triton epilogue), ``"triton"``
            (CUDA: fused Triton kernels that store no logits at all; less memory, twice the
            FLOPs), ``"torch"`` (chunked plain torch; the default elsewhere) or ``"reference"``
            (materialised; for checking).
        return_components: return :class:`SDFTLossOutput` ``(loss, ce, kl, n_tokens)``;
            the parts are detached and unweighted, and computing them needs no host sync.
        validate_labels: check the label range (one host sync); turn off to avoid the sync.
        chunk_size: rows per chunk of the chunked paths (default: from a budget of ~192 MiB
            for ``"torch"``, 1 GiB of logits for ``"triton_chunked"``).

    Returns:
        The loss (float32, float64 for float64 inputs): a scalar, or ``[N]`` for
        ``reduction="none"``; or :class:`SDFTLossOutput` with ``return_components=True``.
    """
    options = LossOptions(
        ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature, divergence=divergence,
        jsd_beta=jsd_beta, ignore_index=ignore_index, reduction=reduction, softcap=softcap,
    )
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    check_inputs(student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
                 student_bias, teacher_bias, kl_mask, num_items)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if validate_labels:
        check_label_range(labels, student_weight.shape[0], ignore_index)
    impl = _resolve_impl(impl, student_hidden.device)

    # The teacher is a constant for every implementation.
    if teacher_hidden is not None:
        teacher_hidden, teacher_weight = teacher_hidden.detach(), teacher_weight.detach()
        teacher_bias = None if teacher_bias is None else teacher_bias.detach()

    if impl == "reference":
        out = reference_sdft_loss(
            student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, kl_mask=kl_mask, num_items=num_items,
            options=options,
        )
        return out if return_components else out.loss

    label_mask, kl_rows = counted_masks(labels, kl_mask, ignore_index)
    if teacher_hidden is None:
        kl_rows = torch.zeros_like(label_mask)
    denom = normaliser(label_mask, num_items, accumulation_dtype(student_hidden.dtype))
    tensors = [student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias]
    if impl != "torch":  # Triton kernels index rows with one stride and contiguous columns
        tensors = [None if t is None else t.contiguous() for t in tensors]
    args = (*tensors, labels.contiguous(), label_mask, kl_rows, denom, options, chunk_size)
    if impl == "triton":
        loss, ce, kl = _triton_function().apply(*args)
    else:
        epilogue = TritonEpilogue if impl == "triton_chunked" else TorchEpilogue
        loss, ce, kl = TorchChunkedSDFT.apply(*args, epilogue)
    if not return_components:
        return loss
    return SDFTLossOutput(loss, ce, kl, label_mask.sum())


def default_impl(device: Union[str, torch.device]) -> str:
    """What ``impl="auto"`` runs on ``device``.

    CUDA: ``"triton_chunked"``, the essential GEMMs in cuBLAS plus one Triton epilogue per
    chunk of logits; ``impl="triton"`` stores no logits at all (less memory) but recomputes
    them in Triton tiles (twice the FLOPs). Elsewhere: the chunked torch path.
    """
    return "triton_chunked" if torch.device(device).type == "cuda" else "torch"


def _resolve_impl(impl: str, device: torch.device) -> str:
    if impl == "auto":
        return default_impl(device)
    if impl in TRITON_IMPLS and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError(
            f"impl={impl!r} needs CUDA tensors (got device {device}); use impl='torch' on this device, "
            "or set TRITON_INTERPRET=1 before importing triton to run the kernels in the interpreter"
        )
    return impl


def _triton_function():
    from .triton_autograd import TritonSDFT

    return TritonSDFT
