"""A tiny local tokenizer (with a chat template that marks the assistant's turns), a tiny Llama
and small datasets in the three formats TRL's SFTTrainer takes: no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from datasets import Dataset
from tokenizers import Tokenizer, models, pre_tokenizers, processors

COLORS = ["red", "blue", "green", "gold", "grey", "pink"]
NAMES = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te") for b in ("ra", "vo", "ne", "di")]
WORDS = ["what", "color", "is", "?", "it", "the", "of", "user", "assistant", ":"] + COLORS + NAMES

# Role, colon, content, end of turn; the assistant's content and its end-of-turn token inside
# {% generation %} markers, so that assistant_only_loss can find them.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : "
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }} [EOS]{% endgeneration %}"
    "{% else %}{{ message['content'] }} [EOS]{% endif %} {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def tokenizer(path: Path | None = None) -> tf.PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + WORDS)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]",
                                     pad_token="[PAD]", unk_token="[UNK]")
    tok.chat_template = CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(path)
    return tok


def model(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    config = tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                            pad_token_id=0, max_position_embeddings=64)
    built = tf.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # logits well away from uniform, so that the losses are not ~log V
        built.get_output_embeddings().weight.mul_(8.0)
    return built.to(dtype)


def _fact(i: int) -> tuple[str, str]:
    return f"what color is {NAMES[i % len(NAMES)]} ?", COLORS[(i * 7) % len(COLORS)]


def prompt_completion(n: int = 12, start: int = 0) -> Dataset:
    rows = []
    for i in range(start, start + n):
        question, answer = _fact(i)
        rows.append({"prompt": question, "completion": " " + " ".join(["it", "is"][: i % 3] + [answer])})
    return Dataset.from_list(rows)


def language_modelling(n: int = 12, start: int = 0) -> Dataset:
    return Dataset.from_list([{"text": f"{q} {a}"} for q, a in map(_fact, range(start, start + n))])


def conversational(n: int = 12, start: int = 0) -> Dataset:
    rows = []
    for i in range(start, start + n):
        question, answer = _fact(i)
        rows.append({"messages": [{"role": "user", "content": question},
                                  {"role": "assistant", "content": " ".join(["it", "is"][: i % 3] + [answer])}]})
    return Dataset.from_list(rows)
