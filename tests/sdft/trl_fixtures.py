"""A tiny local tokenizer (with a chat template that marks the assistant's turns), a tiny Llama
and small datasets in the three formats TRL's SFTTrainer takes: no downloads."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers as tf
from datasets import Dataset

from tests.sdft.train_fixtures import COLORS, NAMES, llama_config, word_level_tokenizer

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
    tok = word_level_tokenizer(WORDS)
    tok.chat_template = CHAT_TEMPLATE
    if path is not None:
        tok.save_pretrained(path)
    return tok


def model(vocab_size: int, seed: int = 0, dtype: torch.dtype = torch.float32):
    torch.manual_seed(seed)
    built = tf.AutoModelForCausalLM.from_config(llama_config(vocab_size))
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
