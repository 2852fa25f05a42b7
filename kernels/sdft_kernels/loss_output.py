"""What the loss returns with ``return_components=True``, and what :func:`sdft.causal_lm_loss` returns."""

from __future__ import annotations

from typing import NamedTuple, Optional

from torch import Tensor


class SDFTLossOutput(NamedTuple):
    """Loss plus its parts: ``loss``, ``ce``, ``kl``, ``n_tokens``, then the optional fields
    ``entropy``, ``top1`` (with ``LossOptions.metrics``) and ``aux``, ``aux_loss`` (an MoE
    model's load-balancing term, from :func:`sdft.causal_lm_loss`), None when not computed.

    Every part is a field, so a wrapper that rebuilds the tuple field by field (accelerate's
    mixed-precision wrapper, DDP, FSDP: ``type(out)(*fields)``), ``_replace`` and pickling
    keep them all. Read them by name: the tuple has eight fields, not four.

    ``ce`` and ``kl`` are reduced like ``loss`` (scalars, or ``[N]`` for ``reduction="none"``)
    and carry no weights: ``loss = ce_weight * ce + kl_weight * tau**2 * kl`` (``+ aux``).
    ``ce``, ``kl`` and ``n_tokens`` (int64 count of positions whose label is not ignored) are
    detached.

    ``entropy`` ``[N]`` (float32; float64 for float64 inputs): the entropy of the student's
    next-token distribution at temperature 1 (after its logit scale and softcap), in nats;
    ``top1`` ``[N]`` bool: whether the label is the student's top prediction (the first maximal
    logit, as ``argmax`` picks it). Both are computed in the loss's own pass over the logits,
    per row, whatever the reduction, and are 0 / False where the label is ignored: the mean
    entropy and the token accuracy of a batch are ``entropy.sum() / n_tokens`` and
    ``top1.sum() / n_tokens``. Detached.

    ``aux``: the MoE load-balancing term that :func:`sdft.causal_lm_loss` added to ``loss`` (with
    the model's coefficient, as the model's own forward adds it); ``aux_loss``: the unweighted
    load-balancing loss, what the model's own output calls ``aux_loss``. Detached scalars.
    """

    loss: Tensor
    ce: Tensor
    kl: Tensor
    n_tokens: Tensor
    entropy: Optional[Tensor] = None
    top1: Optional[Tensor] = None
    aux: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
