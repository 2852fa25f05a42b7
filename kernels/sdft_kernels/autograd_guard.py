"""What the fused ``autograd.Function`` classes share: which gradients to form, and a backward
that is first order only and runs without autocast."""

from __future__ import annotations

import functools

import torch


def gradients_needed(ctx, has_bias: bool, grad_enabled: bool) -> tuple[bool, bool, bool]:
    """Which of (hidden, weight, bias) gradients a forward must prepare for.

    ``grad_enabled`` is the grad mode at the call: under ``torch.no_grad()`` (an evaluation
    step) ``ctx.needs_input_grad`` still follows ``requires_grad``, and no gradient may be
    formed.
    """
    need = ctx.needs_input_grad
    return (grad_enabled and need[0], grad_enabled and need[1], grad_enabled and has_bias and need[2])


def fused_backward(backward):
    """Wrap an ``autograd.Function.backward`` that forms gradients outside autograd.

    ``create_graph=True`` (double backward, e.g. gradient penalties) would otherwise fail far
    from its cause, or silently return gradients that are constants. And a backward called
    inside an autocast region (``loss.backward()`` under ``torch.autocast``) must not re-cast
    the chunk GEMMs: the forward chose every precision already and ran with autocast off, so
    the backward does too (on the device type the forward recorded as ``ctx.device_type``).
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_sdft_loss does not support double backward (create_graph=True); "
                "use impl='reference' for higher-order gradients"
            )
        with torch.autocast(ctx.device_type, enabled=False):
            return backward(ctx, *grads)

    return wrapper
