"""The SDFT loss on a transformers causal LM, computed from hidden states: the LM head never runs.

``causal_lm_loss`` is the function; ``SDFTModel`` wraps student, teacher and loss into one module
whose ``forward`` returns the loss, so that DDP, FSDP or accelerate can wrap the whole step.
"""

from __future__ import annotations

from typing import Mapping, Optional, Union

import torch
from torch import Tensor, nn

from sdft_kernels import SDFTLossOutput

from .loss import SDFTLoss
from .model_head import final_hidden_states, head_spec
from .teacher import TeacherSource

def shifted_targets(batch: Mapping[str, Tensor], ignore_index: int = -100) -> tuple[Tensor, Optional[Tensor]]:
    """Next-token labels ``[B, T-1]`` and the non-pad target mask ``[B, T-1]`` (or None).

    Labels default to the input ids. Padding positions are ignored even if the collator left
    a real id in ``labels``.
    """
    input_ids = batch["input_ids"]
    labels = batch.get("labels")
    labels = (input_ids if labels is None else labels)[:, 1:].clone()
    mask = batch.get("attention_mask")
    target_mask = None
    if mask is not None:
        target_mask = mask[:, 1:].bool()
        labels.masked_fill_(~target_mask, ignore_index)
    return labels, target_mask


def causal_lm_loss(
    model: nn.Module,
    batch: Mapping[str, Tensor],
    teacher: Optional[TeacherSource] = None,
    loss: Optional[SDFTLoss] = None,
    num_items_in_batch: Union[None, int, Tensor] = None,
) -> SDFTLossOutput:
    """SDFT loss of ``model`` on ``batch`` (``input_ids`` ``[B, T]``, optional ``attention_mask``
    and ``labels`` with -100 on prompt tokens), against ``teacher`` (None: plain CE).

    Runs the decoder for final hidden states, shifts labels, masks padding, and calls the fused
    loss with the output embedding and the architecture's logit transforms (softcap, scale).
    ``num_items_in_batch`` is the normaliser of the mean over a whole accumulated batch, as the
    HF Trainer passes it. Returns ``(loss, ce, kl, n_tokens)``.
    """
    loss = SDFTLoss() if loss is None else loss
    ignore = loss.options.ignore_index
    hidden = final_hidden_states(model, batch["input_ids"], batch.get("attention_mask"))
    head = head_spec(model)
    labels, target_mask = shifted_targets(batch, ignore)

    kl_mask = None
    if loss.kl_positions == "all":
        kl_mask = torch.ones_like(labels, dtype=torch.bool) if target_mask is None else target_mask

    teacher_hidden = teacher_weight = teacher_bias = None
    if teacher is not None:
        out = teacher(batch)
        if out.head.softcap != head.softcap:
            raise ValueError(f"teacher softcap {out.head.softcap} != student softcap {head.softcap}")
        teacher_hidden = _flatten(out.hidden, out.head.hidden_scale)
        teacher_weight, teacher_bias = out.head.weight, out.head.bias

    return loss(
        _flatten(hidden, head.hidden_scale), head.weight, labels.reshape(-1), teacher_hidden, teacher_weight,
        student_bias=head.bias, teacher_bias=teacher_bias,
        kl_mask=None if kl_mask is None else kl_mask.reshape(-1),
        num_items=num_items_in_batch, softcap=head.softcap,
    )


def _flatten(hidden: Tensor, scale: float) -> Tensor:
    """``[B, T, D]`` states predicting positions 1..T-1 as ``[B * (T-1), D]``."""
    flat = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    return flat if scale == 1.0 else flat * scale


class SDFTModel(nn.Module):
    """Student + teacher + loss as one module: ``forward(**batch)`` returns the loss output.

    The student is a registered submodule (so wrappers see and synchronise its parameters);
    the teacher is deliberately not, so it is neither trained, saved nor broadcast.
    """

    def __init__(self, student: nn.Module, teacher: Optional[TeacherSource] = None, loss: Optional[SDFTLoss] = None):
        super().__init__()
        self.student = student
        self.loss = SDFTLoss() if loss is None else loss
        self.__dict__["teacher"] = teacher  # plain attribute on purpose: not a submodule

    def forward(self, num_items_in_batch: Union[None, int, Tensor] = None, **batch: Tensor) -> SDFTLossOutput:
        return causal_lm_loss(self.student, batch, self.teacher, self.loss, num_items_in_batch)
