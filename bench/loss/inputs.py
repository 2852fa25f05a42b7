"""Seeded benchmark problems at realistic scales, and the objective every contender computes.

Objective: ``CE + LAMBDA * TAU**2 * KL(teacher || student)`` at temperature ``TAU``, mean over
the labelled positions, with ``IGNORE_FRACTION`` of the labels set to ``IGNORE_INDEX``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

LAMBDA = 1.0           # kl_weight, the paper's lambda
TAU = 0.5              # temperature of the KL term
IGNORE_FRACTION = 0.2  # share of positions whose label is ignored (prompt tokens, padding)
IGNORE_INDEX = -100
TEACHER_NOISE = 0.1    # relative perturbation of the teacher: a snapshot a few steps away
SEED = 1234


@dataclass
class Inputs:
    """One problem. ``hidden``/``weight`` are leaves that require grad in backward groups.

    hidden ``[N, D]``, weight ``[V, D]``, labels ``[N]`` int64, teacher_hidden ``[N, D]`` and
    teacher_weight ``[V, D]`` (None in the CE-only group), all on one device in one dtype.
    """

    hidden: Tensor
    weight: Tensor
    labels: Tensor
    teacher_hidden: Optional[Tensor]
    teacher_weight: Optional[Tensor]

    def zero_grads(self) -> None:
        self.hidden.grad = None
        self.weight.grad = None

    @property
    def n_labelled(self) -> int:
        return int((self.labels != IGNORE_INDEX).sum())


def build_inputs(N: int, D: int, V: int, *, device: str, dtype: torch.dtype,
                 teacher: bool, requires_grad: bool, seed: int = SEED) -> Inputs:
    """hidden ~ N(0, 1), weight ~ N(0, 1/D) (so student logits are ~N(0, 1)); the teacher is
    the student plus ``TEACHER_NOISE`` times independent noise of the same scale, as after a
    few fine-tuning steps. Values are drawn in float32 on ``device`` and then cast, so that
    every dtype sees the same problem; the seed fixes everything, including the labels."""
    g = torch.Generator(device=device).manual_seed(seed)

    def randn(*size, scale=1.0):
        return torch.randn(*size, generator=g, device=device, dtype=torch.float32).mul_(scale)

    hidden = randn(N, D)
    weight = randn(V, D, scale=D ** -0.5)
    labels = torch.randint(0, V, (N,), generator=g, device=device)
    n_ignored = round(IGNORE_FRACTION * N)
    labels[torch.randperm(N, generator=g, device=device)[:n_ignored]] = IGNORE_INDEX
    teacher_hidden = teacher_weight = None
    if teacher:
        teacher_hidden = hidden + randn(N, D, scale=TEACHER_NOISE)
        teacher_weight = weight + randn(V, D, scale=TEACHER_NOISE * D ** -0.5)
        teacher_hidden, teacher_weight = teacher_hidden.to(dtype), teacher_weight.to(dtype)
    return Inputs(
        hidden.to(dtype).requires_grad_(requires_grad),
        weight.to(dtype).requires_grad_(requires_grad),
        labels, teacher_hidden, teacher_weight,
    )
