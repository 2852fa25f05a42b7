"""What each transformers causal-LM class does between its decoder and its loss, by class.

The fused loss sees the decoder's final hidden states and the output embedding, nothing else.
Whatever a class does on top (a logit scale, a softcap, a vocabulary slice, a learned
per-token scale, an MoE auxiliary loss) is reproduced here, or the model is refused. The
knowledge is keyed by the class that implements ``forward``, looked up along the MRO (a
subclass inherits its parent's entry), never by a config attribute's name: two classes read
the same attribute differently (Granite divides by ``logits_scaling``, HyperCLOVA X
multiplies) and a class can carry an attribute it never applies (MPT's ``logit_scale``).

A class in no table is taken to be plain, ``logits = lm_head(hidden)``. ``sdft.head_check``
compares that with the model's own forward once per model instance, so a transform missing
here is refused, not trained silently.
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from torch import Tensor, nn


class UnsupportedModel(ValueError):
    """The model is not a decoder-only causal LM whose objective the fused path reproduces."""


class UnsupportedLossTerm(NotImplementedError):
    """The model's own loss has a term the fused path does not compute (yet)."""


def unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a ``torch.compile`` or PEFT wrapper (adapters stay in
    place), else ``model``."""
    model = getattr(model, "_orig_mod", model)
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def architecture_name(model: nn.Module) -> str:
    """``ClassName (model_type)``, for messages."""
    inner = unwrap(model)
    model_type = getattr(getattr(inner, "config", None), "model_type", None)
    return f"{type(inner).__name__} ({model_type})" if model_type else type(inner).__name__


def _entry(table: dict, model: nn.Module):
    for cls in type(unwrap(model)).__mro__:
        if cls.__name__ in table:
            return table[cls.__name__]
    return None


# ---------------------------------------------------------------------------------------------
# Not causal decoders: refused with the reason
# ---------------------------------------------------------------------------------------------

_ENCODER = ("is a bidirectional encoder (BERT family) given a language-modelling head: it attends to later "
            "tokens unless config.is_decoder is set, and it is not a decoder-only causal LM")
_SEQ2SEQ = ("is the decoder half of an encoder-decoder model: its own loss compares logits[t] with "
            "labels[t] unshifted (it expects labels shifted by the caller), so the same batch would train a "
            "different objective than the next-token loss computed here")

_NOT_CAUSAL_DECODERS: dict[str, str] = {
    **dict.fromkeys((
        "BertLMHeadModel", "BertGenerationDecoder", "BigBirdForCausalLM", "CamembertForCausalLM",
        "Data2VecTextForCausalLM", "ElectraForCausalLM", "ErnieForCausalLM", "MegatronBertForCausalLM",
        "RemBertForCausalLM", "RobertaForCausalLM", "RobertaPreLayerNormForCausalLM", "RoCBertForCausalLM",
        "RoFormerForCausalLM", "XLMRobertaForCausalLM", "XLMRobertaXLForCausalLM", "XmodForCausalLM",
        "XLMWithLMHeadModel",
    ), _ENCODER),
    **dict.fromkeys((
        "BartForCausalLM", "BigBirdPegasusForCausalLM", "BlenderbotForCausalLM", "BlenderbotSmallForCausalLM",
        "MarianForCausalLM", "MBartForCausalLM", "MvpForCausalLM", "PegasusForCausalLM", "PLBartForCausalLM",
        "TrOCRForCausalLM", "WhisperForCausalLM",
    ), _SEQ2SEQ),
    "ProphetNetForCausalLM": "predicts n future tokens per position (n-gram streams) and computes its own loss "
                             "over all of them: not a next-token causal LM",
    "MusicgenForCausalLM": "predicts several audio codebooks per position, one head each: not a single-head causal LM",
    "MusicgenMelodyForCausalLM": "predicts several audio codebooks per position, one head each: not a single-head "
                                 "causal LM",
    "XLNetLMHeadModel": "is a permutation language model (XLNet): its attention is not causal and its own loss "
                        "is unshifted",
    "CpmAntForCausalLM": "prepends prompt positions inside its forward, attends bidirectionally within its context "
                         "and computes its own loss unshifted: not a next-token causal LM",
    "Gemma4AssistantForCausalLM": "is a drafter for assisted decoding that reads the target model's shared key/value "
                                  "states: not a standalone language model",
    "Gemma4UnifiedAssistantForCausalLM": "is a drafter for assisted decoding that reads the target model's shared "
                                         "key/value states: not a standalone language model",
    "GitForCausalLM": "is an image-captioning model whose own loss drops the first positions as image tokens, "
                      "with or without an image: not a text-only causal LM",
}


def refusal_reason(model: nn.Module) -> Optional[str]:
    """Why ``model``'s objective cannot be reproduced from its hidden states, or None."""
    reason = _entry(_NOT_CAUSAL_DECODERS, model)
    if reason is not None:
        return f"{architecture_name(model)} {reason}."
    peft_type = prompt_learning_type(model)
    if peft_type is not None and peft_type not in _THROUGH_PEFT_FORWARD:
        return (f"{architecture_name(model)} with the PEFT adapter {peft_type}: prompt learning of this kind prepends "
                "virtual tokens to the input sequence inside the PEFT model's forward, which moves every position "
                "and adds a prediction of the first token from the last virtual one; the fused path does not "
                "reproduce that objective. Use prefix tuning (PrefixTuningConfig) or a weight adapter such as LoRA.")
    return None


# PEFT prompt learning acts inside the PEFT model's forward, which the decoder path does not call.
# Prefix tuning adds its virtual tokens to the attention's keys and values only, so the decoder's
# output stays aligned with the input ids: the PEFT model's own forward runs and the decoder's
# output is read from it (sdft.model_head). The other kinds are refused (refusal_reason).
_THROUGH_PEFT_FORWARD = ("PREFIX_TUNING",)


def prompt_learning_type(model: nn.Module) -> Optional[str]:
    """The PEFT type (``"PREFIX_TUNING"``, ``"PROMPT_TUNING"``, ``"P_TUNING"``, ...) of the active
    adapter of a PEFT model if it is prompt learning, else None."""
    config = getattr(getattr(model, "_orig_mod", model), "active_peft_config", None)
    if not getattr(config, "is_prompt_learning", False):
        return None
    peft_type = config.peft_type
    return str(getattr(peft_type, "value", peft_type))


def runs_through_peft_forward(model: nn.Module) -> bool:
    """Whether the decoder's output must come from the PEFT model's own forward (prefix tuning)."""
    return prompt_learning_type(model) in _THROUGH_PEFT_FORWARD


def check_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModel` or :class:`UnsupportedLossTerm` for what is refused."""
    reason = refusal_reason(model)
    if reason is not None:
        raise UnsupportedModel(reason)
    z_loss = _entry(_Z_LOSS, model)
    if z_loss is not None and (coef := z_loss(unwrap(model))) > 0:
        raise UnsupportedLossTerm(
            f"{architecture_name(model)} adds a z-loss (z_loss_coefficient={coef}) to its own loss, which the fused "
            "path does not compute; set the coefficient to 0 to train without it")


# ---------------------------------------------------------------------------------------------
# Logit transforms of the head
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class HeadTransform:
    """What a class applies to ``lm_head(hidden)``, in this order:

    ``logits = softcap(scale * (hidden @ weight[:vocab_size].T) * row_scale)`` with
    ``softcap(z) = cap * tanh(z / cap)``.

    ``vocab_size`` keeps only the first rows of the head (a padded vocabulary); ``row_scale``
    ``[V]`` is a per-token multiplier, folded into the rows of the head (autograd carries its
    gradient).
    """

    scale: float = 1.0
    softcap: Optional[float] = None
    vocab_size: Optional[int] = None
    row_scale: Optional[Tensor] = None


def _softcap(value) -> Optional[float]:
    return None if value is None else float(value)


def _config_softcap(model) -> HeadTransform:
    return HeadTransform(softcap=_softcap(model.config.final_logit_softcapping))


def _text_config_softcap(model) -> HeadTransform:
    # The multimodal classes read the cap from the text config (the top-level one has none).
    return HeadTransform(softcap=_softcap(model.config.get_text_config().final_logit_softcapping))


def _divide_by_logits_scaling(model) -> HeadTransform:
    return HeadTransform(scale=1.0 / float(model.config.logits_scaling))


def _inkling(model) -> HeadTransform:
    # The hidden states are divided by the muP width multiplier, and logits past the unpadded
    # vocabulary are dropped before the loss.
    rows = model.config.unpadded_vocab_size
    keep = rows if rows is not None and rows < model.lm_head.weight.shape[0] else None
    return HeadTransform(scale=1.0 / float(model.config.logits_mup_width_multiplier), vocab_size=keep)


def _dory(model) -> HeadTransform:
    head = model.lm_head  # logits * (logit_scale * logit_scale_factor), a learned scale per token
    return HeadTransform(row_scale=head.logit_scale * head.logit_scale_factor)


_HEAD_TRANSFORMS: dict[str, Callable[[nn.Module], HeadTransform]] = {
    **dict.fromkeys((
        "Gemma2ForCausalLM", "Gemma3ForCausalLM", "Gemma3nForCausalLM", "Gemma4ForCausalLM",
        "Gemma4UnifiedForCausalLM", "VaultGemmaForCausalLM", "NanoChatForCausalLM", "BeamForCausalLM",
    ), _config_softcap),
    **dict.fromkeys((
        "Gemma3nForConditionalGeneration", "Gemma4ForConditionalGeneration", "Gemma4UnifiedForConditionalGeneration",
    ), _text_config_softcap),
    **dict.fromkeys(("Inkling2ForCausalLM", "Inkling2LoopForCausalLM"),
                    lambda m: HeadTransform(softcap=_softcap(m.logit_softcap.softcap))),
    "RecurrentGemmaForCausalLM": lambda m: HeadTransform(softcap=_softcap(m.config.logits_soft_cap)),
    "xLSTMForCausalLM": lambda m: HeadTransform(softcap=_softcap(m.config.output_logit_soft_cap)),
    **dict.fromkeys((
        "CohereForCausalLM", "Cohere2ForCausalLM", "Cohere2MoeForCausalLM", "CohereCompassForCausalLM",
    ), lambda m: HeadTransform(scale=float(m.logit_scale))),
    **dict.fromkeys((
        "GraniteForCausalLM", "GraniteSWAForCausalLM", "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM",
        "GraniteMoeHybridForCausalLM", "GraniteMoeSharedForCausalLM",
        "MiniCPM3ForCausalLM",  # divides the hidden states instead: the same, the head being linear
    ), _divide_by_logits_scaling),
    "HyperCLOVAXForCausalLM": lambda m: HeadTransform(scale=float(m.config.logits_scaling)),  # multiplies
    "FalconH1ForCausalLM": lambda m: HeadTransform(scale=float(m.model.lm_head_multiplier)),
    "InklingForCausalLM": _inkling,
    "DoryForCausalLM": _dory,
}


def head_transform(model: nn.Module) -> HeadTransform:
    """The logit transforms of ``model``'s class (identity for a class in no table)."""
    read = _entry(_HEAD_TRANSFORMS, model)
    return HeadTransform() if read is None else read(unwrap(model))


# Classes whose output embedding reads the output of another module, not the decoder's final
# hidden states: that module runs as part of the decoder here.
_PRE_HEAD: dict[str, Callable[[nn.Module], nn.Module]] = {
    "ModernBertDecoderForCausalLM": lambda m: m.lm_head,  # dense + activation + norm, then `decoder`
}


def pre_head(model: nn.Module) -> Optional[nn.Module]:
    """The module between the decoder and the output embedding, if the class has one."""
    read = _entry(_PRE_HEAD, model)
    return None if read is None else read(unwrap(model))


# ---------------------------------------------------------------------------------------------
# Extra loss terms
# ---------------------------------------------------------------------------------------------

_Z_LOSS: dict[str, Callable[[nn.Module], float]] = {
    "BambaForCausalLM": lambda m: float(m.z_loss_coefficient or 0.0),
}


@dataclass(frozen=True)
class AuxiliaryLoss:
    """The MoE load-balancing term a class adds to its own loss: ``coef * balance(router_logits, mask)``.

    ``balance`` is the family's own ``load_balancing_loss_func`` with the arguments its forward
    passes; ``router_logits`` is what the decoder returns with ``output_router_logits=True``
    (one ``[tokens, experts]`` tensor per MoE layer) and ``mask`` the batch's attention mask.
    """

    coef: float
    balance: Callable[[Sequence[Tensor], Optional[Tensor]], Tensor]

    def __call__(self, router_logits: Sequence[Tensor], attention_mask: Optional[Tensor]) -> Tensor:
        return self.coef * self.balance(router_logits, attention_mask)


def _balance_function(model: nn.Module):
    module = importlib.import_module(type(model).__module__)
    func = getattr(module, "load_balancing_loss_func", None)
    if func is None:
        raise UnsupportedLossTerm(
            f"{architecture_name(model)} asks for router logits (output_router_logits) but its modeling module has "
            "no load_balancing_loss_func to reproduce the auxiliary loss with; set output_router_logits=False")
    return func


def _standard_aux(coef_attribute: str):
    """``coef * load_balancing_loss_func(router_logits, num_experts, top_k, attention_mask)``."""
    def build(model) -> AuxiliaryLoss:
        func = _balance_function(model)
        experts, top_k = model.num_experts, model.num_experts_per_tok
        return AuxiliaryLoss(float(getattr(model, coef_attribute)),
                             lambda logits, mask: func(logits, experts, top_k, mask))
    return build


def _doge_aux(model) -> Optional[AuxiliaryLoss]:
    if not model.config.is_moe:  # Doge adds the term only to its MoE variant
        return None
    func = _balance_function(model)
    experts, top_k = model.num_experts, model.num_experts_per_tok
    keys = math.floor(math.sqrt(experts))  # Doge's product-key routing
    return AuxiliaryLoss(float(model.router_aux_loss_coef),
                         lambda logits, mask: func(logits, experts, keys, top_k, mask))


_AUX_LOSS: dict[str, Callable[[nn.Module], Optional[AuxiliaryLoss]]] = {
    **dict.fromkeys((
        "MixtralForCausalLM", "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "Qwen3NextForCausalLM",
        "Qwen3_5MoeForCausalLM", "Qwen4ExpForCausalLM", "OlmoeForCausalLM", "PhimoeForCausalLM",
        "MiniMaxForCausalLM", "MiniMaxM2ForCausalLM", "MiniMaxM3VLForCausalLM", "JambaForCausalLM",
        "GraniteMoeForCausalLM", "GraniteMoeSWAForCausalLM", "GraniteMoeHybridForCausalLM",
        "GraniteMoeSharedForCausalLM", "GptOssForCausalLM", "FlexOlmoForCausalLM", "FlintForCausalLM",
        "Ernie4_5_MoeForCausalLM", "DbrxForCausalLM", "DeepseekV4ForCausalLM", "LagunaForCausalLM",
        "LaraMiniForCausalLM", "MellumForCausalLM",
    ), _standard_aux("router_aux_loss_coef")),
    "JetMoeForCausalLM": _standard_aux("aux_loss_coef"),
    "DogeForCausalLM": _doge_aux,
}


def auxiliary_loss(model: nn.Module) -> Optional[AuxiliaryLoss]:
    """The auxiliary term ``model``'s own forward adds to its loss, or None if it adds none.

    The classes in the table add it when their config sets ``output_router_logits``. Another
    class asking for router logits is refused if its modeling module has a load-balancing
    loss; one that reports an ``aux_loss`` anyway is caught by ``sdft.head_check``.
    """
    inner = unwrap(model)
    if not getattr(inner.config, "output_router_logits", False):
        return None
    build = _entry(_AUX_LOSS, model)
    if build is not None:
        return build(inner)
    if hasattr(importlib.import_module(type(inner).__module__), "load_balancing_loss_func"):
        # Its family computes a load-balancing loss, but how this class calls it is not known.
        raise UnsupportedLossTerm(
            f"{architecture_name(model)} asks for router logits (output_router_logits) and its family adds a "
            "load-balancing loss that the fused path does not know how this class computes; set "
            "output_router_logits=False to train without it")
    return None
