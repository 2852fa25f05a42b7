"""Closed-book QA evaluation: exact match, knowledge classification, forgetting.

Model-agnostic: any Hugging Face causal LM with its tokenizer, any rows with a question and an
answer field (the answer a string or a list of accepted aliases)::

    acc, n_correct, n = accuracy(model, tokenizer, rows, prompt_format=format_prompt)
    split, counts = classify_knowledge(model, tokenizer, rows, k=16, temperature=0.5)
    evaluator = ForgettingEval(tokenizer, world.splits(), prompt_format=format_prompt)
    evaluator(model, step=0)          # {"task": 1.0, "task_correct": 900, "task_n": 900, ...}
    evaluator.forgetting()            # drop of held-out known accuracy from start and from peak

``sdft train`` runs a :class:`ForgettingEval` on ``eval.heldout_file`` during training
(:class:`sdft.recipe.HeldOutForgetting`).

The metrics are the paper's (Kaplan et al., arXiv 2604.15574): accuracy on the training Known
facts ("task"), on the training Unknown facts ("new_facts") and on held-out Known facts
("old_facts"), whose drop during fine-tuning is the forgetting. Known / Unknown follow SliCK
(Gekhman et al., arXiv 2405.05904) in a reduced form: Known = the greedy answer is correct,
Unknown = neither the greedy answer nor any of k samples is, "maybe" = the rest.

A question becomes a prompt through ``prompt_format`` (identity by default) and the tokenizer's
own special tokens (e.g. ``<bos>``); the answer is the decoded continuation up to eos, cut at the
first newline. For the demo's toy world pass ``sdft.demo.tokenizer.format_prompt``, the same
function its training data is built with.
"""

from __future__ import annotations

import random
import re
import string
from typing import Callable, Optional, Sequence, Union

import torch

Answer = Union[str, Sequence[str]]
PromptFormat = Callable[[str], str]

# train/held-out split name -> metric name (the paper's three accuracies).
SPLIT_LABELS = {"train_known": "task", "train_unknown": "new_facts",
                "heldout_known": "old_facts"}
KNOWLEDGE_CLASSES = ("known", "maybe", "unknown")

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD rule)."""
    s = s.lower().translate(_PUNCTUATION)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match(pred: str, gold: Answer) -> bool:
    """Whether ``pred`` equals ``gold`` (or any of a list of gold aliases) after normalisation."""
    golds = [gold] if isinstance(gold, str) else list(gold)
    p = normalize_answer(pred)
    return any(p == normalize_answer(g) for g in golds)


# ---------------------------------------------------------------------------------------------
# Generation


def generate_answers(model, tokenizer, questions: Sequence[str], *,
                     prompt_format: Optional[PromptFormat] = None, max_new_tokens: int = 16,
                     batch_size: int = 64, do_sample: bool = False, temperature: float = 1.0,
                     num_samples: int = 1, seed: Optional[int] = None
                     ) -> Union[list[str], list[list[str]]]:
    """Answer each question with ``model.generate``: greedy by default, or sampled.

    Prompts are ``prompt_format(question)`` encoded with the tokenizer's special tokens and padded
    on the LEFT (so every prompt ends where generation starts; the tokenizer itself is not
    modified), batched by similar length. Generation stops at the tokenizer's (and the model
    generation config's) eos ids or after ``max_new_tokens``; only the new tokens are decoded,
    without special tokens, cut at the first newline and stripped.

    Sampling (``do_sample=True``) draws from the full distribution at ``temperature`` (top-k and
    top-p disabled), ``num_samples`` per question; with ``seed`` the draw is reproducible and the
    global RNG state is left as it was.

    Returns one string per question, or with ``num_samples > 1`` one list of ``num_samples``
    strings per question.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if num_samples > 1 and not do_sample:
        raise ValueError(f"num_samples={num_samples} needs do_sample=True (greedy is unique)")
    if do_sample and not temperature > 0:
        raise ValueError(f"sampling needs temperature > 0, got {temperature}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    questions = list(questions)
    if not questions:
        return []
    fmt = prompt_format or (lambda q: q)
    encoded = tokenizer([fmt(q) for q in questions])["input_ids"]
    if any(len(ids) == 0 for ids in encoded):
        raise ValueError("a prompt encodes to zero tokens; give the tokenizer a bos token or "
                         "a prompt_format that adds text")

    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = eos_ids[0] if eos_ids else 0
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, num_beams=1,
                      num_return_sequences=num_samples, pad_token_id=pad_id,
                      eos_token_id=eos_ids or None)
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_k=0, top_p=1.0, repetition_penalty=1.0)

    device = next(model.parameters()).device
    order = sorted(range(len(questions)), key=lambda i: len(encoded[i]))
    answers: list[list[str]] = [[] for _ in questions]
    was_training = model.training
    model.eval()
    try:
        with _seeded(seed, device):
            for start in range(0, len(order), batch_size):
                chunk = order[start:start + batch_size]
                input_ids, attention_mask = _left_pad([encoded[i] for i in chunk], pad_id)
                with torch.no_grad():
                    out = model.generate(input_ids=input_ids.to(device),
                                         attention_mask=attention_mask.to(device), **gen_kwargs)
                new_tokens = out[:, input_ids.shape[1]:].tolist()
                for j, ids in enumerate(new_tokens):
                    answers[chunk[j // num_samples]].append(
                        _decode_answer(tokenizer, ids, eos_ids))
    finally:
        model.train(was_training)
    return [a[0] for a in answers] if num_samples == 1 else answers


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for source in (tokenizer.eos_token_id,
                   getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if source is None:
            continue
        for i in ([source] if isinstance(source, int) else list(source)):
            if i not in ids:
                ids.append(int(i))
    return ids


def _left_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, width - len(s):] = torch.tensor(s, dtype=torch.long)
        attention_mask[i, width - len(s):] = 1
    return input_ids, attention_mask


def _decode_answer(tokenizer, ids: list[int], eos_ids: list[int]) -> str:
    # Finished sequences are padded with pad_token_id, which may not be an eos id: cut at eos.
    for k, tok in enumerate(ids):
        if tok in eos_ids:
            ids = ids[:k]
            break
    text = tokenizer.decode(ids, skip_special_tokens=True)
    return text.split("\n", 1)[0].strip()


class _seeded:
    """Fork the torch RNG (CPU and the model's CUDA device) and seed it; no-op for seed None."""

    def __init__(self, seed: Optional[int], device: torch.device):
        self.seed = seed
        self.devices = [device] if device.type == "cuda" else []
        self.fork = None

    def __enter__(self):
        if self.seed is not None:
            self.fork = torch.random.fork_rng(devices=self.devices)
            self.fork.__enter__()
            torch.manual_seed(self.seed)
        return self

    def __exit__(self, *exc):
        if self.fork is not None:
            return self.fork.__exit__(*exc)
        return False


# ---------------------------------------------------------------------------------------------
# Accuracy and knowledge classification


def accuracy(model, tokenizer, rows: Sequence[dict], *, question_key: str = "question",
             answer_key: str = "answer", **generate_kwargs) -> tuple[float, int, int]:
    """Greedy exact-match accuracy on ``rows``: ``(acc, n_correct, n)``; acc is NaN for no rows.

    ``generate_kwargs`` go to :func:`generate_answers` (``prompt_format``, ``batch_size``,
    ``max_new_tokens``); ``row[answer_key]`` may be a list of accepted aliases.
    """
    correct = correctness(model, tokenizer, rows, question_key=question_key,
                          answer_key=answer_key, **generate_kwargs)
    n, n_correct = len(correct), sum(correct)
    return (n_correct / n if n else float("nan")), n_correct, n


def correctness(model, tokenizer, rows: Sequence[dict], *, question_key: str = "question",
                answer_key: str = "answer", **generate_kwargs) -> list[bool]:
    """Per-row greedy exact match, in row order."""
    if generate_kwargs.get("do_sample"):
        raise ValueError("accuracy is greedy; use classify_knowledge for sampled answers")
    preds = generate_answers(model, tokenizer, [r[question_key] for r in rows], **generate_kwargs)
    return [exact_match(p, r[answer_key]) for p, r in zip(preds, rows)]


def classify_knowledge(model, tokenizer, rows: Sequence[dict], *, k: int = 16,
                       temperature: float = 0.5, seed: int = 0,
                       answer_fn: Optional[Callable] = None, question_key: str = "question",
                       answer_key: str = "answer", **generate_kwargs
                       ) -> tuple[dict[str, list[dict]], dict[str, int]]:
    """SliCK-style split of ``rows`` by what the model knows.

    - ``known``: the greedy answer is correct;
    - ``unknown``: neither the greedy answer nor any of ``k`` samples at ``temperature`` is;
    - ``maybe``: the greedy answer is wrong but a sample is right (report it apart).

    Only rows whose greedy answer is wrong are sampled. ``answer_fn(questions, *, do_sample,
    num_samples, temperature, seed)`` replaces the model (tests, cached predictions, an API); it
    returns one string per question, or one list of strings per question. By default it is
    :func:`generate_answers` on ``model``/``tokenizer`` with ``generate_kwargs``
    (``prompt_format``, ``batch_size``, ``max_new_tokens``).

    Returns ``(split, counts)``: ``split`` maps each class to its rows (the input dicts, in input
    order), ``counts`` maps each class to its size and ``"total"`` to ``len(rows)``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if answer_fn is None:
        def answer_fn(questions, **kw):
            return generate_answers(model, tokenizer, questions, **generate_kwargs, **kw)
    rows = list(rows)
    questions = [r[question_key] for r in rows]
    greedy = _as_lists(answer_fn(questions, do_sample=False, num_samples=1, temperature=None,
                                 seed=None), len(rows))
    greedy_ok = [exact_match(g[0], r[answer_key]) for g, r in zip(greedy, rows)]
    wrong = [i for i, ok in enumerate(greedy_ok) if not ok]
    sample_ok = {i: False for i in wrong}
    if wrong and k > 0:
        samples = _as_lists(answer_fn([questions[i] for i in wrong], do_sample=True,
                                      num_samples=k, temperature=temperature, seed=seed),
                            len(wrong))
        for i, preds in zip(wrong, samples):
            sample_ok[i] = any(exact_match(p, rows[i][answer_key]) for p in preds)
    split: dict[str, list[dict]] = {name: [] for name in KNOWLEDGE_CLASSES}
    for i, row in enumerate(rows):
        name = "known" if greedy_ok[i] else ("maybe" if sample_ok[i] else "unknown")
        split[name].append(row)
    counts = {name: len(split[name]) for name in KNOWLEDGE_CLASSES}
    counts["total"] = len(rows)
    return split, counts


def _as_lists(answers, n: int) -> list[list[str]]:
    answers = list(answers)
    if len(answers) != n:
        raise ValueError(f"answer_fn returned {len(answers)} answers for {n} questions")
    return [[a] if isinstance(a, str) else list(a) for a in answers]


# ---------------------------------------------------------------------------------------------
# Forgetting


def forgetting(history: Sequence[float]) -> dict[str, float]:
    """Forgetting from a held-out-known accuracy history (first value = start of fine-tuning).

    Returns ``start``, ``peak`` (max over the history), ``final`` (last value),
    ``drop_from_start = start - final`` and ``drop_from_peak = peak - final`` (the paper's
    figure), and ``max_drop_from_start = start - min``; in the history's units (fractions or
    points), positive = forgotten.
    """
    values = [float(v) for v in history]
    if not values:
        raise ValueError("forgetting needs a non-empty accuracy history")
    start, peak, final = values[0], max(values), values[-1]
    return {"start": start, "peak": peak, "final": final,
            "drop_from_start": start - final, "drop_from_peak": peak - final,
            "max_drop_from_start": start - min(values)}


class ForgettingEval:
    """The paper's three accuracies, evaluated on a model at each call and kept in ``history``.

    ``splits`` maps split names to QA rows; the names in :data:`SPLIT_LABELS`
    (``train_known``, ``train_unknown``, ``heldout_known``) are reported as ``task``,
    ``new_facts``, ``old_facts``; other names are reported as given. ``max_rows`` caps each
    split by a seeded random subset (the same rows at every call). Calling returns::

        {"step": step, "task": acc, "task_correct": c, "task_n": n, "new_facts": ..., ...}
    """

    def __init__(self, tokenizer, splits: dict[str, Sequence[dict]], *,
                 prompt_format: Optional[PromptFormat] = None, max_rows: Optional[int] = None,
                 seed: int = 0, batch_size: int = 256, max_new_tokens: int = 16,
                 question_key: str = "question", answer_key: str = "answer"):
        if not splits:
            raise ValueError("ForgettingEval needs at least one split")
        self.tokenizer = tokenizer
        self.rows: dict[str, list[dict]] = {}
        rng = random.Random(seed)
        for name, rows in splits.items():
            rows = list(rows)
            if max_rows is not None and len(rows) > max_rows:
                keep = sorted(rng.sample(range(len(rows)), max_rows))
                rows = [rows[i] for i in keep]
            self.rows[SPLIT_LABELS.get(name, name)] = rows
        self.generate_kwargs = dict(prompt_format=prompt_format, batch_size=batch_size,
                                    max_new_tokens=max_new_tokens)
        self.keys = dict(question_key=question_key, answer_key=answer_key)
        self.history: list[dict] = []

    def __call__(self, model, step: Optional[int] = None) -> dict:
        record: dict = {"step": step}
        for label, rows in self.rows.items():
            acc, n_correct, n = accuracy(model, self.tokenizer, rows, **self.keys,
                                         **self.generate_kwargs)
            record.update({label: acc, f"{label}_correct": n_correct, f"{label}_n": n})
        self.history.append(record)
        return record

    def forgetting(self, label: str = "old_facts") -> dict[str, float]:
        """:func:`forgetting` of ``label``'s accuracy over the calls so far."""
        return forgetting([r[label] for r in self.history])
