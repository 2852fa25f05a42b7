"""The GEMM floor: the matrix products any implementation of the loss must run.

With ``N`` tokens, hidden ``D`` and vocabulary ``V`` one ``[N, D] x [D, V]`` product costs
``2 N D V`` FLOPs. The floor of each group, timed with plain ``torch.matmul`` at the same
shapes and dtype into preallocated outputs (so it pays for no allocation):

=============  ===========================================================  ==========
group          GEMMs                                                        FLOPs
=============  ===========================================================  ==========
fwd_bwd        student logits h W^T, teacher logits ht Wt^T,                ``8 N D V``
               grad of hidden dz W, grad of weight dz^T h
fwd            student logits, teacher logits                               ``4 N D V``
ce_fwd_bwd     student logits, grad of hidden, grad of weight               ``6 N D V``
=============  ===========================================================  ==========

The floor counts all ``N`` rows. An implementation that skips rows whose label is ignored
(ours on CPU does) runs fewer FLOPs than this count and can come in under the floor; the
FLOP rates reported for every contender use the same nominal count, so they are comparable.
"""

from __future__ import annotations

from typing import Callable

import torch

from .inputs import Inputs
from .shapes import CE_FWD_BWD, FWD, FWD_BWD

GEMMS_PER_GROUP = {FWD_BWD: 4, FWD: 2, CE_FWD_BWD: 3}


def group_flops(group: str, N: int, D: int, V: int) -> int:
    """Nominal FLOPs of one call of ``group``: ``2 N D V`` per GEMM (8, 4 or 6 NDV)."""
    return GEMMS_PER_GROUP[group] * 2 * N * D * V


def floor_step(inputs: Inputs, group: str) -> Callable[[], None]:
    """A callable running the floor GEMMs of ``group`` once.

    The student logits buffer doubles as the logit gradient ``dz``: its values do not change
    the cost of a dense GEMM, and one [N, V] buffer fewer keeps the floor's memory small.
    """
    h, W = inputs.hidden.detach(), inputs.weight.detach()
    N, V = h.shape[0], W.shape[0]
    z = torch.empty(N, V, dtype=h.dtype, device=h.device)
    teacher = group in (FWD_BWD, FWD)
    if teacher:
        ht, Wt = inputs.teacher_hidden, inputs.teacher_weight
        zt = torch.empty_like(z)
    backward = group in (FWD_BWD, CE_FWD_BWD)
    if backward:
        dh, dW = torch.empty_like(h), torch.empty_like(W)

    def step() -> None:
        torch.matmul(h, W.t(), out=z)
        if teacher:
            torch.matmul(ht, Wt.t(), out=zt)
        if backward:
            torch.matmul(z, W, out=dh)
            torch.matmul(z.t(), h, out=dW)

    return step
