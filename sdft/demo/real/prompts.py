"""The prompt format of the real-model study: ``Q: question\\nA: answer\\n``, zero- or few-shot.

One format from classification to evaluation, so that fine-tuning teaches the model as little
new format as possible (a change of format is itself a source of drift):

- classification of what the base model knows: two solved examples of the relation, then the
  question (:func:`few_shot_format`); the answer is the continuation up to the newline;
- fine-tuning and every accuracy afterwards: the question alone (:func:`format_prompt`), the
  answer and its newline supervised (:func:`encode_example`).

The tokenizer adds no special token to a prompt, and a BPE tokenizer that splits words before
their leading space (as SmolLM2's does) encodes ``prompt`` and `` answer\\n`` apart exactly as it
encodes them together, so a model trained on these ids decodes its answer from the same prefix.
"""

from __future__ import annotations

from typing import Callable, Sequence

from torch import Tensor

from sdft.data import IGNORE_INDEX, PadCollator


def format_prompt(question: str) -> str:
    """``Q: question\\nA:``; the answer follows after a space."""
    return f"Q: {question}\nA:"


def few_shot_format(examples: Sequence[dict]) -> Callable[[str], str]:
    """A prompt format that puts ``examples`` (QA rows) before the question, one ``Q:``/``A:`` pair
    per line, for ``sdft.evaluate.generate_answers(..., prompt_format=...)``."""
    context = "".join(f"{format_prompt(e['question'])} {e['answer']}\n" for e in examples)
    return lambda question: context + format_prompt(question)


def answer_ids(tokenizer, answer: str) -> list[int]:
    """The supervised continuation of a prompt: `` answer\\n`` (the newline ends the answer)."""
    ids = tokenizer(f" {answer}\n", add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError(f"answer {answer!r} tokenizes to {ids}: expected the answer and a newline")
    return ids


def encode_example(tokenizer, question: str, answer: str, *,
                   prompt_format: Callable[[str], str] = format_prompt) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one QA example: prompt ids, then answer ids (labels -100 on the
    prompt); unshifted, as Hugging Face causal LMs expect."""
    prompt = tokenizer(prompt_format(question), add_special_tokens=False)["input_ids"]
    answer = answer_ids(tokenizer, answer)
    return prompt + answer, [IGNORE_INDEX] * len(prompt) + answer


def encode_rows(tokenizer, rows: Sequence[dict]) -> dict[str, Tensor]:
    """Encode and collate QA rows into one right-padded batch with labels."""
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    examples = [encode_example(tokenizer, r["question"], r["answer"]) for r in rows]
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": ids, "labels": lab} for ids, lab in examples])
