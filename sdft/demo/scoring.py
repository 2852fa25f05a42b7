"""Exact match on the toy world's splits by one teacher-forced pass, with counts.

Every toy answer is one word (one token) plus ``<eos>``, so greedy decoding reproduces the gold
continuation exactly when each of its tokens is the argmax after the gold prefix: one forward
pass gives the greedy exact match that ``sdft.evaluate.accuracy`` measures by generation, at a
fraction of the cost. Fine-tuning runs evaluate every few epochs, so this cost matters.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sdft.data import IGNORE_INDEX
from sdft.evaluate import SPLIT_LABELS

from .tokenizer import encode_rows


@torch.no_grad()
def teacher_forced_exact_match(model, batch: dict[str, Tensor], chunk: int = 1024) -> Tensor:
    """Per-example bool [B]: every supervised token is the argmax given the gold prefix.

    For ``encode_example`` batches this equals greedy-decoding exact match (greedy reproduces the
    gold ``answer <eos>`` iff each of its tokens is the argmax after the gold prefix), at the cost
    of one forward pass.
    """
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, batch["input_ids"].shape[0], chunk):
            ids = batch["input_ids"][start:start + chunk]
            mask = batch["attention_mask"][start:start + chunk]
            labels = batch["labels"][start:start + chunk]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
            target = labels[:, 1:]
            ok = (logits.argmax(-1) == target) | (target == IGNORE_INDEX)
            out.append(ok.all(dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out)


class SplitAccuracy:
    """The paper's three accuracies of a model, with counts, on fixed QA splits.

    ``splits`` maps split names to QA rows; the names in ``sdft.evaluate.SPLIT_LABELS``
    (``train_known``, ``train_unknown``, ``heldout_known``) are reported as ``task``,
    ``new_facts`` and ``old_facts``, other names as given. Calling returns::

        {"task": 1.0, "task_correct": 900, "task_n": 900, "new_facts": ..., "old_facts": ...}

    An empty split is reported as NaN with counts 0.
    """

    def __init__(self, tokenizer, splits: dict[str, list[dict]]):
        self.batches = {SPLIT_LABELS.get(name, name): encode_rows(tokenizer, rows) if rows else None
                        for name, rows in splits.items()}

    def __call__(self, model) -> dict:
        record: dict = {}
        for label, batch in self.batches.items():
            if batch is None:
                record.update({label: float("nan"), f"{label}_correct": 0, f"{label}_n": 0})
                continue
            ok = teacher_forced_exact_match(model, batch)
            n, correct = int(ok.numel()), int(ok.sum())
            record.update({label: correct / n, f"{label}_correct": correct, f"{label}_n": n})
        return record
