"""Tiny randomly initialised causal LMs built from configs (no downloads)."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import transformers as tf
from transformers import PretrainedConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

VOCAB = 101
_COMMON = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2, pad_token_id=0)

CONFIGS = {
    "llama": lambda: tf.LlamaConfig(**_COMMON),
    "qwen2": lambda: tf.Qwen2Config(**_COMMON),
    "mistral": lambda: tf.MistralConfig(**_COMMON),
    # Gemma 2: tied head and a final logit softcap (small, so that it bends the logits).
    "gemma2": lambda: tf.Gemma2Config(**_COMMON, head_dim=8, final_logit_softcapping=2.0),
    # GPT-2: tied embeddings, biases in the blocks, dropout switched off for exact comparisons.
    "gpt2": lambda: tf.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2),
    # Cohere multiplies the logits, Granite divides them: both must be folded in.
    "cohere": lambda: tf.CohereConfig(**_COMMON, logit_scale=0.5),
    "granite": lambda: tf.GraniteConfig(**_COMMON, logits_scaling=4.0),
}


def tiny_model(name: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    model = tf.AutoModelForCausalLM.from_config(CONFIGS[name]())
    with torch.no_grad():  # larger logits than the default init, so that the loss is not ~log V
        model.get_output_embeddings().weight.mul_(8.0)
    return model.to(dtype)


def perturbed_copy(model, scale: float = 0.05, seed: int = 1):
    """A teacher that differs from the student, as after a few steps of fine-tuning."""
    import copy

    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return other


def make_batch(B: int = 3, T: int = 9, seed: int = 0, padding_side: str = "right", prompt_len: int = 3):
    """Token ids with ragged lengths, padding (id 0) and prompt positions labelled -100."""
    g = torch.Generator().manual_seed(seed)
    lengths = [T - (i * 2) % T for i in range(B)]
    ids = torch.zeros(B, T, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if padding_side == "right" else slice(T - n, T)
        ids[i, sl] = torch.randint(3, VOCAB, (n,), generator=g)
        mask[i, sl] = 1
    labels = ids.masked_fill(mask == 0, -100)
    for i, n in enumerate(lengths):  # the prompt is not supervised
        start = 0 if padding_side == "right" else T - n
        labels[i, start: start + prompt_len] = -100
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ---------------------------------------------------------------------------------------------
# Any causal-LM class, built tiny from its own config class
# ---------------------------------------------------------------------------------------------
# The config of every class is shrunk by the same rules: each known size field present in the
# config's dataclass fields gets a small value, per-layer lists keep one layer of each kind,
# token ids are moved inside the small vocabulary, dropout and router jitter are switched off,
# and the knobs of logit transforms and auxiliary losses are moved away from identity so that
# a path that misses one shows it. A few configs need more than the generic rules
# (TINY_OVERRIDES).

LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "n_layers", "num_layers", "decoder_layers", "encoder_layers")
SMALL_VALUES: dict[str, object] = {
    **dict.fromkeys(("hidden_size", "d_model", "n_embd", "embed_dim", "hidden_dim", "dim", "word_embed_proj_dim"), 32),
    **dict.fromkeys(("num_attention_heads", "n_head", "n_heads", "num_heads", "encoder_attention_heads",
                     "decoder_attention_heads", "swa_num_attention_heads"), 4),
    **dict.fromkeys(("num_key_value_heads", "kv_n_heads", "num_kv_heads", "multi_query_group_num",
                     "swa_num_key_value_heads"), 2),
    **dict.fromkeys(("head_dim", "v_head_dim", "qk_nope_head_dim", "qk_head_dim", "kv_channels",
                     "attention_head_dim", "qk_rope_head_dim", "swa_head_dim"), 8),
    **dict.fromkeys(("q_lora_rank", "kv_lora_rank"), 16), "rotary_dim": 8,
    **dict.fromkeys(LAYER_COUNT_FIELDS, 2),
    **dict.fromkeys(("intermediate_size", "ffn_dim", "decoder_ffn_dim", "encoder_ffn_dim", "n_inner", "d_ff",
                     "ffn_hidden_size"), 64),
    **dict.fromkeys(("moe_intermediate_size", "shared_expert_intermediate_size", "expert_intermediate_size",
                     "moe_ffn_hidden_size"), 32),
    **dict.fromkeys(("vocab_size", "vocab_size_per_layer_input"), VOCAB),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"), 4),
    **dict.fromkeys(("num_experts_per_tok", "moe_top_k", "top_k", "num_selected_experts", "moe_k",
                     "num_experts_per_token"), 2),
    **dict.fromkeys(("n_shared_experts", "num_shared_experts", "n_group", "topk_group"), 1),
    **dict.fromkeys(("max_position_embeddings", "n_positions", "max_seq_len", "n_ctx"), 128),
    # State-space layers: expand (2) * hidden_size = n_heads * head_dim.
    **dict.fromkeys(("mamba_n_heads", "mamba_num_heads"), 4), **dict.fromkeys(("mamba_d_head", "mamba_head_dim"), 16),
    **dict.fromkeys(("n_groups", "mamba_n_groups"), 1), "time_step_rank": 4,
    **dict.fromkeys(("mamba_d_state", "state_size", "ssm_state_size", "d_state"), 8),
    **dict.fromkeys(("mamba_chunk_size", "chunk_size"), 16),
    # Linear-attention layers (gated delta rule and the like).
    **dict.fromkeys(("linear_num_key_heads", "linear_num_heads"), 2), "linear_num_value_heads": 4,
    **dict.fromkeys(("linear_key_head_dim", "linear_value_head_dim", "linear_head_dim"), 8),
    **dict.fromkeys(("sliding_window", "sliding_window_size"), 8),
    "num_kv_shared_layers": 0, "hidden_size_per_layer_input": 8,
    # Logit transforms and auxiliary losses, away from identity.
    "logits_scaling": 4.0, "logit_scale": 0.5, "lm_head_multiplier": 0.5, "logits_mup_width_multiplier": 2.0,
    **dict.fromkeys(("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap"), 3.0),
    "output_router_logits": True,
    **dict.fromkeys(("router_aux_loss_coef", "aux_loss_coef", "moe_loss_weight"), 0.5),
    "z_loss_coefficient": 0.5,
}
TOKEN_ID_FIELDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "sep_token_id": 2, "cls_token_id": 2,
                   "decoder_start_token_id": 2, "mask_token_id": 2, "unk_token_id": 2}

# What the generic rules cannot know (validated relations between fields, kwargs that are not fields).
TINY_OVERRIDES: dict[str, dict] = {
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16),
    "mamba2": dict(num_heads=8),
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]]),
    "gemma4_text": dict(global_head_dim=8),
    "dots3_note_text": dict(num_key_value_heads=4),
    "zaya": dict(num_experts_per_tok=1),
    "flint": dict(mlp_only_layers=[0]),
    "doge": dict(is_moe=True),  # its MoE variant (product-key routing: a square number of experts)  # the default makes both tiny layers dense: no router at all
    "reformer": dict(is_decoder=True, axial_pos_embds_dim=[16, 16], axial_pos_shape=[4, 4]),
}


def _one_of_each_kind(values: list) -> list:
    """Per-layer kinds (``layer_types``): one layer of each kind, in order of first appearance."""
    kinds = []
    for v in values:
        if v not in kinds:
            kinds.append(v)
    return kinds if len(kinds) >= 2 else list(values[:2])


def tiny_config_kwargs(config_class: type, overrides: Optional[dict] = None) -> dict:
    """Constructor arguments that make ``config_class`` tiny (see the rules above)."""
    default = config_class()
    fields = {f.name for f in dataclasses.fields(config_class)}
    kwargs = {name: SMALL_VALUES[name] for name in fields & set(SMALL_VALUES)}
    if "kv_lora_rank" in fields and "num_key_value_heads" in kwargs:  # latent attention: as many kv heads as heads
        kwargs["num_key_value_heads"] = kwargs["num_attention_heads"]
    for name in fields:
        if "dropout" in name or "pdrop" in name or "jitter" in name:  # no randomness in training mode
            value = getattr(default, name, None)
            if isinstance(value, float):
                kwargs[name] = 0.0
    for name in fields & set(TOKEN_ID_FIELDS):
        value = getattr(default, name, None)
        if isinstance(value, int) and value >= VOCAB:
            kwargs[name] = TOKEN_ID_FIELDS[name]
        elif isinstance(value, list):
            kwargs[name] = [v if v < VOCAB else TOKEN_ID_FIELDS[name] for v in value]
    _shrink_per_layer_lists(default, fields, kwargs)
    for key in config_class.sub_configs or {}:
        sub = getattr(default, key, None)
        if isinstance(sub, PretrainedConfig):
            try:
                kwargs[key] = type(sub)(**tiny_config_kwargs(type(sub)))
            except Exception:  # noqa: BLE001 - the sub-config keeps its default; the build may still work
                pass
    kwargs.update(overrides or {})
    return kwargs


def _shrink_per_layer_lists(default, fields: set, kwargs: dict) -> None:
    n_default = getattr(default, "num_hidden_layers", None)
    if not isinstance(n_default, int) or n_default <= 2:
        return
    per_layer = {}
    for name in fields - set(kwargs):
        value = getattr(default, name, None)
        if isinstance(value, list) and len(value) == n_default:
            per_layer[name] = value
    kinds = {n: _one_of_each_kind(v) for n, v in per_layer.items() if all(isinstance(x, str) for x in v)}
    n_layers = max([2] + [len(v) for v in kinds.values()])
    for name, value in per_layer.items():
        kwargs[name] = kinds.get(name, value[:n_layers])
    for name in fields & set(LAYER_COUNT_FIELDS):
        kwargs[name] = n_layers
    for name in fields - set(kwargs):  # lists of layer indices (moe_layers, ...)
        value = getattr(default, name, None)
        if ("layers" in name and isinstance(value, list) and value and all(type(x) is int for x in value)
                and max(value) < n_default):
            kwargs[name] = [x for x in value if x < n_layers]


def tiny_config(model_type: str, **overrides):
    """The config of ``model_type`` (a key of transformers' CONFIG_MAPPING), made tiny."""
    config_class = CONFIG_MAPPING[model_type]
    return config_class(**tiny_config_kwargs(config_class, {**TINY_OVERRIDES.get(model_type, {}), **overrides}))
