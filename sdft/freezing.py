"""Parameter-group freezing whose masks really freeze (Fix 2 of the paper).

Freezing every decoder layer's FFN/MLP keeps the model's old facts (paper, Table 1). This module
freezes parameter groups named by role, resolved per architecture from module types and names,
and makes the freeze hold under AdamW::

    report = freeze(model, "ffn")                          # every decoder layer's MLP
    report = freeze(model, ["embeddings", "layers[:4]"])   # a union of specs
    report = freeze(model, train_only="attention")         # everything except attention
    report = freeze(model, PartialMask("model.embed_tokens.weight", rows=old_token_ids))
    optimizer = masked_optimizer(
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

import re
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

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

GROUPS = ("embeddings", "attention", "ffn", "norms", "lm_head")
_LAYER_ROLES = ("attention", "ffn", "norms")
# Rows of the report, in order; every parameter lands in exactly one (first matching role).
_REPORT_ROWS = ("embeddings", "lm_head", "attention", "ffn", "norms", "other")
# AdamW keeps exp_avg and exp_avg_sq per trainable element, fp32 under mixed precision.
_ADAMW_STATE_BYTES = 8

_ATTENTION_NAME = re.compile(r"attn|attention", re.IGNORECASE)
_FFN_NAME = re.compile(r"mlp|ffn|feed_?forward|moe|^experts$|^fc\d$", re.IGNORECASE)
_NORM_NAME = re.compile(r"norm|^ln(_|\d|$)", re.IGNORECASE)
_NORM_TYPE = re.compile(r"Norm(\d+d)?$")
_LAYERS_SPEC = re.compile(r"layers\[([^\]]*)\](?:\.(\w+))?")


# --------------------------------------------------------------------------------------------
# Public data types
# --------------------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class GroupCount:
    """Trainable and frozen element counts of one report row."""

    name: str
    trainable: int
    frozen: int


@dataclass(eq=False)
class FreezeReport:
    """What ``freeze`` left trainable and frozen.

    ``rows`` partition the parameters by role (embeddings, lm_head, attention, ffn, norms,
    other; each parameter counted once, tied ones included), so ``trainable + frozen ==
    total == sum(p.numel() for p in model.parameters())``. ``frozen`` counts whole-tensor and
    masked elements; ``optimizer_state_bytes_saved`` only whole-tensor ones (8 bytes each,
    AdamW's two fp32 states), since a partially frozen tensor still has full optimizer state.
    ``partial`` lists the partially frozen parameters (what ``masked_optimizer`` guards).
    """

    rows: tuple[GroupCount, ...]
    total: int
    trainable: int
    frozen: int
    optimizer_state_bytes_saved: int
    frozen_tensors: tuple[str, ...]
    partial: tuple[FrozenEntries, ...]
    notes: tuple[str, ...]

    def __str__(self) -> str:
        lines = [f"{'group':<12}{'trainable':>14}{'frozen':>14}{'frozen %':>10}"]
        for row in (*self.rows, GroupCount("total", self.trainable, self.frozen)):
            size = row.trainable + row.frozen
            share = 100.0 * row.frozen / size if size else 0.0
            lines.append(f"{row.name:<12}{row.trainable:>14,}{row.frozen:>14,}{share:>9.1f}%")
        lines.append(f"optimizer state saved: {_format_bytes(self.optimizer_state_bytes_saved)} "
                     f"(AdamW, 2 fp32 states per fully frozen element)")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------------


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
    index = _ModelIndex.build(model)
    plan: dict[str, Optional[Tensor]] = {}
    if train_only is not None:
        try:
            trained = _resolve(index, train_only)
        except ValueError as error:
            raise ValueError(f"train_only={train_only!r}: {error}") from None
        plan = _complement(index, trained)
    if spec is not None:
        plan = _union(plan, _resolve(index, spec))
    plan = _simplify(index, plan)
    _check_something_trains(index, plan, _describe(spec, train_only))
    pre_frozen = sum(p.numel() for p in index.params.values() if not p.requires_grad)
    partial = _apply(index, plan)
    return _build_report(index, partial, pre_frozen)


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


def param_groups(model: nn.Module, weight_decay: float = 0.0) -> list[dict]:
    """Optimizer parameter groups of the trainable (``requires_grad``) parameters.

    Tensors with 2+ dimensions (matrices, embeddings) get ``weight_decay``; 1-D ones (biases,
    norm scales) get none, as in nanoGPT. Empty groups are dropped. Frozen tensors are left out,
    so the optimizer allocates no state for them.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [{"params": [p for p in trainable if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in trainable if p.dim() < 2], "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


def resolve_groups(model: nn.Module) -> dict[str, tuple[str, ...]]:
    """Parameter names of each named group (``GROUPS``) for this model, sorted.

    Tied parameters appear under their first name in ``model.named_parameters()``. Groups may
    overlap (a norm inside attention is in both "attention" and "norms").
    """
    index = _ModelIndex.build(model)
    return {name: tuple(sorted(index.groups[name])) for name in GROUPS}


# --------------------------------------------------------------------------------------------
# Model inspection
# --------------------------------------------------------------------------------------------


@dataclass
class _ModelIndex:
    """Parameters of a model by canonical name (tied parameters once) and by role."""

    params: dict[str, nn.Parameter]
    aliases: dict[str, str]             # every name, tied aliases included -> canonical name
    groups: dict[str, set[str]]         # GROUPS -> canonical names
    layers: list[dict[str, set[str]]]   # per decoder layer: "all" and _LAYER_ROLES
    report_row: dict[str, str]          # canonical name -> one of _REPORT_ROWS
    model_name: str                     # class name, for error messages

    @classmethod
    def build(cls, model: nn.Module) -> "_ModelIndex":
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
            report_row[name] = next((row for row in _REPORT_ROWS[:-1] if name in groups[row]),
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
# Spec resolution: a plan maps canonical names to None (whole tensor) or a bool mask.
# --------------------------------------------------------------------------------------------


def _resolve(index: _ModelIndex, spec: Spec) -> dict[str, Optional[Tensor]]:
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
        plan = _union(plan, selection)
    return plan


def _resolve_name(index: _ModelIndex, spec: str) -> set[str]:
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


def _resolve_partial(index: _ModelIndex, spec: PartialMask) -> dict[str, Optional[Tensor]]:
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


def _union(a: dict[str, Optional[Tensor]], b: dict[str, Optional[Tensor]]):
    """Entries frozen by ``a`` or ``b``; a whole-tensor selection (None) absorbs masks."""
    out = dict(a)
    for name, mask in b.items():
        if name not in out:
            out[name] = mask
        elif out[name] is not None:
            out[name] = None if mask is None else out[name] | mask
    return out


def _complement(index: _ModelIndex, trained: dict[str, Optional[Tensor]]):
    """Entries not in ``trained``: what ``train_only`` freezes."""
    plan: dict[str, Optional[Tensor]] = {}
    for name in index.params:
        if name not in trained:
            plan[name] = None
        elif trained[name] is not None:
            plan[name] = ~trained[name]
    return plan


def _simplify(index: _ModelIndex, plan: dict[str, Optional[Tensor]]):
    """Drop empty masks and already frozen tensors; all-True masks become whole-tensor freezes."""
    out: dict[str, Optional[Tensor]] = {}
    for name, mask in plan.items():
        if not index.params[name].requires_grad or (mask is not None and not bool(mask.any())):
            continue
        out[name] = None if mask is None or bool(mask.all()) else mask
    return out


def _describe(spec: Optional[Spec], train_only: Optional[Spec]) -> str:
    """The arguments of a ``freeze`` call, as error messages quote them."""
    if train_only is None:
        return repr(spec)
    if spec is None:
        return f"train_only={train_only!r}"
    return f"{spec!r} with train_only={train_only!r}"


def _check_something_trains(index: _ModelIndex, plan, spec: str) -> None:
    """Raise when ``plan`` (plus what was frozen before) leaves no element to train."""
    trainable = 0
    for name, p in index.params.items():
        if p.requires_grad and name not in plan:
            trainable += p.numel()
        elif p.requires_grad and plan[name] is not None:
            trainable += p.numel() - int(plan[name].sum())
    if trainable == 0:
        raise ValueError(f"freeze spec {spec} freezes every parameter: nothing left to train")


# --------------------------------------------------------------------------------------------
# Applying a plan and reporting
# --------------------------------------------------------------------------------------------


def _apply(index: _ModelIndex, plan: dict[str, Optional[Tensor]]) -> list[FrozenEntries]:
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


def _build_report(index: _ModelIndex, partial: list[FrozenEntries],
                  pre_frozen: int) -> FreezeReport:
    masked = {entries.name: entries.count for entries in partial}
    counts = {row: [0, 0] for row in _REPORT_ROWS}  # row -> [trainable, frozen]
    for name, p in index.params.items():
        frozen = p.numel() if not p.requires_grad else masked.get(name, 0)
        counts[index.report_row[name]][0] += p.numel() - frozen
        counts[index.report_row[name]][1] += frozen
    rows = tuple(GroupCount(row, t, f) for row, (t, f) in counts.items() if t + f)
    whole = [name for name, p in index.params.items() if not p.requires_grad]
    whole_elements = sum(index.params[name].numel() for name in whole)
    return FreezeReport(
        rows=rows,
        total=sum(p.numel() for p in index.params.values()),
        trainable=sum(row.trainable for row in rows),
        frozen=sum(row.frozen for row in rows),
        optimizer_state_bytes_saved=whole_elements * _ADAMW_STATE_BYTES,
        frozen_tensors=tuple(whole),
        partial=tuple(partial),
        notes=tuple(_notes(index, masked, pre_frozen)),
    )


def _notes(index: _ModelIndex, masked: dict[str, int], pre_frozen: int) -> Iterable[str]:
    for alias, canonical in index.aliases.items():
        if alias == canonical:
            continue
        if not index.params[canonical].requires_grad:
            yield f"{alias} is tied to {canonical} (the same Parameter): frozen too"
        elif canonical in masked:
            yield f"{alias} is tied to {canonical} (the same Parameter): the same entries frozen"
    if pre_frozen:
        yield (f"{pre_frozen:,} elements were already frozen before this call "
               f"(freeze never unfreezes)")
    if masked:
        yield (f"{sum(masked.values()):,} masked elements in {len(masked)} partially frozen "
               f"tensor(s) keep optimizer state; wrap the optimizer with masked_optimizer() so "
               f"weight decay and momentum cannot move them")


def _format_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
