"""Packed and padding-free batches: what the decoder needs to keep documents apart, and where
each document starts.

A padding-free batch (TRL's ``padding_free=True``, or ``packing=True`` with its default BFD
strategy; transformers' ``DataCollatorWithFlattening``) concatenates documents into one row:
``position_ids`` restart at 0 at each document, there is no ``attention_mask``, and the
collator may add the boundaries in the form flash-attention's variable-length kernels read
(``cu_seq_lens_q``/``_k``, ``max_length_q``/``_k``) and a per-token document index for the short
convolutions of linear-attention layers (``seq_idx``). With SDPA or eager attention transformers
builds a block-diagonal mask from the ``position_ids``. A decoder called without them lets
documents attend to each other and numbers positions across them: every such key must reach
student and teacher alike.

A target never crosses a document boundary: the hidden state of a document's last token does
not predict the next document's first token.
"""

from __future__ import annotations

from typing import Mapping, Optional

import torch
from torch import Tensor

# Batch keys, besides input_ids and attention_mask, that the decoder's forward reads to place
# tokens and separate documents. Other keys of a batch (labels, example ids) never reach it.
SEQUENCE_KEYS = ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx")


def sequence_kwargs(batch: Mapping[str, object]) -> dict[str, object]:
    """The batch's :data:`SEQUENCE_KEYS` that are present, for the decoder's forward."""
    return {key: batch[key] for key in SEQUENCE_KEYS if batch.get(key) is not None}


def document_starts(batch: Mapping[str, Tensor]) -> Optional[Tensor]:
    """``[B, T]`` bool, True where a document starts (``position_ids == 0``), or None when the
    batch carries no ``position_ids``."""
    position_ids = batch.get("position_ids")
    if position_ids is None:
        return None
    input_ids = batch["input_ids"]
    if position_ids.shape != input_ids.shape:
        raise ValueError(
            f"position_ids have shape {tuple(position_ids.shape)} but input_ids {tuple(input_ids.shape)}: the loss "
            "reads document boundaries from [B, T] position_ids aligned with input_ids (0 where a document starts)")
    return position_ids == 0


def document_spans(batch: Mapping[str, Tensor], row: int) -> list[tuple[int, int]]:
    """``[(start, end), ...]``: the documents of one row, as column ranges over its non-pad tokens.

    Without ``position_ids`` the row's non-pad tokens are one document. A padding-free row
    padded to a multiple of some length ends in pad tokens at position 0: each is a document of
    one token (and so holds no target).
    """
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    valid = torch.ones(input_ids.shape[1], dtype=torch.bool) if mask is None else mask[row].bool().cpu()
    starts = document_starts(batch)
    columns = valid.nonzero().flatten().tolist()
    if not columns:
        return []
    new_document = set() if starts is None else set(starts[row].cpu().nonzero().flatten().tolist())
    spans, begin, previous = [], columns[0], columns[0]
    for column in columns[1:]:
        if column in new_document or column != previous + 1:  # a restart, or a gap of padding
            spans.append((begin, previous + 1))
            begin = column
        previous = column
    spans.append((begin, previous + 1))
    return spans
