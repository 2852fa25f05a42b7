"""Autograd glue around the Triton kernels: forward statistics, backward by recomputation."""

from __future__ import annotations

import torch

from .autograd_guard import first_order_only
from .reduction import combine, row_scales


class TritonSDFT(torch.autograd.Function):
    """Forward: one pass over vocab tiles gives per-row statistics; backward recomputes the
    logit tiles from them. Returns ``(loss, ce, kl)`` with ``ce``/``kl`` non-differentiable."""

    @staticmethod
    def forward(ctx, h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom, options, _chunk_size):
        from .triton_forward import sdft_forward  # triton imports lazily: CPU users need not pay

        stats = sdft_forward(h, W, b, ht, Wt, bt, labels, kl_mask, options)
        loss, ce, kl = combine(stats.ce_rows, stats.div_rows, denom, options)
        ctx.options = options
        ctx.need = (ctx.needs_input_grad[0], ctx.needs_input_grad[1], b is not None and ctx.needs_input_grad[2])
        if any(ctx.need):
            ctx.stats = stats
            ctx.save_for_backward(h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom)
        ctx.mark_non_differentiable(ce, kl)
        return loss, ce, kl

    @staticmethod
    @first_order_only
    def backward(ctx, grad_loss, _grad_ce, _grad_kl):
        from .triton_backward import sdft_backward

        h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom = ctx.saved_tensors
        ce_scale, kl_scale = row_scales(grad_loss, denom, label_mask, kl_mask, ctx.options)
        # row_scales works in denom's dtype: float32, or float64 for float64 inputs.
        d_h, d_w, d_b = sdft_backward(
            h, W, b, ht, Wt, bt, labels, ctx.stats, ce_scale.contiguous(), kl_scale.contiguous(),
            ctx.options, *ctx.need,
        )
        ctx.stats = None
        return d_h, d_w, d_b, None, None, None, None, None, None, None, None, None
