"""Parameter-group freezing whose masks really freeze (Fix 2 of the paper): ``freeze``.

The jobs live in their own modules: the spec grammar and its resolution per architecture
(:mod:`sdft.freeze_spec`), applying the masks and the AdamW guard (:mod:`sdft.freeze_masks`),
the report (:mod:`sdft.freeze_report`). Everything public is importable from here.

Freezing every decoder layer's FFN/MLP keeps the model's old facts (paper, Table 1). This module
freezes parameter groups named by role, resolved per architecture from module types and names,
and makes the freeze hold under AdamW::

    report = freeze(model, "ffn")                          # every decoder layer's MLP
    report = freeze(model, ["embeddings", "layers[:4]"])   # a union of specs
    report = freeze(model, train_only="attention")         # everything except attention
    report = freeze(model, PartialMask("model.embed_tokens.weight", rows=old_token_ids))
    optimizer = masked_optimizer(                          # param_groups: sdft.param_groups'
        torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-4), report)
    print(report)

Spec grammar (a spec is one item or a list of items; a list freezes the union):

- ``"embeddings"``: input token embeddings plus any other ``nn.Embedding`` outside the decoder
  layers (position embeddings such as GPT-2's ``wpe``).
- ``"attention"`` / ``"ffn"``: the attention / MLP module of every decoder layer, all of its
  parameters (e.g. a Qwen3 ``q_norm`` inside ``self_attn`` belongs to "attention").
- ``"norms"``: every normalisation module, in the layers, inside attention, and the final norm.
- ``"lm_head"``: ``model.get_output_embeddings()``; with tied embeddings this is the input
  embedding Parameter, so freezing either freezes both (the report says so).
- ``"layers[i]"``, ``"layers[a:b]"``, ``"layers[a:b:c]"``: whole decoder layers, Python index /
  slice semantics over the decoder layer list, except that bounds past the list and empty
  selections are errors. A suffix ``.attention``, ``.ffn`` or ``.norms`` restricts to that role:
  ``"layers[:4].ffn"``.
- ``"re:<regex>"``: parameters whose name (or tied alias) ``re.fullmatch``-es the regex.
- ``PartialMask(name, rows=[...])`` or ``PartialMask(name, mask=bool_tensor)``: some entries of
  one tensor (True = frozen).

``train_only=`` takes the same grammar and freezes the complement (for a ``PartialMask``, the
entries outside it). ``spec`` and ``train_only`` may be given together: the frozen set is the
complement of ``train_only`` united with ``spec``. ``freeze`` never unfreezes a parameter that
already has ``requires_grad=False`` (e.g. a PEFT base model).

What is guaranteed:

- Whole tensors get ``requires_grad=False``: no gradient, no optimizer state, and torch
  optimizers skip them (their ``.grad`` stays None), so they are bit-identical after training.
- Partially frozen tensors get a gradient hook that zeroes the frozen entries' gradient. That
  alone does NOT freeze them under AdamW (decoupled weight decay and momentum still move them).
  ``masked_optimizer`` adds the guarantee: after every ``optimizer.step()`` it writes the
  frozen entries back, bit-identical to their values when it was called.

The decoder layer list is found as the ``nn.ModuleList`` holding the most parameters; inside a
layer, children are classified as norms (type name ending in ``Norm`` or name like ``*norm*`` /
``ln_*``), attention (name containing ``attn`` / ``attention``) or FFN (``mlp``, ``ffn``,
``feed_forward``, ``moe``, ``experts``, ``fc1``/``fc2``); unclassified children are searched
recursively. Sharded parameters (FSDP, ZeRO-3) are not supported: masks need the full shape.
"""

from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from .freeze_masks import FrozenEntries, apply_plan, masked_optimizer
from .freeze_report import FreezeReport, GroupCount, build_report
from .freeze_spec import (GROUPS, ModelIndex, PartialMask, Spec, check_something_trains, complement, describe,
                          resolve, resolve_groups, simplify, union)
from .param_groups import param_groups

__all__ = [
    "GROUPS",
    "FreezeReport",
    "FrozenEntries",
    "GroupCount",
    "PartialMask",
    "freeze",
    "masked_optimizer",
    "param_groups",
    "resolve_groups",
]


def freeze(model: nn.Module, spec: Optional[Spec] = None, *,
           train_only: Optional[Spec] = None) -> FreezeReport:
    """Freeze the parameters named by ``spec`` (or all but ``train_only``); see the module doc.

    Whole tensors get ``requires_grad=False``; partially frozen ones get a gradient hook that
    zeroes the frozen entries. Wrap the optimizer with ``masked_optimizer(optimizer, report)``
    so that weight decay and momentum cannot move masked entries.

    Raises ValueError, naming the spec, when a spec item matches nothing, a mask has the wrong
    shape, a group name is unknown, a layer index/slice is out of range or empty, or nothing
    would be left to train. The model is left untouched when it raises.
    """
    if spec is None and train_only is None:
        raise ValueError("freeze: give a spec, train_only=, or both")
    index = ModelIndex.build(model)
    plan: dict[str, Optional[Tensor]] = {}
    if train_only is not None:
        try:
            trained = resolve(index, train_only)
        except ValueError as error:
            raise ValueError(f"train_only={train_only!r}: {error}") from None
        plan = complement(index, trained)
    if spec is not None:
        plan = union(plan, resolve(index, spec))
    plan = simplify(index, plan)
    check_something_trains(index, plan, describe(spec, train_only))
    pre_frozen = sum(p.numel() for p in index.params.values() if not p.requires_grad)
    partial = apply_plan(index, plan)
    return build_report(index, partial, pre_frozen)
