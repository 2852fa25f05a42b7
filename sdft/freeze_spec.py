"""Freezing specs: their grammar and their resolution, per architecture, to a plan.

A plan maps canonical parameter names to None (freeze the whole tensor) or a bool mask of the
parameter's shape (True = frozen). The grammar is :mod:`sdft.freezing`'s: group names
(``GROUPS``), ``layers[a:b]`` with an optional role, ``re:<regex>`` and :class:`PartialMask`.
:func:`sdft.freezing.freeze` turns a spec into a plan here, applies it
(:mod:`sdft.freeze_masks`) and reports it (:mod:`sdft.freeze_report`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
from torch import Tensor, nn

GROUPS = ("embeddings", "attention", "ffn", "norms", "lm_head")
_LAYER_ROLES = ("attention", "ffn", "norms")
# Rows of the report, in order; every parameter lands in exactly one (first matching role).
REPORT_ROWS = ("embeddings", "lm_head", "attention", "ffn", "norms", "other")

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_FFN_NAME = re.compile(r"mlp|ffn|feed_?forward|moe|^experts$|^fc\d$", re.IGNORECASE)
_NORM_NAME = re.compile(r"norm|^ln(_|\d|$)", re.IGNORECASE)
_NORM_TYPE = re.compile(r"Norm(\d+d)?$")
_LAYERS_SPEC = re.compile(r"layers\[([^\]]*)\](?:\.(\w+))?")

Plan = dict[str, Optional[Tensor]]


@dataclass(frozen=True, eq=False, repr=False)
class PartialMask:
    """Freeze some entries of one parameter: whole ``rows`` (indices along dim 0, e.g. token ids
    of an embedding) or an elementwise ``mask`` (bool, the parameter's shape, True = frozen).

    ``param_name`` is a name from ``model.named_parameters()``; a tied alias (e.g.
    ``"lm_head.weight"`` tied to the input embedding) refers to the same Parameter.
    """

    param_name: str
    rows: Optional[Sequence[int]] = None
    mask: Optional[Tensor] = None

    def __post_init__(self) -> None:
        if (self.rows is None) == (self.mask is None):
            raise ValueError(f"freeze spec {self!r}: give exactly one of rows= or mask=")
        if self.mask is not None and self.mask.dtype != torch.bool:
            raise ValueError(f"freeze spec {self!r}: mask must be a bool tensor (True = frozen), "
                             f"got dtype {self.mask.dtype}")

    def __repr__(self) -> str:
        # A short form: error messages quote the spec and must not dump a whole tensor.
        if self.mask is not None:
            return f"PartialMask({self.param_name!r}, mask=<bool {list(self.mask.shape)}>)"
        if self.rows is None:
            return f"PartialMask({self.param_name!r})"
        rows = list(self.rows)
        shown = rows if len(rows) <= 8 else rows[:8] + ["..."]
        return f"PartialMask({self.param_name!r}, rows={shown})".replace("'...'", "...")


Spec = Union[str, PartialMask, Sequence[Union[str, PartialMask]]]


def resolve_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter names of each named group (``GROUPS``) for this model, sorted.

    Tied parameters appear under their first name in ``model.named_parameters()``. Groups may
    overlap (a norm inside attention is in both "attention" and "norms").
    """
    index = ModelIndex.build(model)
    return {name: tuple(sorted(index.groups[name])) for name in GROUPS}


# --------------------------------------------------------------------------------------------
# Model inspection
# --------------------------------------------------------------------------------------------


@dataclass
class ModelIndex:
    """Parameters of a model by canonical name (tied parameters once) and by role."""

    params: dict[str, nn.Parameter]
    aliases: dict[str, str]             # every name, tied aliases included -> canonical name
    groups: dict[str, set[str]]         # GROUPS -> canonical names
    layers: list[dict[str, set[str]]]   # per decoder layer: "all" and _LAYER_ROLES
    report_row: dict[str, str]          # canonical name -> one of REPORT_ROWS
    model_name: str                     # class name, for error messages

    @classmethod
    def build(cls, model: nn.Module) -> "ModelIndex":
        params = dict(model.named_parameters())
        name_of = {id(p): name for name, p in params.items()}
        aliases = {name: name_of[id(p)]
                   for name, p in model.named_parameters(remove_duplicate=False)}

        def names(module: Optional[nn.Module]) -> set[str]:
            return set() if module is None else {name_of[id(p)] for p in module.parameters()}

        decoder_layers = _find_decoder_layers(model)
        layers = [_classify_layer(layer, names) for layer in decoder_layers]
        in_layers = set().union(*(layer["all"] for layer in layers))
        groups = {
            "embeddings": _embedding_names(model, names, in_layers),
            "attention": set().union(*(layer["attention"] for layer in layers)),
            "ffn": set().union(*(layer["ffn"] for layer in layers)),
            "norms": set().union(*(names(m) for n, m in model.named_modules()
                                   if _is_norm(n.rsplit(".", 1)[-1], m))),
            "lm_head": names(_optional_call(model, "get_output_embeddings")),
        }
        report_row = {}
        for name in params:
            report_row[name] = next((row for row in REPORT_ROWS[:-1] if name in groups[row]),
                                    "other")
        return cls(params, aliases, groups, layers, report_row, type(model).__name__)


def _optional_call(model: nn.Module, method: str) -> Optional[nn.Module]:
    """``model.<method>()`` for Hugging Face models; None for modules without it."""
    try:
        return getattr(model, method)()
    except (AttributeError, NotImplementedError):
        return None


def _find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layer list: the ``nn.ModuleList`` holding the most parameters.

    Counting parameters rather than entries skips small per-layer lists (MoE experts live
    inside the layers, so their list is always smaller than the layer list holding them).
    """
    best, best_size = nn.ModuleList(), 0
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    return best


def _is_norm(name: str, module: nn.Module) -> bool:
    """Normalisation module: by type name (LayerNorm, LlamaRMSNorm, ...) or, for leaf modules
    with parameters of an unfamiliar type, by attribute name (``*norm*``, ``ln_1``)."""
    if _NORM_TYPE.search(type(module).__name__):
        return True
    is_leaf_with_params = not any(True for _ in module.children()) and any(
        True for _ in module.parameters(recurse=False))
    return is_leaf_with_params and bool(_NORM_NAME.search(name))


def _child_role(name: str, module: nn.Module) -> Optional[str]:
    """Role of a decoder-layer child, or None to look inside it. Norms are checked first:
    ``post_attention_layernorm`` is a norm, not attention."""
    if _is_norm(name, module):
        return "norms"
    if _ATTENTION_NAME.search(name):
        return "attention"
    if _FFN_NAME.search(name):
        return "ffn"
    return None


def _classify_layer(layer: nn.Module, names) -> dict[str, set[str]]:
    """Canonical parameter names of one decoder layer: all of them, and per role."""
    roles: dict[str, set[str]] = {role: set() for role in _LAYER_ROLES}

    def visit(module: nn.Module) -> None:
        for child_name, child in module.named_children():
            role = _child_role(child_name, child)
            if role is None:
                visit(child)
            else:
                roles[role] |= names(child)

    visit(layer)
    return {"all": names(layer), **roles}


def _embedding_names(model: nn.Module, names, in_layers: set[str]) -> set[str]:
    """Input token embeddings plus every other ``nn.Embedding`` outside the decoder layers
    (position embeddings such as GPT-2's ``wpe``, token-type embeddings)."""
    found = names(_optional_call(model, "get_input_embeddings"))
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            found |= names(module) - in_layers
    return found


# --------------------------------------------------------------------------------------------
# Spec resolution
# --------------------------------------------------------------------------------------------


def resolve(index: ModelIndex, spec: Spec) -> dict[str, Optional[Tensor]]:
    """Union of the selections of every item of ``spec``."""
    if not isinstance(spec, (str, PartialMask, list, tuple)):
        raise ValueError(f"freeze spec {spec!r}: expected a str, PartialMask or a list of them")
    items = list(spec) if isinstance(spec, (list, tuple)) else [spec]
    if not items:
        raise ValueError(f"freeze spec {spec!r}: empty list")
    plan: dict[str, Optional[Tensor]] = {}
    for item in items:
        if isinstance(item, PartialMask):
            selection = _resolve_partial(index, item)
        elif isinstance(item, str):
            selection = dict.fromkeys(_resolve_name(index, item))
        else:
            raise ValueError(f"freeze spec {item!r}: expected a str or PartialMask, "
                             f"got {type(item).__name__}")
        if not selection:
            raise ValueError(f"freeze spec {item!r} matches no parameters of {index.model_name}")
        plan = union(plan, selection)
    return plan


def _resolve_name(index: ModelIndex, spec: str) -> set[str]:
    """Canonical names selected by a string spec (group, layer slice or regex)."""
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as error:
            raise ValueError(f"freeze spec {spec!r}: invalid regular expression: {error}") from None
        return {canonical for name, canonical in index.aliases.items() if pattern.fullmatch(name)}
    match = _LAYERS_SPEC.fullmatch(spec)
    if match:
        role = match.group(2) or "all"
        if role not in ("all", *_LAYER_ROLES):
            raise ValueError(f"freeze spec {spec!r}: unknown layer group {role!r}; "
                             f"known: {', '.join(_LAYER_ROLES)}")
        chosen = _layer_indices(spec, match.group(1), len(index.layers))
        return set().union(*(index.layers[i][role] for i in chosen))
    if spec in index.groups:
        return set(index.groups[spec])
    raise ValueError(f"freeze spec {spec!r}: unknown group; known groups: {', '.join(GROUPS)}, "
                     f"'layers[a:b]' (optionally '.attention', '.ffn', '.norms'), 're:<regex>' "
                     f"over parameter names, PartialMask(...)")


def _layer_indices(spec: str, inside: str, n_layers: int) -> Sequence[int]:
    """Indices chosen by ``layers[inside]``; bounds past the list or an empty pick raise."""
    parts = inside.split(":")
    try:
        numbers = [int(p) if p.strip() else None for p in parts]
    except ValueError:
        raise ValueError(f"freeze spec {spec!r}: expected 'layers[i]' or 'layers[a:b(:c)]' "
                         f"with integers") from None
    if len(parts) == 1:
        i = numbers[0]
        if i is None or not -n_layers <= i < n_layers:
            raise ValueError(f"freeze spec {spec!r}: layer index out of range for "
                             f"{n_layers} decoder layers")
        return [range(n_layers)[i]]
    if len(parts) > 3:
        raise ValueError(f"freeze spec {spec!r}: a slice has at most 3 parts")
    start, stop, step = (numbers + [None])[:3]
    if step == 0:
        raise ValueError(f"freeze spec {spec!r}: slice step cannot be zero")
    for bound in (start, stop):
        if bound is not None and not -n_layers <= bound <= n_layers:
            raise ValueError(f"freeze spec {spec!r}: slice bound {bound} out of range for "
                             f"{n_layers} decoder layers")
    chosen = range(n_layers)[start:stop:step]
    if not chosen:
        raise ValueError(f"freeze spec {spec!r}: selects no layers of {n_layers}")
    return chosen


def _resolve_partial(index: ModelIndex, spec: PartialMask) -> dict[str, Optional[Tensor]]:
    """A bool mask (CPU, parameter's shape) of the entries ``spec`` names."""
    canonical = index.aliases.get(spec.param_name)
    if canonical is None:
        raise ValueError(f"freeze spec {spec!r}: no parameter named {spec.param_name!r}")
    shape = index.params[canonical].shape
    if len(shape) == 0:
        raise ValueError(f"freeze spec {spec!r}: {spec.param_name} is a scalar; freeze it whole")
    if spec.mask is not None:
        if spec.mask.shape != shape:
            raise ValueError(f"freeze spec {spec!r}: mask shape {tuple(spec.mask.shape)} does not "
                             f"match parameter {spec.param_name} of shape {tuple(shape)}")
        mask = spec.mask.detach().to("cpu", copy=True)
    else:
        rows = torch.as_tensor(list(spec.rows), dtype=torch.long)
        if rows.numel() and not bool(((rows >= -shape[0]) & (rows < shape[0])).all()):
            raise ValueError(f"freeze spec {spec!r}: row index out of range for parameter "
                             f"{spec.param_name} of shape {tuple(shape)}")
        mask = torch.zeros(shape, dtype=torch.bool)
        mask[rows] = True
    return {canonical: mask} if bool(mask.any()) else {}


def union(a: dict[str, Optional[Tensor]], b: dict[str, Optional[Tensor]]):
    """Entries frozen by ``a`` or ``b``; a whole-tensor selection (None) absorbs masks."""
    out = dict(a)
    for name, mask in b.items():
        if name not in out:
            out[name] = mask
        elif out[name] is not None:
            out[name] = None if mask is None else out[name] | mask
    return out


def complement(index: ModelIndex, trained: dict[str, Optional[Tensor]]):
    """Entries not in ``trained``: what ``train_only`` freezes."""
    plan: dict[str, Optional[Tensor]] = {}
    for name in index.params:
        if name not in trained:
            plan[name] = None
        elif trained[name] is not None:
            plan[name] = ~trained[name]
    return plan


def simplify(index: ModelIndex, plan: dict[str, Optional[Tensor]]):
    """Drop empty masks and already frozen tensors; all-True masks become whole-tensor freezes."""
    out: dict[str, Optional[Tensor]] = {}
    for name, mask in plan.items():
        if not index.params[name].requires_grad or (mask is not None and not bool(mask.any())):
            continue
        out[name] = None if mask is None or bool(mask.all()) else mask
    return out


def describe(spec: Optional[Spec], train_only: Optional[Spec]) -> str:
    """The arguments of a ``freeze`` call, as error messages quote them."""
    if train_only is None:
        return repr(spec)
    if spec is None:
        return f"train_only={train_only!r}"
    return f"{spec!r} with train_only={train_only!r}"


def check_something_trains(index: ModelIndex, plan, spec: str) -> None:
    """Raise when ``plan`` (plus what was frozen before) leaves no element to train."""
    trainable = 0
    for name, p in index.params.items():
        if p.requires_grad and name not in plan:
            trainable += p.numel()
        elif p.requires_grad and plan[name] is not None:
            trainable += p.numel() - int(plan[name].sum())
    if trainable == 0:
        raise ValueError(f"freeze spec {spec} freezes every parameter: nothing left to train")
