"""Once per model instance: does the fused path train the model's own objective?

``sdft.architectures`` says what each known class does after its decoder. A class it does not
know (a new transformers release, a custom model) may apply a transform it misses, and the
fused loss would then train a different objective without a word. So the first time a model
is used, a short probe row from the real batch (at most ``PROBE_TOKENS`` tokens) is checked:

- logits: the decoder's hidden states through the head spec must give the model's own logits,
  within the tolerance of the model's dtype;
- loss: the model's own ``forward(input_ids, labels=input_ids).loss`` must be the next-token
  cross-entropy of its own logits plus the auxiliary term the fused path adds, if any (both in
  float32, so this holds to float32 precision in any dtype): a loss that shifts labels
  otherwise or adds another term is caught here;
- causality: changing the probe's last token must not move the hidden states before it.

A disagreement raises :class:`ModelHeadMismatch` naming the architecture and its size. The
probe costs three forwards of the probe row without gradients, once.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass
from typing import Mapping, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .architectures import architecture_name, auxiliary_loss, check_supported
from .model_head import HeadSpec, decoder_forward, head_spec
from .sharding import check_whole, head_owner, is_zero3_param, run_inside, wrapper_kind

PROBE_TOKENS = 8

# Logits: disagreement allowed relative to max |logit| (at least 1). The model rounds its logits
# to its dtype (float32 matmuls may run in TF32 on a GPU); the probe computes them in float64
# from the same hidden states. A missed transform moves logits by percents, not per mille.
TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}
# Loss: relative to max(1, |loss|); both sides are float32 cross-entropies of the same logits.
LOSS_TOLERANCE = 1e-5

_checked: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()


class ModelHeadMismatch(ValueError):
    """The fused path's logits or loss differ from the model's own forward."""


@dataclass(frozen=True)
class HeadCheck:
    """Largest disagreements found: logits relative to max |logit|, loss relative to max(1, |loss|),
    hidden states before a changed token relative to max |hidden|; ``tolerance`` is the one of
    the logits and of causality (the dtype's)."""

    logits: float
    loss: float
    causality: float
    tolerance: float


def ensure_checked(model: nn.Module, batch: Mapping[str, Tensor], wrapper: Optional[nn.Module] = None) -> None:
    """Run :func:`check_model_head` until it has checked ``model`` (this instance) once."""
    if model in _checked:
        return
    if check_model_head(model, batch, wrapper) is not None:
        _checked.add(model)


@torch.no_grad()
def check_model_head(model: nn.Module, batch: Mapping[str, Tensor],
                     wrapper: Optional[nn.Module] = None) -> Optional[HeadCheck]:
    """Compare the fused path with ``model``'s own forward on a probe row of ``batch``.

    Raises :class:`ModelHeadMismatch` if logits, loss or causality disagree beyond tolerance;
    returns the measured disagreements otherwise, or None if no row of ``batch`` has two
    tokens to probe.

    ``wrapper``: as :func:`sdft.causal_lm_loss`'s. The model's own forward then runs through
    it, and the fused path's passes inside its forward; the head is read where the loss reads
    it (inside the forward that gathers it, :func:`sdft.sharding.head_owner`), after the
    model's own forward, which under ZeRO-3 gives the head's gathered weight back. Under a
    wrapper, or a model sharded itself, every process runs the same passes (their forwards
    communicate): a batch without a row of two real tokens is probed on its first columns.
    """
    check_supported(model)  # what is refused is refused first, with its reason
    ids = probe_row(batch)
    if ids is None:
        if not runs_collectives(model, wrapper) or batch["input_ids"].shape[1] < 2:
            return None
        ids = batch["input_ids"][:1, :PROBE_TOKENS]
    aux = auxiliary_loss(model)
    mask = torch.ones_like(ids)
    with _eval_mode(model):
        theirs = (model if wrapper is None else wrapper)(input_ids=ids, attention_mask=mask, labels=ids,
                                                         use_cache=False)
        probe = _FusedProbe(model, ids, mask, aux is not None)
        if wrapper is None:
            _inside_head_owner(model, probe)
        else:
            run_inside(wrapper, lambda: _inside_head_owner(model, probe))
    ours, our_logits, later, head = probe.hidden, probe.logits, probe.later, probe.head
    tolerance = TOLERANCE.get(head.dtype, 5e-2)

    name = architecture_name(model)
    advice = ("; if you know the fused objective is the one you want, pass check_head=False to "
              "causal_lm_loss / SDFTModel")
    their_logits = theirs.logits.double()
    if their_logits.shape != our_logits.shape:
        raise ModelHeadMismatch(f"{name}: its own forward returns logits of shape {tuple(their_logits.shape)}, the "
                                f"fused path's head gives {tuple(our_logits.shape)}{advice}")
    scale = max(1.0, float(their_logits.abs().max()))
    logits_error = float((our_logits - their_logits).abs().max()) / scale

    their_loss = theirs.loss
    if their_loss is None:
        raise ModelHeadMismatch(f"{name}: its own forward returned no loss for labels=input_ids, so the objective "
                                f"cannot be compared{advice}")
    # What the fused path trains, computed from the model's own logits: next-token CE (in
    # float32, as transformers computes it) plus the auxiliary term.
    next_token_loss = F.cross_entropy(theirs.logits[0, :-1].float(), ids[0, 1:]).double()
    if aux is not None:
        next_token_loss = next_token_loss + aux(probe.router_logits, mask).double()
    loss_error = float((next_token_loss - their_loss.double()).abs()) / max(1.0, float(their_loss.abs()))

    hidden_scale = max(float(ours[0, :-1].abs().max()), 1e-30)
    causality_error = float((later[0, :-1] - ours[0, :-1]).abs().max()) / hidden_scale
    dtype = str(head.dtype).replace("torch.", "")
    if causality_error > tolerance:
        raise ModelHeadMismatch(
            f"{name} is not causal as configured: changing the last of {ids.shape[1]} tokens moved the hidden states "
            f"before it by {causality_error:.2e} of their scale (tolerance {tolerance:.0e} for {dtype}); a next-token "
            f"loss on it would train positions that see their own targets{advice}")
    if getattr(theirs, "aux_loss", None) is not None and aux is None:
        raise ModelHeadMismatch(
            f"{name} adds an auxiliary loss (aux_loss {float(theirs.aux_loss):.4g}) that the fused path does not "
            f"reproduce{advice}")
    if logits_error > tolerance:
        raise ModelHeadMismatch(
            f"{name}: the fused path does not reproduce the model's own logits: they differ by {logits_error:.2e} "
            f"of their scale (max |logit| {scale:.3g}; tolerance {tolerance:.0e} for {dtype}). Its head applies a "
            f"transform that sdft.architectures does not know{advice}")
    if loss_error > LOSS_TOLERANCE:
        raise ModelHeadMismatch(
            f"{name}: its own loss is not the next-token cross-entropy of its logits"
            f"{' plus the auxiliary term' if aux is not None else ''}: {float(their_loss):.6g} against "
            f"{float(next_token_loss):.6g} (relative {loss_error:.2e}, tolerance {LOSS_TOLERANCE:.0e}). It shifts "
            f"labels otherwise or adds a term that sdft.architectures does not know{advice}")
    return HeadCheck(logits_error, loss_error, causality_error, tolerance)


class _FusedProbe:
    """The fused path's passes on the probe row: hidden states, their logits through the head
    spec (float64), the hidden states with the last token changed. Called where the loss reads
    the head, so that a gathered head is read while it is whole."""

    def __init__(self, model: nn.Module, ids: Tensor, mask: Tensor, router_logits: bool):
        self.model, self.ids, self.mask, self.with_router_logits = model, ids, mask, router_logits

    def __call__(self) -> None:
        decoded = decoder_forward(self.model, self.ids, self.mask, output_router_logits=self.with_router_logits)
        head = head_spec(self.model)
        check_whole(head.weight)
        self.hidden, self.router_logits = decoded.hidden, decoded.router_logits
        self.logits = _our_logits(head, decoded.hidden)  # [1, t, V] in float64
        self.head = _HeadFacts(head.weight.dtype, head.weight.shape[0])
        changed = self.ids.clone()
        changed[0, -1] = (changed[0, -1] + 1) % self.head.vocab
        self.later = decoder_forward(self.model, changed, self.mask).hidden


@dataclass(frozen=True)
class _HeadFacts:
    dtype: torch.dtype
    vocab: int


def _inside_head_owner(model: nn.Module, fn) -> None:
    """``fn()``, inside the forward of the module that gathers the head, if it has its own."""
    owner = head_owner(model)
    if owner is None:
        fn()
    else:
        run_inside(owner, fn)


def runs_collectives(model: nn.Module, wrapper: Optional[nn.Module]) -> bool:
    """Whether a forward of ``model`` or of its wrapper communicates across processes (DDP
    broadcasts buffers, FSDP and ZeRO-3 gather parameters), so that every process must run the
    same passes."""
    if wrapper is not None and wrapper_kind(wrapper) is not None:
        return True
    return any(wrapper_kind(module) in ("fsdp1", "fsdp2") for module in model.modules()) or any(
        is_zero3_param(param) for param in model.parameters())


def _our_logits(head: HeadSpec, hidden: Tensor) -> Tensor:
    """The probe's logits through the head spec, in float64 from the model's hidden states."""
    bias = None if head.bias is None else head.bias.double()
    return HeadSpec(head.weight.double(), bias, head.softcap, head.hidden_scale).logits(hidden.double())


def probe_row(batch: Mapping[str, Tensor], max_tokens: int = PROBE_TOKENS) -> Optional[Tensor]:
    """``[1, t]`` ids: the first ``t <= max_tokens`` non-pad tokens of the first row that has
    at least two, or None if no row has."""
    ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    for row in range(ids.shape[0]):
        tokens = ids[row] if mask is None else ids[row][mask[row].bool()]
        if tokens.numel() >= 2:
            return tokens[:max_tokens].unsqueeze(0)
    return None


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off for the probe; every module's own mode is restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
