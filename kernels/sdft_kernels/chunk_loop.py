"""The chunk loop of ``impl="torch"`` and ``impl="triton_chunked"``, and its autograd glue.

Tokens are processed in chunks of ``chunk_size`` rows, so the transient memory is a few
``[chunk, V]`` buffers instead of whole ``[N, V]`` logits (:mod:`sdft_kernels.workspace`: one
set per call, whose storage on CPU is kept for the next call). What happens between a chunk's
logit GEMMs and its gradient GEMMs is the *epilogue*, passed in:
:class:`sdft_kernels.torch_epilogue.TorchEpilogue` (element-wise torch ops on float32 buffers;
on large CPU chunks :class:`sdft_kernels.compiled_epilogue.CompiledTorchEpilogue` compiles
the same work into one C++ kernel) or :class:`sdft_kernels.triton_chunked.TritonEpilogue` (one Triton kernel on float32 logits
from cuBLAS). What differs between them is an attribute of the epilogue: its memory
budget and bytes per row, the dtype of the gradient GEMMs, and the chunk computation itself.

When gradients are needed and the upstream gradient is a scalar (``reduction`` "mean" or
"sum"), the logit gradient of a chunk is formed right after its loss and pushed through the
two gradient GEMMs at once: the whole forward+backward then costs the four essential GEMMs
(``8 N D V`` FLOPs) plus a few element-wise passes. For ``reduction="none"`` the weight
gradient depends on the per-row upstream gradient, and in float16 a gradient formed for an
upstream gradient of 1 would flush to zero before a loss scale lifts it: there the backward
recomputes the chunks with the real upstream gradient.

Positions that count for neither term (label ignored and outside ``kl_mask``) are dropped
before any GEMM where finding them costs no device synchronisation (CPU tensors): with 20 %
ignored labels that is 20 % fewer FLOPs. On a GPU they are zeroed instead.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Protocol

import torch
from torch import Tensor

from .autograd_guard import fused_backward, gradients_needed
from .loss_inputs import LossInputs
from .options import LossOptions, RunSettings
from .reduction import accumulation_dtype, ce_term_rows, combine, row_scales
from .weight_grad import accumulate_weight_grad, weight_grad_dtype
from .workspace import Workspace


class Epilogue(Protocol):
    """What the loop needs of an epilogue (both are classes of static methods)."""

    budget_bytes: int  # transient bytes of the chunk buffers by default

    @staticmethod
    def max_rows() -> Optional[int]:
        """Rows beyond which a chunk gains nothing (None: as many as the budget allows)."""

    @staticmethod
    def row_bytes(V: int, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype], options: LossOptions) -> int: ...

    @staticmethod
    def gemm_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype: ...

    @staticmethod
    def chunk(h, W, b, ht, Wt, bt, y, kl_mask, options, ce_scale, kl_scale, ws):
        """``(ce [C], div [C] or None, dz [C, V] or None)`` of one chunk (``dz`` with scales)."""


class Grads(NamedTuple):
    hidden: Optional[Tensor]
    weight: Optional[Tensor]
    bias: Optional[Tensor]


def chunk_rows(M: int, V: int, epilogue: Epilogue, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype],
               options: LossOptions, chunk_size: Optional[int]) -> int:
    """Rows per chunk: ``chunk_size``, or as many as the epilogue's budget allows (at most its
    ``max_rows``), evened out over the ``M`` rows so that no small, inefficient GEMM is left at
    the end."""
    if chunk_size is not None:
        return chunk_size
    step = max(16, int(epilogue.budget_bytes // epilogue.row_bytes(V, dtype, teacher_dtype, options)))
    cap = epilogue.max_rows()
    if cap is not None:
        step = min(step, cap)
    return -(-M // -(-M // step)) if M > 0 else step


def _counted_rows(rows: Tensor, h: Tensor) -> tuple[Optional[Tensor], Tensor]:
    """``(index of the rows that count or None for all, h)``.

    The index needs the mask on the host: only CPU tensors give it without a device
    synchronisation. Elsewhere every row stays, and uncounted ones are zeroed so that a NaN
    there reaches no gradient.
    """
    if h.device.type == "cpu":
        index = rows.nonzero().squeeze(1)
        return (None if index.numel() == rows.numel() else index), h
    return None, torch.where(rows.unsqueeze(1), h, h.new_zeros(()))


def chunked_sdft(
    inputs: LossInputs, options: LossOptions, run: RunSettings,
    ce_scale: Optional[Tensor], kl_scale: Optional[Tensor], need: tuple[bool, bool, bool], metrics: bool = False,
) -> tuple[Tensor, Tensor, Grads, Optional[tuple[Tensor, Tensor]]]:
    """Masked loss rows ``ce_rows [N]``, ``div_rows [N]``, with scales the gradients, and with
    ``metrics`` the student's ``(entropy [N], top1 [N])`` (0 / False where the label is ignored).

    ``inputs`` are counted (:meth:`LossInputs.counted`); ``run`` gives the epilogue and the
    chunk size. ``need`` says which of (hidden, weight, bias) gradients to form;
    ``ce_scale``/``kl_scale`` ``[N]`` are the per-row factors of
    :func:`sdft_kernels.reduction.row_scales` (the epilogue weights ``ce_scale`` by ``exp(-ce)``
    itself for ``loss_type="dft"``: only it knows the row's cross-entropy before the gradient).
    """
    h, W, b = inputs.student_hidden, inputs.student_weight, inputs.student_bias
    ht, Wt, bt = inputs.teacher_hidden, inputs.teacher_weight, inputs.teacher_bias
    labels, label_mask, kl_mask = inputs.labels, inputs.label_mask, inputs.kl_mask
    epilogue = run.epilogue
    N, V = h.shape[0], W.shape[0]
    acc = accumulation_dtype(h.dtype)
    ce_rows = torch.zeros(N, dtype=acc, device=h.device)
    div_rows = torch.zeros(N, dtype=acc, device=h.device)
    row_metrics = (torch.zeros(N, dtype=acc, device=h.device), torch.zeros(N, dtype=torch.bool, device=h.device)
                   ) if metrics else None
    want_grad = ce_scale is not None and any(need)

    # A term that does not count for a row contributes nothing to it: teacher rows outside the
    # KL mask are zeroed, so that a NaN there cannot reach the student through 0 * NaN.
    if ht is not None:
        ht = torch.where(kl_mask.unsqueeze(1), ht, ht.new_zeros(()))
    index, h = _counted_rows(label_mask | kl_mask, h)
    M = N if index is None else index.numel()
    step = chunk_rows(M, V, epilogue, h.dtype, None if ht is None else ht.dtype, options, run.chunk_size)
    ws = Workspace(min(step, max(M, 1)), V, acc, h.device)

    # Every row of d_h is written by some chunk unless rows were dropped; d_w is overwritten by
    # the first chunk, and its sums are float32 where the device allows.
    gemm_dtype = epilogue.gemm_dtype(h.dtype, h.device)
    d_h = d_w = d_b = None
    if want_grad and need[0]:
        d_h = torch.zeros_like(h) if index is not None or M == 0 else torch.empty_like(h)
    if want_grad and need[1]:
        d_w = torch.empty(W.shape, dtype=weight_grad_dtype(gemm_dtype, acc, W.device), device=W.device)
        if M == 0:
            d_w.zero_()
    if want_grad and need[2]:
        d_b = torch.zeros(V, dtype=acc, device=W.device)

    def take(t, s, e):
        if t is None:
            return None
        return t[s:e] if index is None else t.index_select(0, index[s:e])

    for s in range(0, M, step):
        e = min(s + step, M)
        rows_ix = slice(s, e) if index is None else index[s:e]
        h_c = take(h, s, e)
        ce, div, dz, chunk_metrics = epilogue.chunk(
            h_c, W, b, take(ht, s, e), Wt, bt, take(labels, s, e), take(kl_mask, s, e), options,
            take(ce_scale, s, e) if want_grad else None, take(kl_scale, s, e) if want_grad else None, ws, metrics,
        )
        labelled = take(label_mask, s, e)
        ce_rows[rows_ix] = torch.where(labelled, ce, 0.0)
        if row_metrics is not None:
            row_metrics[0][rows_ix] = torch.where(labelled, chunk_metrics[0], 0.0)
            row_metrics[1][rows_ix] = chunk_metrics[1] & labelled
        if div is not None:
            div_rows[rows_ix] = torch.where(take(kl_mask, s, e), div, 0.0)
        if dz is None:
            continue
        if d_b is not None:
            # Summed in acc from dz as the epilogue formed it: the torch epilogue's float32 dz
            # before the rounding below; the Triton epilogue's dz, already in the inputs'
            # dtype (the same rounded values that the weight gradient's GEMM sees).
            d_b += dz.sum(0, dtype=acc)
        if dz.dtype != gemm_dtype:  # into a reused buffer: no fresh [chunk, V] per chunk
            dz = ws.get("dz_gemm", dz.shape[0], gemm_dtype).copy_(dz)
        if d_h is not None:
            # A float32 dz of half-precision inputs (CPU) meets the head in float32: the copy
            # the logit GEMM made, not a rounding of dz.
            W_g = ws.upcast(W, dz.dtype)
            if dz.dtype == h.dtype and index is None:
                torch.mm(dz, W_g, out=d_h[s:e])
            else:
                d_h[rows_ix] = (dz @ W_g).to(h.dtype)
        if d_w is not None:
            accumulate_weight_grad(d_w, dz, h_c, first=s == 0)
        del dz
    ws.close()

    grads = Grads(
        d_h,
        None if d_w is None else d_w.to(W.dtype),
        None if d_b is None else d_b.to(b.dtype),
    )
    return ce_rows, div_rows, grads, row_metrics


def no_metrics(like: Tensor) -> tuple[Tensor, Tensor]:
    """Empty ``(entropy, top1)``: what the autograd functions return without ``metrics``."""
    return like.new_empty(0), torch.empty(0, dtype=torch.bool, device=like.device)


def forms_gradient_in_forward(options: LossOptions, dtype: torch.dtype) -> bool:
    """Whether the upstream gradient will be a scalar, so the gradients can be formed during the
    forward (8 NDV FLOPs in all). Not in float16: its logit gradient, formed for an upstream
    gradient of 1, would flush the softmax tail (~1 / (N V)) to zero before a GradScaler's loss
    scale could lift it; there the backward forms it with the real upstream gradient, as
    autograd over plain logits does (recomputing the logits: 12 NDV FLOPs)."""
    return options.reduction != "none" and dtype != torch.float16


class ChunkedSDFT(torch.autograd.Function):
    """Autograd glue for :func:`chunked_sdft`: ``apply(options, run, *inputs)`` with counted
    :class:`LossInputs` returns ``(loss, ce, kl, entropy, top1)``, the metrics empty without
    ``options.metrics``."""

    @staticmethod
    def forward(ctx, options: LossOptions, run: RunSettings, *tensors):
        inputs = LossInputs(*tensors)
        need = gradients_needed(ctx, run.grad_enabled)
        eager = any(need) and forms_gradient_in_forward(options, inputs.student_hidden.dtype)
        denom = inputs.num_items
        ce_scale = kl_scale = None
        if eager:  # the upstream gradient will be a scalar: form the gradients now.
            ce_scale, kl_scale = row_scales(torch.ones((), dtype=denom.dtype, device=denom.device),
                                            denom, inputs.label_mask, inputs.kl_mask, options)
        ce_rows, div_rows, grads, row_metrics = chunked_sdft(inputs, options, run, ce_scale, kl_scale, need,
                                                             options.metrics)
        loss, ce, kl = combine(ce_term_rows(ce_rows, options), div_rows, denom, options)
        entropy, top1 = row_metrics if row_metrics is not None else no_metrics(ce_rows)
        ctx.options, ctx.run, ctx.need, ctx.eager = options, run, need, eager
        ctx.device_type = inputs.student_hidden.device.type
        if eager:
            ctx.grads = grads
        elif any(need):
            ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(ce, kl, entropy, top1)
        return loss, ce, kl, entropy, top1

    @staticmethod
    @fused_backward
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_entropy, _grad_top1):
        if ctx.eager:
            g = ctx.grads
            if g is None:
                raise RuntimeError(
                    "fused_linear_sdft_loss: a second backward through the same loss (retain_graph=True) is not "
                    "supported by impl='torch'/'triton_chunked' with reduction 'mean' or 'sum': the gradients are "
                    "formed in the forward and handed over, scaled in place, at the first backward. Compute the "
                    "loss again, or use impl='triton' or 'reference'"
                )
            ctx.grads = None
            # The gradients were formed for an upstream gradient of 1 and are ours to scale.
            # grad_loss stays float32 (a loss scale of 65536 overflows float16).
            d_h, d_w, d_b = (None if t is None else t.mul_(grad_loss) for t in g)
        else:
            inputs = LossInputs(*ctx.saved_tensors)
            ce_scale, kl_scale = row_scales(grad_loss, inputs.num_items, inputs.label_mask, inputs.kl_mask,
                                            ctx.options)
            _, _, (d_h, d_w, d_b), _ = chunked_sdft(inputs, ctx.options, ctx.run, ce_scale, kl_scale, ctx.need)
        return None, None, *LossInputs.gradients(d_h, d_w, d_b)  # nothing for options and run
