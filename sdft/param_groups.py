"""Optimizer parameter groups: which trainable tensors get weight decay.

One rule, used by :func:`param_groups` (for an optimizer of your own) and by
:func:`sdft.trainer.build_trainer`'s AdamW: tensors with two or more dimensions (matrices,
embeddings) decay, 1-D ones (biases, norm scales) do not, as in nanoGPT. Frozen tensors
(``requires_grad=False``) are left out, so the optimizer allocates no state for them.
"""

from __future__ import annotations

from typing import Sequence

from torch import nn


def decays(shape: Sequence[int]) -> bool:
    """Whether a tensor of ``shape`` gets weight decay (two or more dimensions)."""
    return len(shape) >= 2


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Parameter groups of ``model``'s trainable parameters: ``weight_decay`` for those that
    :func:`decays`, none for the rest; empty groups are dropped."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    return _groups([p for p in trainable if decays(p.shape)], [p for p in trainable if not decays(p.shape)],
                   weight_decay)


def param_groups_by_name(model: nn.Module, decay_by_name: dict[str, bool], weight_decay: float) -> list[dict]:
    """The groups of ``model``'s trainable parameters (an SDFTModel, perhaps wrapped), decay
    decided by ``decay_by_name``, the student's parameters by name (wrapper prefixes removed):
    under FSDP1 and ZeRO-3 the wrapped parameters no longer have their shapes."""
    groups: dict[bool, list] = {True: [], False: []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        clean = name.replace("_fsdp_wrapped_module.", "").replace("_checkpoint_wrapped_module.", "")
        for prefix in ("module.", "student."):
            clean = clean.removeprefix(prefix)
        if clean not in decay_by_name:
            raise ValueError(f"parameter {name!r} is not one of the student's (its parameters are flattened: FSDP1 "
                             "needs use_orig_params=True)")
        groups[decay_by_name[clean]].append(param)
    return _groups(groups[True], groups[False], weight_decay)


def _groups(decayed: list, undecayed: list, weight_decay: float) -> list[dict]:
    return [group for group in ({"params": decayed, "weight_decay": weight_decay},
                                {"params": undecayed, "weight_decay": 0.0}) if group["params"]]
