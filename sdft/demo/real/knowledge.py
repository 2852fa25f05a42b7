"""What a model knows, SliCK-style, from one teacher-forced pass per fact.

SliCK (Gekhman et al., arXiv 2405.05904) labels a question by decoding: Known when the greedy
answer is right, Unknown when neither the greedy answer nor any of ``k`` answers sampled at a
temperature is, "maybe" in between (the reduced form of ``sdft.evaluate.classify_knowledge``).
Here an answer is right when it is exactly the gold tokens `` answer\\n``, and both outcomes
follow from the logits along the gold continuation, without generating:

- greedy decoding gives the gold tokens iff each is the argmax after the gold prefix;
- one sample at temperature T gives them with probability ``p = prod_i softmax(z_i / T)[y_i]``,
  so "one of ``k`` samples is right" is an event of probability ``1 - (1 - p)^k``, drawn here
  with a seeded generator: the same distribution as sampling ``k`` answers and checking them,
  at the cost of one forward pass instead of ``k`` generations.

(A sample that spells the answer in other tokens, " Par" + "is", counts as wrong; with a BPE
vocabulary such samples are rare.) The same pass is the exact-match accuracy the study tracks per
epoch, so classification and evaluation share one criterion::

    scores = answer_scores(model, tokenizer, rows, prompt_format=few_shot_format(shots))
    classes = knowledge_classes(scores, k=16, temperature=0.5, seed=0)   # "known" / "maybe" / ...
    SplitScores(tokenizer, splits)(model)      # {"task": 0.97, "task_correct": ..., "old_facts": ...}
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from sdft.data import IGNORE_INDEX, PadCollator
from sdft.evaluate import KNOWLEDGE_CLASSES, SPLIT_LABELS
from sdft.model_head import final_hidden_states, head_spec

from .prompts import encode_example, format_prompt


@dataclass
class AnswerScores:
    """Per fact, along its gold answer tokens (``[N]`` each, CPU):

    ``greedy``: bool, every answer token is the argmax after the gold prefix (greedy decoding
    reproduces the answer); ``log_p``: float64, ``sum_i log softmax(z_i / T)[y_i]`` at each
    temperature T of ``temperatures`` (a dict T -> tensor).
    """

    greedy: Tensor
    log_p: dict[float, Tensor]


@torch.no_grad()
def answer_scores(model, tokenizer, rows: Sequence[dict], *, prompt_format: Callable[[str], str] = format_prompt,
                  temperatures: Sequence[float] = (), batch_size: int = 64) -> AnswerScores:
    """Score each row's gold answer after ``prompt_format(question)``: one forward pass per batch,
    the LM head applied to the answer positions only."""
    for t in temperatures:
        if not t > 0:
            raise ValueError(f"temperatures must be > 0, got {list(temperatures)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token")
    examples = [encode_example(tokenizer, r["question"], r["answer"], prompt_format=prompt_format) for r in rows]
    collate = PadCollator(tokenizer.pad_token_id)
    head = head_spec(model)
    greedy, log_p = [], {t: [] for t in temperatures}
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start:start + batch_size]
            batch = collate([{"input_ids": ids, "labels": labels} for ids, labels in chunk])
            hidden = final_hidden_states(model, batch["input_ids"], batch["attention_mask"])
            # Position j predicts token j + 1: the answer tokens' logits sit one place earlier.
            target = batch["labels"][:, 1:]
            where = target != IGNORE_INDEX
            logits = head.logits(hidden[:, :-1][where]).float()      # [answer tokens, V]
            gold = target[where]
            row = torch.arange(target.shape[0]).unsqueeze(1).expand_as(target)[where]
            n = target.shape[0]
            hit = (logits.argmax(-1) == gold).to(torch.int64)
            greedy.append(torch.zeros(n, dtype=torch.int64).index_add_(0, row, hit) == where.sum(1))
            for t in temperatures:
                token_lp = torch.log_softmax(logits.double() / t, dim=-1).gather(1, gold[:, None]).squeeze(1)
                log_p[t].append(torch.zeros(n, dtype=torch.float64).index_add_(0, row, token_lp))
    finally:
        model.train(was_training)
    if not examples:
        return AnswerScores(torch.zeros(0, dtype=torch.bool), {t: torch.zeros(0, dtype=torch.float64)
                                                               for t in temperatures})
    return AnswerScores(torch.cat(greedy), {t: torch.cat(v) for t, v in log_p.items()})


def knowledge_classes(scores: AnswerScores, *, k: int, temperature: float, seed: int) -> list[str]:
    """``"known"`` (greedy right), ``"maybe"`` (greedy wrong, one of ``k`` samples at
    ``temperature`` right) or ``"unknown"`` per fact; the sample outcome is drawn from its exact
    probability with a generator seeded by ``seed`` (see the module docstring)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if temperature not in scores.log_p:
        raise ValueError(f"no scores at temperature {temperature}; scored at {sorted(scores.log_p)}")
    p = scores.log_p[temperature].exp()
    # P(at least one of k samples right) = 1 - (1 - p)^k, computed without cancellation.
    p_any = -torch.expm1(k * torch.log1p(-p.clamp(max=1.0))) if k else torch.zeros_like(p)
    draw = torch.rand(p.shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return ["known" if g else ("maybe" if u < q else "unknown")
            for g, u, q in zip(scores.greedy.tolist(), draw.tolist(), p_any.tolist())]


def class_counts(classes: Sequence[str]) -> dict[str, int]:
    """``{"known": ..., "maybe": ..., "unknown": ..., "total": ...}``."""
    counts = {name: 0 for name in KNOWLEDGE_CLASSES}
    for c in classes:
        counts[c] += 1
    counts["total"] = len(classes)
    return counts


class SplitScores:
    """The paper's three accuracies of a model on fixed QA splits, with counts, the SliCK classes
    of every fact and the accuracy per relation, from one pass (zero-shot prompts).

    ``splits`` maps split names to QA rows; ``train_known``, ``train_unknown`` and
    ``heldout_known`` are reported as ``task``, ``new_facts`` and ``old_facts`` (other names as
    given). Calling returns the fields ``sdft.demo.report`` reads, plus classes and relations::

        {"task": 0.97, "task_correct": 87, "task_n": 90, "task_classes": {"known": 87, ...},
         "task_by_relation": {"capital": [30, 32], ...}, "new_facts": ..., "old_facts": ...}

    With ``keep_classes`` the record also holds ``classes``: each split's per-fact class list,
    in row order (for the category shifts of a run's first and last evaluation).
    """

    def __init__(self, tokenizer, splits: dict[str, list[dict]], *, k: int, temperature: float, seed: int,
                 batch_size: int = 64):
        self.tokenizer, self.k, self.temperature, self.seed = tokenizer, k, temperature, seed
        self.batch_size = batch_size
        self.splits = {SPLIT_LABELS.get(name, name): rows for name, rows in splits.items()}

    def __call__(self, model, keep_classes: bool = False) -> dict:
        record: dict = {}
        every: dict[str, list[str]] = {}
        for label, rows in self.splits.items():
            scores = answer_scores(model, self.tokenizer, rows, temperatures=(self.temperature,),
                                   batch_size=self.batch_size)
            classes = knowledge_classes(scores, k=self.k, temperature=self.temperature, seed=self.seed)
            n, correct = len(rows), int(scores.greedy.sum())
            by_relation: dict[str, list[int]] = {}
            for row, ok in zip(rows, scores.greedy.tolist()):
                entry = by_relation.setdefault(row["relation"], [0, 0])
                entry[0] += int(ok)
                entry[1] += 1
            record.update({label: correct / n if n else math.nan, f"{label}_correct": correct, f"{label}_n": n,
                           f"{label}_classes": class_counts(classes), f"{label}_by_relation": by_relation})
            every[label] = classes
        if keep_classes:
            record["classes"] = every
        return record


def split_by_class(rows: Sequence[dict], classes: Sequence[str]) -> dict[str, list[dict]]:
    """Rows grouped by class, in input order."""
    out: dict[str, list[dict]] = {name: [] for name in KNOWLEDGE_CLASSES}
    for row, c in zip(rows, classes):
        out[c].append(row)
    return out

