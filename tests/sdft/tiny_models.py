"""Tiny randomly initialised causal LMs built from configs (no downloads)."""

from __future__ import annotations

import torch
import transformers as tf

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
