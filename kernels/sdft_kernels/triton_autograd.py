"""Autograd glue around the Triton kernels: forward statistics, backward by recomputation."""

from __future__ import annotations

import torch

from .autograd_guard import fused_backward, gradients_needed
from .chunk_loop import no_metrics
from .reduction import ce_term_rows, combine, dft_weights, row_scales


class TritonSDFT(torch.autograd.Function):
    """Forward: one pass over vocab tiles gives per-row statistics; backward recomputes the
    logit tiles from them. Returns ``(loss, ce, kl, entropy, top1)``, all but the loss
    non-differentiable, the metrics empty without ``options.metrics``."""

    @staticmethod
    def forward(ctx, h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom, options, _chunk_size, grad_enabled):
        from .triton_forward import sdft_forward  # triton imports lazily: CPU users need not pay

        stats = sdft_forward(h, W, b, ht, Wt, bt, labels, kl_mask, options)
        loss, ce, kl = combine(ce_term_rows(stats.ce_rows, options), stats.div_rows, denom, options)
        entropy, top1 = (stats.entropy, stats.top1) if options.metrics else no_metrics(stats.ce_rows)
        ctx.options, ctx.device_type = options, h.device.type
        ctx.need = gradients_needed(ctx, b is not None, grad_enabled)
        if any(ctx.need):
            ctx.stats = stats
            ctx.save_for_backward(h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom)
        ctx.mark_non_differentiable(ce, kl, entropy, top1)
        return loss, ce, kl, entropy, top1

    @staticmethod
    @fused_backward
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_entropy, _grad_top1):
        from .triton_backward import sdft_backward

        h, W, b, ht, Wt, bt, labels, label_mask, kl_mask, denom = ctx.saved_tensors
        ce_scale, kl_scale = row_scales(grad_loss, denom, label_mask, kl_mask, ctx.options)
        if ctx.options.loss_type == "dft":  # each row's cross-entropy weighted by its constant exp(-ce)
            ce_scale = ce_scale * dft_weights(ctx.stats.ce_rows)
        # row_scales works in denom's dtype: float32, or float64 for float64 inputs.
        d_h, d_w, d_b = sdft_backward(
            h, W, b, ht, Wt, bt, labels, ctx.stats, ce_scale.contiguous(), kl_scale.contiguous(),
            ctx.options, *ctx.need,
        )
        # ctx.stats ([N] vectors) stays: a retained graph may run this backward again.
        return d_h, d_w, d_b, None, None, None, None, None, None, None, None, None, None
