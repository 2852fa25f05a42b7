"""``FusedLinearJSDLoss``: Liger's ``LigerFusedLinearJSDLoss`` (constructor, call and result),
computed by this package's fused kernels.

Where a trainer takes Liger's fused distillation loss, this class takes its place unchanged::

    loss_fn = FusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)
    loss = loss_fn(student_hidden, student_head_weight, teacher_hidden, teacher_head_weight, labels)

Semantics (Liger's, which TRL's ``generalized_jsd_loss`` shares for the soft part), over the
``n`` positions whose label is not ``ignore_index``::

    hard = sum CE(z_s, y) / n                                      # temperature 1
    soft = sum JSD_beta(softmax(z_t / T), softmax(z_s / T)) / n    # no T**2 factor
    loss = weight_hard_loss * hard + weight_soft_loss * soft

with ``beta`` 0 the forward KL(teacher || student), 1 the reverse KL(student || teacher), and in
between ``beta KL(p_t || m) + (1 - beta) KL(p_s || m)``, ``m = beta p_t + (1 - beta) p_s``. In
this package's terms: ``ce_weight = weight_hard_loss``, ``kl_weight = weight_soft_loss / T**2``
(the SDFT loss scales its divergence by ``tau**2``), ``divergence="jsd"``, ``jsd_beta = beta``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Union

from torch import Tensor, nn

from sdft_kernels import LossOptions, SDFTLossOutput, fused_linear_sdft_loss
from sdft_kernels.options import DEFAULT_IMPL, REDUCTIONS, check_impl


_SAME = object()  # forward(): the teacher's softcap is the student's


def _options_of(weight_hard_loss, weight_soft_loss, beta, ignore_index, temperature, reduction) -> LossOptions:
    """:class:`LossOptions` of Liger's settings, each checked and named by Liger's name (LossOptions
    checks ``ignore_index``)."""
    for name, value, low in (("weight_hard_loss", weight_hard_loss, 0.0), ("weight_soft_loss", weight_soft_loss, 0.0),
                             ("temperature", temperature, None)):
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (value < low if low is not None else value <= 0)):
            raise ValueError(f"{name} must be a finite number {'>= 0' if low is not None else '> 0'}, got {value!r}")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be a number in [0, 1], got {beta!r}")
    if reduction not in REDUCTIONS:  # named here: "batchmean" is TRL's name for "mean"
        raise ValueError(f"reduction must be one of {REDUCTIONS} ('mean' is TRL's 'batchmean'), got {reduction!r}")
    # Liger's soft weight carries no T**2; ours does, so it is divided out here.
    return LossOptions(ce_weight=weight_hard_loss, kl_weight=weight_soft_loss / temperature**2, temperature=temperature,
                       divergence="jsd", jsd_beta=beta, ignore_index=ignore_index, reduction=reduction)


class FusedLinearJSDLoss(nn.Module):
    """Drop-in for ``liger_kernel.chunked_loss.LigerFusedLinearJSDLoss`` (see the module docstring).

    Args (Liger's, in Liger's order and with its defaults, except ``chunk_size``):
        weight_hard_loss: weight of the cross-entropy on the labels (temperature 1).
        weight_soft_loss: weight of the divergence between the tempered distributions.
        beta: in [0, 1]; 0 forward KL, 1 reverse KL, else the generalised JSD.
        ignore_index: the label of positions that count for neither term.
        temperature: T > 0 of the divergence.
        compiled: accepted and ignored: the fused kernels need no ``torch.compile``.
        chunk_size: rows per chunk; None (default) picks it from a memory budget. Liger's
            default is 1024.
        return_soft_hard_loss: return ``(loss, soft, hard)``, the unweighted means, detached.
        reduction: ``"mean"`` (default, Liger's: the sums over the counted positions divided by
            their number, TRL's ``"batchmean"``), ``"sum"``, or ``"none"``: ``[N]`` per-position
            values, 0 where the label is ignored. TRL's ``generalized_jsd_loss(reduction="none")``
            returns the divergence per position and vocabulary entry, ``[n_counted, V]``, which a
            fused loss never forms; its sum over the vocabulary is this ``"none"`` at the counted
            positions.
        impl: the kernel (:func:`sdft_kernels.fused_linear_sdft_loss`); ``"auto"`` per device.

    Unlike Liger, the student's and teacher's vocabularies must have the same size (Liger pads
    the student's logits with zeros when the teacher's head is larger).
    """

    def __init__(
        self,
        weight_hard_loss: float = 0.5,
        weight_soft_loss: float = 0.5,
        beta: float = 0.5,
        ignore_index: int = -100,
        temperature: float = 1.0,
        compiled: bool = True,
        chunk_size: Optional[int] = None,
        return_soft_hard_loss: bool = False,
        *,
        reduction: str = "mean",
        impl: str = DEFAULT_IMPL,
    ) -> None:
        super().__init__()
        self.weight_hard_loss, self.weight_soft_loss = weight_hard_loss, weight_soft_loss
        self.beta, self.ignore_index, self.temperature = beta, ignore_index, temperature
        self.compiled, self.chunk_size, self.return_soft_hard_loss = compiled, chunk_size, return_soft_hard_loss
        self.impl = check_impl(impl)
        self.reduction = reduction
        self._built_for: Optional[tuple] = None
        self._current_options()  # validates every setting now, not at the first batch

    @property
    def options(self) -> LossOptions:
        """The loss in this package's terms, from the settings as they are now: as in Liger,
        whose forward reads its attributes, a setting reassigned after construction (a schedule
        of ``weight_soft_loss``, say) takes effect at the next call."""
        return self._current_options()

    def _current_options(self) -> LossOptions:
        """:attr:`options`, rebuilt (and checked) when a setting changed since the last call;
        the options for other heads, cached below it, are dropped with it."""
        settings = (self.weight_hard_loss, self.weight_soft_loss, self.beta, self.ignore_index, self.temperature,
                    self.reduction)
        if settings != self._built_for:
            self._built = _options_of(*settings)
            self._with_transforms: dict[tuple, LossOptions] = {}
            self._built_for = settings
        return self._built

    def forward(
        self,
        student_input: Tensor,
        student_weight: Tensor,
        teacher_input: Tensor,
        teacher_weight: Tensor,
        true_labels: Tensor,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        *,
        num_items: Union[None, int, float, Tensor] = None,
        softcap: Optional[float] = None,
        teacher_softcap=_SAME,
        student_logit_scale: float = 1.0,
        teacher_logit_scale: float = 1.0,
    ) -> Union[Tensor, tuple[Tensor, Tensor, Tensor]]:
        """Liger's call: ``student_input`` ``[N, D]``, ``student_weight`` ``[V, D]``,
        ``teacher_input`` ``[N, Dt]``, ``teacher_weight`` ``[V, Dt]``, ``true_labels`` ``[N]``
        int64, optional ``[V]`` biases. Beyond Liger: ``num_items`` divides the sums in place of
        the local label count (the count of a whole accumulated batch); ``softcap`` is the
        student head's logit softcap (Gemma 2) and, unless ``teacher_softcap`` gives the
        teacher's own (None: none), the teacher's; ``student_logit_scale`` /
        ``teacher_logit_scale`` multiply each model's logits before its softcap, as TRL's
        ``DistillationTrainer`` applies them.

        Returns the loss (a float32 scalar; float64 for float64 inputs; ``[N]`` for
        ``reduction="none"``), or ``(loss, soft, hard)`` with ``return_soft_hard_loss``, reduced
        alike. The teacher gets no gradient.
        """
        out = self.output(student_input, student_weight, teacher_input, teacher_weight, true_labels, student_bias,
                          teacher_bias, num_items=num_items, softcap=softcap, teacher_softcap=teacher_softcap,
                          student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale)
        if self.return_soft_hard_loss:
            return out.loss, out.kl, out.ce
        return out.loss

    def output(self, student_input: Tensor, student_weight: Tensor, teacher_input: Tensor, teacher_weight: Tensor,
               true_labels: Tensor, student_bias: Optional[Tensor] = None, teacher_bias: Optional[Tensor] = None, *,
               num_items: Union[None, int, float, Tensor] = None, softcap: Optional[float] = None,
               teacher_softcap=_SAME, student_logit_scale: float = 1.0, teacher_logit_scale: float = 1.0,
               metrics: bool = False) -> SDFTLossOutput:
        """:meth:`forward`'s computation as the whole :class:`sdft_kernels.SDFTLossOutput`: ``ce``
        is the hard loss, ``kl`` the soft one (both unweighted), and with ``metrics`` the
        student's per-row ``entropy`` (temperature 1) and ``top1`` from the same pass."""
        if num_items is not None and self.reduction != "mean":
            raise ValueError(f"num_items={num_items!r} is the divisor of reduction='mean'; this loss has "
                             f"reduction={self.reduction!r}")
        teacher_softcap = softcap if teacher_softcap is _SAME else teacher_softcap
        options = self._options_for(softcap, teacher_softcap, student_logit_scale, teacher_logit_scale, metrics)
        return fused_linear_sdft_loss(student_input, student_weight, true_labels, teacher_input, teacher_weight,
                                      student_bias=student_bias, teacher_bias=teacher_bias, num_items=num_items,
                                      options=options, impl=self.impl, chunk_size=self.chunk_size,
                                      return_components=True)

    def _options_for(self, softcap: Optional[float], teacher_softcap: Optional[float], student_logit_scale: float,
                     teacher_logit_scale: float, metrics: bool) -> LossOptions:
        key = (softcap, teacher_softcap, student_logit_scale, teacher_logit_scale, metrics)
        options = self.options  # first: settings reassigned since the last call empty the cache below
        if key == (None, None, 1.0, 1.0, False):
            return options
        if key not in self._with_transforms:  # built (and validated) once per pair of heads
            heads = options.with_heads(softcap=softcap, teacher_softcap=teacher_softcap,
                                       student_logit_scale=student_logit_scale,
                                       teacher_logit_scale=teacher_logit_scale)
            self._with_transforms[key] = dataclasses.replace(heads, metrics=metrics)
        return self._with_transforms[key]

    def extra_repr(self) -> str:
        return (f"weight_hard_loss={self.weight_hard_loss}, weight_soft_loss={self.weight_soft_loss}, "
                f"beta={self.beta}, temperature={self.temperature}, ignore_index={self.ignore_index}, "
                f"reduction={self.reduction!r}, impl={self.impl!r}")
