"""``SDFTLoss``: the loss settings as a module, with the paper's defaults."""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Union

from torch import Tensor, nn

from sdft_kernels import LossOptions, SDFTLossOutput, fused_linear_sdft_loss
from sdft_kernels.options import DEFAULT_IMPL, OWN, check_chunk_size, check_impl

if TYPE_CHECKING:
    from .config import LossConfig

KL_POSITIONS = ("labels", "all")
DEFAULT_KL_POSITIONS = "labels"
_FROM_OPTIONS = OWN  # forward(): no softcap given, use the options' own


def check_kl_positions(kl_positions: str) -> str:
    """``kl_positions`` if valid; the one place this is checked."""
    if kl_positions not in KL_POSITIONS:
        raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {kl_positions!r}")
    return kl_positions


class SDFTLoss(nn.Module):
    """Cross-entropy + ``kl_weight * tau**2 * D(teacher, student)`` on a fused LM head.

    The settings are one :class:`sdft_kernels.LossOptions`, given whole or as its keywords
    (``SDFTLoss(kl_weight=0.5)``); the defaults are the paper's: lambda (``kl_weight``) 1,
    tau 0.5, forward KL (teacher || student). Options reassigned between steps
    (``loss.options = dataclasses.replace(loss.options, kl_weight=w)``) take effect at the
    next call. ``kl_positions`` says where the divergence
    applies when the caller gives no ``kl_mask``: ``"labels"`` (the supervised positions) or
    ``"all"`` (every non-pad position, which the model integration supplies). ``impl`` and
    ``chunk_size`` pick the implementation (:func:`sdft_kernels.fused_linear_sdft_loss`).
    Being a module lets distributed wrappers see it.
    """

    def __init__(
        self,
        options: Optional[LossOptions] = None,
        *,
        impl: str = DEFAULT_IMPL,
        kl_positions: str = DEFAULT_KL_POSITIONS,
        chunk_size: Optional[int] = None,
        **settings,
    ) -> None:
        super().__init__()
        if options is not None and settings:
            raise TypeError(f"SDFTLoss takes options or their keywords, not both (got {sorted(settings)})")
        # Validates every setting now, not at the first batch.
        self.options = options if options is not None else LossOptions(**settings)
        self.impl, self.kl_positions = check_impl(impl), check_kl_positions(kl_positions)
        self.chunk_size = check_chunk_size(chunk_size)
        self._with_softcap: dict[tuple, LossOptions] = {}
        self._with_softcap_of = self.options

    @classmethod
    def from_config(cls, config: "LossConfig") -> "SDFTLoss":
        """The loss of a ``loss:`` section of ``sdft train`` (:class:`sdft.config.LossConfig`):
        its :class:`~sdft_kernels.LossOptions` fields, ``impl``, ``kl_positions`` and
        ``chunk_size``, each where this module keeps it."""
        return cls(config.options(), impl=config.impl, kl_positions=config.kl_positions,
                   chunk_size=config.chunk_size)

    def forward(
        self,
        student_hidden: Tensor,
        student_weight: Tensor,
        labels: Tensor,
        teacher_hidden: Optional[Tensor] = None,
        teacher_weight: Optional[Tensor] = None,
        *,
        student_bias: Optional[Tensor] = None,
        teacher_bias: Optional[Tensor] = None,
        kl_mask: Optional[Tensor] = None,
        num_items: Union[None, int, float, Tensor] = None,
        softcap=_FROM_OPTIONS,
        teacher_softcap=_FROM_OPTIONS,
    ) -> SDFTLossOutput:
        """Shapes as :func:`sdft_kernels.fused_linear_sdft_loss`; returns loss, ce, kl, n_tokens.

        ``softcap``: the model head's logit softcap (None: it has none), as
        :func:`sdft.causal_lm_loss` passes it; ``teacher_softcap``: the teacher head's, if it
        differs (default: ``softcap``'s). A loss configured with a softcap of its own refuses a
        head that applies another.
        """
        return fused_linear_sdft_loss(
            student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, kl_mask=kl_mask, num_items=num_items,
            options=self._options_for(softcap, teacher_softcap), impl=self.impl, chunk_size=self.chunk_size,
            return_components=True,
        )

    def _options_for(self, softcap, teacher_softcap) -> LossOptions:
        if self._with_softcap_of is not self.options:  # options reassigned (a kl_weight schedule, say)
            self._with_softcap, self._with_softcap_of = {}, self.options
        key = (softcap, teacher_softcap)
        if key not in self._with_softcap:  # built (and validated) once per pair of heads
            self._with_softcap[key] = self.options.with_heads(softcap=softcap, teacher_softcap=teacher_softcap)
        return self._with_softcap[key]

    def extra_repr(self) -> str:
        o = self.options
        return (f"ce_weight={o.ce_weight}, kl_weight={o.kl_weight}, temperature={o.temperature}, "
                f"divergence={o.divergence!r}, kl_positions={self.kl_positions!r}, impl={self.impl!r}")
