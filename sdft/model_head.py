"""What a causal LM's head does to its final hidden states, read from the model, not guessed.

The fused loss needs the hidden states the output embedding reads, the output embedding, and
every transform the architecture applies to the logits. Missing one (a softcap, a logit scale)
silently trains a different objective; ``sdft.architectures`` holds what each class does and
``sdft.head_check`` verifies it against the model's own forward.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor, nn

from .architectures import (UnsupportedModel, architecture_name, check_supported, head_transform, pre_head,
                            runs_through_peft_forward, unwrap)


@dataclass(frozen=True)
class HeadSpec:
    """``logits = softcap(hidden_scale * hidden @ weight.T + bias)``.

    ``weight`` is ``[V, D]``; ``hidden_scale`` folds a logit multiplier into the hidden states
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), which is exact because the
    head is linear (a bias, if any, is scaled with it: none of these models has one). A per-token
    scale or a vocabulary slice is already applied to ``weight`` (and ``bias``).
    """

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    hidden_scale: float

    def logits(self, hidden: Tensor) -> Tensor:
        """``[..., V]`` logits of ``hidden`` ``[..., D]``, materialised: for checks on a few positions."""
        z = nn.functional.linear(hidden * self.hidden_scale, self.weight, self.bias)
        return z if self.softcap is None else self.softcap * torch.tanh(z / self.softcap)


def head_spec(model: nn.Module) -> HeadSpec:
    """Read the LM head and its logit transforms from a transformers causal LM."""
    check_supported(model)
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise UnsupportedModel(f"{architecture_name(model)} has no output embedding with a weight "
                               "(get_output_embeddings())")
    transform = head_transform(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    if transform.vocab_size is not None:
        weight = weight[: transform.vocab_size]
        bias = None if bias is None else bias[: transform.vocab_size]
    if transform.row_scale is not None:
        scale = transform.row_scale.to(weight.dtype)
        weight = weight * scale[:, None]
        bias = None if bias is None else bias * scale
    if bias is not None and transform.scale != 1.0:
        raise UnsupportedModel(f"{architecture_name(model)}: a logit scale with a head bias is not supported")
    return HeadSpec(weight, bias, transform.softcap, transform.scale)


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that maps input ids to final (normalised) hidden states.

    The model's ``base_model`` (what its own forward calls), else ``get_decoder()``, else
    ``model.model`` / ``model.transformer``: the first that is a separate module taking
    ``input_ids``. ``get_decoder()`` alone is not enough: some classes return themselves
    (Llama-4 text, Mllama) or their output projection (ModernBERT-decoder).
    """
    inner = unwrap(model)
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    get = getattr(inner, "get_decoder", None)
    candidates = (getattr(inner, "base_model", None), get() if callable(get) else None,
                  getattr(inner, "model", None), getattr(inner, "transformer", None))
    for module in candidates:
        if (isinstance(module, nn.Module) and module is not inner and module is not head
                and not isinstance(module, (nn.Linear, nn.Embedding)) and _takes_input_ids(module)):
            return module
    raise UnsupportedModel(f"cannot find the decoder of {architecture_name(model)}: neither base_model, "
                           "get_decoder(), .model nor .transformer is a module that takes input_ids")


def _takes_input_ids(module: nn.Module) -> bool:
    try:
        parameters = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return "input_ids" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


@dataclass
class DecoderOutput:
    """``hidden``: ``[B, T, D]`` states the output embedding reads; ``router_logits``: one
    ``[B * T, experts]`` tensor per MoE layer when asked for, else None."""

    hidden: Tensor
    router_logits: Optional[Sequence[Tensor]] = None


def decoder_forward(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                    output_router_logits: bool = False, **kwargs) -> DecoderOutput:
    """Run the decoder (and a pre-head module, if the class has one); never the LM head.

    A PEFT model with prefix tuning runs its own forward, which puts the virtual tokens in the
    attention's keys and values, and the decoder's output is read from it
    (:func:`forward_through` with the model as its own wrapper).
    """
    check_supported(model)
    if runs_through_peft_forward(model):
        return forward_through(model, model, input_ids, attention_mask, output_router_logits, **kwargs)
    if output_router_logits:
        kwargs["output_router_logits"] = True
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    return _decoder_output(model, out, output_router_logits)


def forward_through(wrapper: nn.Module, model: nn.Module, input_ids: Tensor,
                    attention_mask: Optional[Tensor] = None, output_router_logits: bool = False,
                    **kwargs) -> DecoderOutput:
    """What :func:`decoder_forward` returns, from a forward of the whole model called through
    ``wrapper`` (a ``DistributedDataParallel`` around ``model``).

    DDP synchronises gradients only for a forward that runs through it, so the model's own
    forward runs, with its LM head on the last position only (``logits_to_keep=1``: a ``[B,
    V]`` slice, not ``[B, T, V]``), and a forward hook on the decoder keeps the decoder's
    output, the states the model's head reads.
    """
    check_supported(model)
    if output_router_logits:
        kwargs["output_router_logits"] = True
    kept = []
    hook = decoder_of(model).register_forward_hook(lambda module, args, output: kept.append(output))
    try:
        wrapper(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1, **kwargs)
    except TypeError as e:
        if "logits_to_keep" not in str(e):
            raise
        raise UnsupportedModel(f"{architecture_name(model)} takes no logits_to_keep, so its forward through "
                               f"{type(wrapper).__name__} would form the full logits") from e
    finally:
        hook.remove()
    if len(kept) != 1:
        raise UnsupportedModel(f"{architecture_name(model)}: its forward ran the decoder {len(kept)} times, "
                               "expected once")
    return _decoder_output(model, kept[0], output_router_logits)


def _decoder_output(model: nn.Module, out, output_router_logits: bool) -> DecoderOutput:
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise UnsupportedModel(f"{architecture_name(model)}: the decoder did not return [B, T, D] hidden states")
    before_head = pre_head(model)
    if before_head is not None:
        hidden = before_head(hidden)
    router_logits = getattr(out, "router_logits", None) if output_router_logits else None
    if output_router_logits and not router_logits:
        raise UnsupportedModel(f"{architecture_name(model)}: the decoder returned no router logits, needed for "
                               "the MoE auxiliary loss its own forward adds")
    return DecoderOutput(hidden, router_logits)


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None,
                        **kwargs) -> Tensor:
    """``[B, T, D]`` hidden states after the final norm, without calling the LM head."""
    return decoder_forward(model, input_ids, attention_mask, **kwargs).hidden
