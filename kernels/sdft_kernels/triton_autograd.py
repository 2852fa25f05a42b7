"""Autograd glue around the Triton kernels: forward statistics, backward by recomputation."""

from __future__ import annotations

import torch

from .autograd_guard import fused_backward, gradients_needed
from .chunk_loop import no_metrics
from .loss_inputs import LossInputs
from .options import LossOptions, RunSettings
from .reduction import ce_term_rows, combine, dft_weights, row_scales


class TritonSDFT(torch.autograd.Function):
    """Forward: one pass over vocab tiles gives per-row statistics; backward recomputes the
    logit tiles from them. ``apply(options, run, *inputs)`` with counted :class:`LossInputs`
    returns ``(loss, ce, kl, entropy, top1)``, all but the loss non-differentiable, the metrics
    empty without ``options.metrics``."""

    @staticmethod
    def forward(ctx, options: LossOptions, run: RunSettings, *tensors):
        from .triton_forward import sdft_forward  # triton imports lazily: CPU users need not pay

        inputs = LossInputs(*tensors)
        h, W, b, ht, Wt, bt = _heads(inputs)
        stats = sdft_forward(h, W, b, ht, Wt, bt, inputs.labels, inputs.kl_mask, options)
        loss, ce, kl = combine(ce_term_rows(stats.ce_rows, options), stats.div_rows, inputs.num_items, options)
        entropy, top1 = (stats.entropy, stats.top1) if options.metrics else no_metrics(stats.ce_rows)
        ctx.options, ctx.device_type = options, h.device.type
        ctx.need = gradients_needed(ctx, run.grad_enabled)
        if any(ctx.need):
            ctx.stats = stats
            ctx.save_for_backward(*inputs)
        ctx.mark_non_differentiable(ce, kl, entropy, top1)
        return loss, ce, kl, entropy, top1

    @staticmethod
    @fused_backward
    def backward(ctx, grad_loss, _grad_ce, _grad_kl, _grad_entropy, _grad_top1):
        from .triton_backward import sdft_backward

        inputs = LossInputs(*ctx.saved_tensors)
        ce_scale, kl_scale = row_scales(grad_loss, inputs.num_items, inputs.label_mask, inputs.kl_mask, ctx.options)
        if ctx.options.loss_type == "dft":  # each row's cross-entropy weighted by its constant exp(-ce)
            ce_scale = ce_scale * dft_weights(ctx.stats.ce_rows)
        # row_scales works in the divisor's dtype: float32, or float64 for float64 inputs.
        d_h, d_w, d_b = sdft_backward(
            *_heads(inputs), inputs.labels, ctx.stats, ce_scale.contiguous(), kl_scale.contiguous(),
            ctx.options, *ctx.need,
        )
        # ctx.stats ([N] vectors) stays: a retained graph may run this backward again.
        return None, None, *LossInputs.gradients(d_h, d_w, d_b)  # nothing for options and run


def _heads(inputs: LossInputs) -> tuple:
    """``(h, W, b, ht, Wt, bt)``, in the order the Triton launchers take them."""
    return (inputs.student_hidden, inputs.student_weight, inputs.student_bias,
            inputs.teacher_hidden, inputs.teacher_weight, inputs.teacher_bias)
