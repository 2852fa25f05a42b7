"""What the loss returns with ``return_components=True``."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor


class SDFTLossOutput(NamedTuple):
    """Loss plus its parts.

    ``ce`` and ``kl`` are reduced like ``loss`` (scalars, or ``[N]`` for ``reduction="none"``)
    and carry no weights: ``loss = ce_weight * ce + kl_weight * tau**2 * kl``. ``ce``, ``kl``
    and ``n_tokens`` (int64 count of positions whose label is not ignored) are detached.
    """

    loss: Tensor
    ce: Tensor
    kl: Tensor
    n_tokens: Tensor
