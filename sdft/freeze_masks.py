"""Applying a freezing plan: whole tensors lose ``requires_grad``, partially frozen ones get a
gradient hook, and :func:`masked_optimizer` keeps their frozen entries bit-identical under
AdamW's decoupled weight decay and momentum, which a zero gradient alone does not."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor, nn

from .freeze_spec import ModelIndex, Plan

if TYPE_CHECKING:
    from .freeze_report import FreezeReport


@dataclass(eq=False)
class FrozenEntries:
    """The frozen entries of one partially frozen parameter.

    Stored as ``rows`` (int64 ``[R]``, indices along dim 0) when the frozen set is whole rows,
    which is much smaller than a mask for embedding rows, else as ``mask`` (bool, the
    parameter's shape). ``count`` is the number of frozen elements.
    """

    name: str
    parameter: nn.Parameter = field(repr=False)
    rows: Optional[Tensor]
    mask: Optional[Tensor]
    count: int
    _by_device: dict = field(default_factory=dict, init=False, repr=False)

    @classmethod
    def from_mask(cls, name: str, parameter: nn.Parameter, mask: Tensor) -> "FrozenEntries":
        """Compress a bool mask (True = frozen) to row indices where it selects whole rows."""
        rows_any = mask.reshape(mask.shape[0], -1).any(1)
        rows_all = mask.reshape(mask.shape[0], -1).all(1)
        count = int(mask.sum())
        if torch.equal(rows_any, rows_all):
            return cls(name, parameter, rows_any.nonzero().flatten(), None, count)
        return cls(name, parameter, None, mask, count)

    def as_mask(self) -> Tensor:
        """The frozen entries as a bool tensor of the parameter's shape (True = frozen)."""
        if self.mask is not None:
            return self.mask
        mask = torch.zeros(self.parameter.shape, dtype=torch.bool, device=self.rows.device)
        mask[self.rows] = True
        return mask

    def _index(self, device: torch.device) -> Tensor:
        # Cached per device: the model may move after freeze(), and a hook runs every backward.
        index = self._by_device.get(device)
        if index is None:
            index = (self.rows if self.rows is not None else self.mask).to(device)
            self._by_device[device] = index
        return index

    def zeroed(self, tensor: Tensor) -> Tensor:
        """``tensor`` with the frozen entries set to 0 (out of place; used on gradients)."""
        index = self._index(tensor.device)
        if self.rows is not None:
            return tensor.index_fill(0, index, 0)
        return tensor.masked_fill(index, 0)

    def zero_(self, tensor: Tensor) -> None:
        """Set the frozen entries of ``tensor`` to 0 in place (used on optimizer state)."""
        index = self._index(tensor.device)
        if self.rows is not None:
            tensor.index_fill_(0, index, 0)
        else:
            tensor.masked_fill_(index, 0)

    def take(self, tensor: Tensor) -> Tensor:
        """A copy of only the frozen entries of ``tensor``: ``[R, ...]`` rows or ``[count]``."""
        index = self._index(tensor.device)
        if self.rows is not None:
            return tensor.index_select(0, index)
        return tensor[index]

    def put_(self, tensor: Tensor, values: Tensor) -> None:
        """Write ``values`` (from ``take``) back into the frozen entries of ``tensor``."""
        index = self._index(tensor.device)
        if self.rows is not None:
            tensor.index_copy_(0, index, values)
        else:
            tensor.masked_scatter_(index, values)


def apply_plan(index: ModelIndex, plan: Plan) -> list[FrozenEntries]:
    """Set ``requires_grad=False`` on whole tensors; hook gradients of partially frozen ones."""
    partial = []
    for name, mask in plan.items():
        param = index.params[name]
        if mask is None:
            param.requires_grad_(False)
            continue
        entries = FrozenEntries.from_mask(name, param, mask)
        # A tensor hook sees each micro-batch's gradient before accumulation into .grad, so
        # accumulated gradients stay zero at the frozen entries too.
        param.register_hook(entries.zeroed)
        partial.append(entries)
    return partial



def masked_optimizer(optimizer: torch.optim.Optimizer,
                     report: FreezeReport) -> torch.optim.Optimizer:
    """Make ``optimizer`` respect the partial masks of ``report``; returns the same optimizer.

    Registers a step post-hook (so schedulers, GradScaler, accelerate keep working on the real
    optimizer object). After every ``step()`` it writes back the frozen entries of each
    partially frozen parameter the optimizer holds, bit-identical to their values now, and
    zeroes those entries in every optimizer state tensor of the parameter's shape (exp_avg,
    exp_avg_sq, momentum_buffer, ...). Only the frozen entries are copied, not whole tensors.
    Whole-tensor freezes need no help: they have ``requires_grad=False`` and no gradient.
    Call it after moving the model to its device and before the first step.
    """
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    guarded = [(entries, entries.take(entries.parameter.detach()))
               for entries in report.partial if id(entries.parameter) in held]

    def restore_frozen_entries(opt: torch.optim.Optimizer, args, kwargs) -> None:
        with torch.no_grad():
            for entries, values in guarded:
                entries.put_(entries.parameter, values)
                for state in opt.state.get(entries.parameter, {}).values():
                    if torch.is_tensor(state) and state.shape == entries.parameter.shape:
                        entries.zero_(state)

    optimizer.register_step_post_hook(restore_frozen_entries)
    return optimizer
