"""What a causal LM's head does to its final hidden states, read from the model, not guessed.

The fused loss needs the final hidden states, the output embedding, and every transform the
architecture applies to the logits. Missing one (a softcap, a logit scale) silently trains a
different objective, so each known transform is read from the config here, in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class HeadSpec:
    """``logits = softcap(hidden_scale * hidden @ weight.T + bias)``.

    ``weight`` is ``[V, D]``; ``hidden_scale`` folds a logit multiplier into the hidden states
    (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``), which is exact because the
    head is linear (a bias, if any, is scaled with it: none of these models has one).
    """

    weight: Tensor
    bias: Optional[Tensor]
    softcap: Optional[float]
    hidden_scale: float


def head_spec(model: nn.Module) -> HeadSpec:
    """Read the LM head and its logit transforms from a transformers causal LM."""
    head = model.get_output_embeddings()
    if head is None or not hasattr(head, "weight"):
        raise ValueError(f"{type(model).__name__} has no output embedding with a weight (get_output_embeddings())")
    config = getattr(model, "config", None)
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:  # Cohere: logits * logit_scale
        scale *= float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:  # Granite: logits / logits_scaling
        scale /= float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = getattr(head, "bias", None)
    if bias is not None and scale != 1.0:
        raise ValueError(f"{type(model).__name__}: a logit scale with a head bias is not supported")
    return HeadSpec(head.weight, bias, None if softcap is None else float(softcap), scale)


def decoder_of(model: nn.Module) -> nn.Module:
    """The module that maps input ids to final (normalised) hidden states."""
    get = getattr(model, "get_decoder", None)
    decoder = get() if callable(get) else None
    if decoder is None:
        decoder = getattr(model, "base_model", None)
    if decoder is None or decoder is model:
        raise ValueError(f"cannot find the decoder of {type(model).__name__} (no get_decoder() or base_model)")
    return decoder


def final_hidden_states(model: nn.Module, input_ids: Tensor, attention_mask: Optional[Tensor] = None, **kwargs) -> Tensor:
    """``[B, T, D]`` hidden states after the final norm, without calling the LM head."""
    out = decoder_of(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kwargs)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        raise ValueError(f"{type(model).__name__}: the decoder did not return [B, T, D] hidden states")
    return hidden
