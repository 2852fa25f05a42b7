"""What a teacher source gives: its final hidden states for a batch and its head
(:class:`TeacherOutput`), the protocol every source follows (:class:`TeacherSource`), and the
two helpers all sources share."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Mapping, Protocol

from torch import Tensor, nn

from .model_head import HeadSpec


@dataclass
class TeacherOutput:
    """Teacher final hidden states ``[B, T, Dt]`` aligned with the batch, and its head."""

    hidden: Tensor
    head: HeadSpec


class TeacherSource(Protocol):
    def __call__(self, batch: Mapping[str, Tensor]) -> TeacherOutput:
        """Teacher states for ``batch``: the same keys the student sees (``input_ids``, and
        ``attention_mask`` / ``position_ids`` and the other :data:`sdft.packing.SEQUENCE_KEYS`
        when present)."""
        ...


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Teacher passes run without dropout; the module's own mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def frozen_head(head: HeadSpec) -> HeadSpec:
    """The same head with detached tensors: the teacher is a constant."""
    bias = None if head.bias is None else head.bias.detach()
    return HeadSpec(head.weight.detach(), bias, head.softcap, head.hidden_scale)
