"""A tiny local model, tokenizer and JSONL dataset for end-to-end trainer tests (no downloads)."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
import transformers as tf
from tokenizers import Tokenizer, models, pre_tokenizers, processors

COLORS = ["red", "blue", "green", "gold", "grey", "pink"]
NAMES = [f"{a}{b}" for a in ("ka", "lo", "mi", "su", "te") for b in ("ra", "vo", "ne", "di")]


def free_port() -> int:
    """A local port nothing listens on now, for a process group (a fixed port can be taken on
    a shared machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def word_level_tokenizer(words: list) -> tf.PreTrainedTokenizerFast:
    """Whitespace-split words, ids 0-3 for [PAD] [BOS] [EOS] [UNK], [BOS] prepended."""
    vocab = {tok: i for i, tok in enumerate(["[PAD]", "[BOS]", "[EOS]", "[UNK]"] + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 1)])
    return tf.PreTrainedTokenizerFast(tokenizer_object=core, bos_token="[BOS]", eos_token="[EOS]",
                                      pad_token="[PAD]", unk_token="[UNK]")


def llama_config(vocab_size: int) -> tf.LlamaConfig:
    """A 2-layer Llama of width 32 with the token ids of :func:`word_level_tokenizer`."""
    return tf.LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, bos_token_id=1, eos_token_id=2,
                          pad_token_id=0, max_position_embeddings=64)


def build_tokenizer(path: Path) -> tf.PreTrainedTokenizerFast:
    tok = word_level_tokenizer(["what", "color", "is", "?"] + COLORS + NAMES)
    tok.save_pretrained(path)
    return tok


def build_model(path: Path, vocab_size: int, seed: int = 0) -> None:
    torch.manual_seed(seed)
    tf.AutoModelForCausalLM.from_config(llama_config(vocab_size)).save_pretrained(path)


def write_facts(path: Path, n: int = 20, bad_rows: int = 0) -> Path:
    """``n`` facts 'what color is NAME ?' -> COLOR; the first half marked known."""
    with open(path, "w") as f:
        for i in range(n):
            row = {"prompt": f"what color is {NAMES[i % len(NAMES)]} ?", "response": COLORS[(i * 7) % len(COLORS)],
                   "known": i < n // 2}
            f.write(json.dumps(row) + "\n")
        for i in range(bad_rows):
            f.write(json.dumps({"prompt": "what color is kara ?"} if i % 2 else {"prompt": "x", "response": " "}) + "\n")
    return path


def workspace(tmp: Path, n_facts: int = 20, bad_rows: int = 0) -> dict[str, str]:
    tok = build_tokenizer(tmp / "model")
    build_model(tmp / "model", len(tok))
    data = write_facts(tmp / "facts.jsonl", n_facts, bad_rows)
    return {"model": str(tmp / "model"), "data": str(data)}
