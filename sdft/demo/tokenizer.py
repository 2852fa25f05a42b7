"""The toy world's word-level tokenizer and its prompt format.

The prompt format is the one definition that pretraining, fine-tuning and evaluation share: the
model sees ``<bos> question`` (the tokenizer adds ``<bos>``) and must continue with
``answer <eos>``. :func:`format_prompt` and :func:`encode_example` are that definition, and
``sdft.evaluate.generate_answers(..., prompt_format=format_prompt)`` decodes from the same
prefix::

    tokenizer = build_tokenizer(world)
    ids, labels = encode_example(tokenizer, "where was bo ka lu born ?", "paris")
    batch = encode_rows(tokenizer, world.old_rows())     # right-padded, with labels
"""

from __future__ import annotations

from typing import Sequence

from torch import Tensor

from sdft.data import IGNORE_INDEX, PadCollator

from .world import ToyWorld

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)


def format_prompt(question: str) -> str:
    """The prompt text for a question; the tokenizer prepends ``<bos>``. Answer follows it."""
    return " ".join(question.split())


def encode_example(tokenizer, question: str, answer: str, *,
                   add_eos: bool = True) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one QA example: ``<bos> prompt answer [<eos>]``.

    ``labels`` is -100 on the prompt and the answer (and eos) ids elsewhere; unshifted, as Hugging
    Face causal LMs expect. The prompt ids are exactly what ``tokenizer(format_prompt(question))``
    gives, so a model trained on these decodes its answer from the same prefix at evaluation.
    """
    prompt_ids = tokenizer(format_prompt(question))["input_ids"]
    answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    if not answer_ids:
        raise ValueError(f"answer {answer!r} tokenizes to nothing")
    if add_eos:
        answer_ids = answer_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE_INDEX] * len(prompt_ids) + answer_ids


def encode_rows(tokenizer, rows: Sequence[dict], *, add_eos: bool = True) -> dict[str, Tensor]:
    """Encode and collate QA rows (``question``/``answer`` fields) into one right-padded batch."""
    examples = [encode_example(tokenizer, r["question"], r["answer"], add_eos=add_eos) for r in rows]
    return PadCollator(tokenizer.pad_token_id)([{"input_ids": ids, "labels": lab} for ids, lab in examples])


def build_tokenizer(world: ToyWorld, *, padding_side: str = "right"):
    """A word-level ``PreTrainedTokenizerFast`` over the world's vocabulary.

    Ids: ``<pad>`` 0, ``<bos>`` 1, ``<eos>`` 2, ``<unk>`` 3, then :meth:`ToyWorld.vocabulary`.
    Text is lowercased and split on whitespace and punctuation; ``<bos>`` is prepended to every
    encoded text (pass ``add_special_tokens=False`` to omit it). Round-trips through
    ``save_pretrained`` / ``AutoTokenizer.from_pretrained``.
    """
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    words = list(SPECIAL_TOKENS) + world.vocabulary()
    if len(set(words)) != len(words):
        raise ValueError("world vocabulary has duplicate words")
    vocab = {w: i for i, w in enumerate(words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS,
                                   pad_token=PAD, unk_token=UNK, padding_side=padding_side)
