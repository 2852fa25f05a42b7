"""``SDFTLoss``: the loss settings as a module, with the paper's defaults."""

from __future__ import annotations

from typing import Optional, Union

from torch import Tensor, nn

from sdft_kernels import LossOptions, SDFTLossOutput, fused_linear_sdft_loss
from sdft_kernels.options import IMPLS

KL_POSITIONS = ("labels", "all")


class SDFTLoss(nn.Module):
    """Cross-entropy + ``kl_weight * tau**2 * D(teacher, student)`` on a fused LM head.

    Defaults are the paper's: lambda (``kl_weight``) 1, tau 0.5, forward KL (teacher || student).
    ``kl_positions`` says where the divergence applies when the caller gives no ``kl_mask``:
    ``"labels"`` (the supervised positions, default) or ``"all"`` (every non-pad position,
    which the model integration supplies). Being a module lets distributed wrappers see it.
    """

    def __init__(
        self,
        ce_weight: float = 1.0,
        kl_weight: float = 1.0,
        temperature: float = 0.5,
        divergence: str = "forward_kl",
        jsd_beta: float = 0.5,
        ignore_index: int = -100,
        reduction: str = "mean",
        impl: str = "auto",
        kl_positions: str = "labels",
        chunk_size: Optional[int] = None,
        validate_labels: bool = True,
    ) -> None:
        super().__init__()
        # Validates every setting now, not at the first batch.
        self.options = LossOptions(ce_weight=ce_weight, kl_weight=kl_weight, temperature=temperature,
                                   divergence=divergence, jsd_beta=jsd_beta, ignore_index=ignore_index,
                                   reduction=reduction)
        if kl_positions not in KL_POSITIONS:
            raise ValueError(f"kl_positions must be one of {KL_POSITIONS}, got {kl_positions!r}")
        if impl not in IMPLS:
            raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
        self.impl, self.kl_positions, self.chunk_size = impl, kl_positions, chunk_size
        self.validate_labels = validate_labels

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
        softcap: Optional[float] = None,
    ) -> SDFTLossOutput:
        """Shapes as :func:`sdft_kernels.fused_linear_sdft_loss`; returns loss, ce, kl, n_tokens."""
        o = self.options
        return fused_linear_sdft_loss(
            student_hidden, student_weight, labels, teacher_hidden, teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, ce_weight=o.ce_weight, kl_weight=o.kl_weight,
            temperature=o.temperature, divergence=o.divergence, jsd_beta=o.jsd_beta, ignore_index=o.ignore_index,
            kl_mask=kl_mask, reduction=o.reduction, num_items=num_items, softcap=softcap, impl=self.impl,
            return_components=True, validate_labels=self.validate_labels, chunk_size=self.chunk_size,
        )

    def extra_repr(self) -> str:
        o = self.options
        return (f"ce_weight={o.ce_weight}, kl_weight={o.kl_weight}, temperature={o.temperature}, "
                f"divergence={o.divergence!r}, kl_positions={self.kl_positions!r}, impl={self.impl!r}")
