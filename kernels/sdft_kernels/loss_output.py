"""What the loss returns with ``return_components=True``."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class _Parts(NamedTuple):
    loss: Tensor
    ce: Tensor
    kl: Tensor
    n_tokens: Tensor


class SDFTLossOutput(_Parts):
    """Loss plus its parts: ``(loss, ce, kl, n_tokens)``, and, with ``LossOptions.metrics``, the
    student's per-row metrics as attributes.

    ``ce`` and ``kl`` are reduced like ``loss`` (scalars, or ``[N]`` for ``reduction="none"``)
    and carry no weights: ``loss = ce_weight * ce + kl_weight * tau**2 * kl``. ``ce``, ``kl``
    and ``n_tokens`` (int64 count of positions whose label is not ignored) are detached.

    ``entropy`` ``[N]`` (float32; float64 for float64 inputs): the entropy of the student's
    next-token distribution at temperature 1 (after its logit scale and softcap), in nats;
    ``top1`` ``[N]`` bool: whether the label is the student's top prediction (the first maximal
    logit, as ``argmax`` picks it). Both are computed in the loss's own pass over the logits,
    per row, whatever the reduction, and are 0 / False where the label is ignored: the mean
    entropy and the token accuracy of a batch are ``entropy.sum() / n_tokens`` and
    ``top1.sum() / n_tokens``. None without ``metrics``. Detached.
    """

    entropy: Optional[Tensor] = None  # class defaults: also what copies made by _replace() hold
    top1: Optional[Tensor] = None

    def __new__(cls, loss: Tensor, ce: Tensor, kl: Tensor, n_tokens: Tensor, *,
                entropy: Optional[Tensor] = None, top1: Optional[Tensor] = None):
        self = super().__new__(cls, loss, ce, kl, n_tokens)
        self.entropy, self.top1 = entropy, top1
        return self

    def __repr__(self) -> str:
        extra = "" if self.entropy is None else f", entropy={self.entropy!r}, top1={self.top1!r}"
        parts = f"loss={self.loss!r}, ce={self.ce!r}, kl={self.kl!r}, n_tokens={self.n_tokens!r}"
        return f"{type(self).__name__}({parts}{extra})"
