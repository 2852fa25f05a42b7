"""What the fused ``autograd.Function`` classes share: which gradients to form, and a backward
that is first order only and runs without autocast."""

from __future__ import annotations

import functools

import torch

from .loss_inputs import LossInputs


def gradients_needed(ctx, grad_enabled: bool) -> tuple[bool, bool, bool]:
    """Which of the student's (hidden, weight, bias) gradients a forward must prepare for; the
    :class:`LossInputs` are the last arguments of its ``apply``.

    ``grad_enabled`` is the grad mode at the call: under ``torch.no_grad()`` (an evaluation
    step) ``ctx.needs_input_grad`` still follows ``requires_grad``, and no gradient may be
    formed. An absent bias needs none.
    """
    need = LossInputs(*ctx.needs_input_grad[-len(LossInputs._fields):])
    return (grad_enabled and need.student_hidden, grad_enabled and need.student_weight,
            grad_enabled and need.student_bias)


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
