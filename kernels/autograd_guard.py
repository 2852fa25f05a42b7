"""A clear error for double backward, which the fused paths do not support."""

from __future__ import annotations

import functools

import torch


def first_order_only(backward):
    """Wrap an ``autograd.Function.backward`` that forms gradients outside autograd.

    ``create_graph=True`` (double backward, e.g. gradient penalties) would otherwise fail far
    from its cause, or silently return gradients that are constants.
    """

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "fused_linear_sdft_loss does not support double backward (create_graph=True); "
                "use impl='reference' for higher-order gradients"
            )
        return backward(ctx, *grads)

    return wrapper
