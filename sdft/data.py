"""Training data: load rows, tokenize with prompt tokens masked, report what was cut or dropped.

Rows are either ``{prompt, response}`` or chat ``{messages: [{role, content}, ...]}`` (rendered
with the tokenizer's chat template; the last assistant message is the response). Nothing is
dropped or truncated silently: :class:`DataReport` counts it, and too many bad rows fail the run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import torch

from .config import DataConfig

IGNORE_INDEX = -100  # the default label of unsupervised tokens; a run uses its loss.ignore_index
_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


class DataError(ValueError):
    """The data cannot be used as configured."""


class BadRow(NamedTuple):
    """A line of a JSONL file that is not a JSON object: counted as a bad row, not fatal."""

    where: str  # file:line
    reason: str


@dataclass
class DataReport:
    rows: int = 0
    kept: int = 0
    malformed: int = 0
    missing_fields: int = 0
    empty_response: int = 0
    prompt_too_long: int = 0
    truncated: int = 0
    examples: list[str] = field(default_factory=list)  # a few reasons, for the error message

    @property
    def bad(self) -> int:
        return self.malformed + self.missing_fields + self.empty_response + self.prompt_too_long

    def __str__(self) -> str:
        return (f"{self.rows} rows: {self.kept} kept, {self.malformed} malformed, {self.missing_fields} missing fields, "
                f"{self.empty_response} empty responses, {self.prompt_too_long} prompts too long, "
                f"{self.truncated} responses truncated")


def load_rows(cfg: DataConfig):
    """The rows of a local file (:func:`read_rows`) or of a hub dataset."""
    import datasets

    if not cfg.train_file:
        return datasets.load_dataset(cfg.dataset, split=cfg.split)
    return read_rows(Path(cfg.train_file), "data.train_file")


def read_rows(path: Path, key: str):
    """The rows of a local file, by extension; ``key`` names the setting it came from in errors.

    A ``.jsonl`` file is read line by line: a line that is not a JSON object becomes a
    :class:`BadRow` naming the file and line, counted against ``data.max_bad_fraction`` like any
    other bad row. Other formats go through ``datasets``; a file it cannot read fails here,
    named. A missing or empty file fails too, before any model is loaded.
    """
    import datasets

    fmt = _FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise DataError(f"{key}: unsupported extension {path.suffix!r} (use {', '.join(_FORMATS)})")
    if not path.is_file():
        raise DataError(f"{key}: {path} does not exist")
    if path.suffix.lower() == ".jsonl":
        rows = _read_jsonl(path)
    else:
        try:
            rows = datasets.load_dataset(fmt, data_files=str(path), split="train")
        except Exception as err:  # datasets raises many types; the message is what matters
            raise DataError(f"{key}: cannot read {path} as {fmt}: {err}") from err
    if len(rows) == 0:
        raise DataError(f"{key}: {path} has no rows")
    return rows


def heldout_qa_rows(path: Path, cfg: DataConfig) -> list[dict]:
    """The rows of ``eval.heldout_file`` as question / answer pairs: each row's
    ``cfg.prompt_field`` and ``cfg.response_field``, as the training rows name them. A row that
    is malformed or lacks either field fails, named (the set is small and scored as a whole)."""
    rows = []
    for number, row in enumerate(read_rows(path, "eval.heldout_file"), 1):
        if isinstance(row, BadRow):
            raise DataError(f"eval.heldout_file: {row.where}: {row.reason}")
        prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
        if prompt is None or response is None or not str(response).strip():
            raise DataError(f"eval.heldout_file: row {number} of {path} needs {cfg.prompt_field!r} and a non-empty "
                            f"{cfg.response_field!r} (held-out rows are prompt/response pairs), got keys {sorted(row)}")
        rows.append({"question": str(prompt), "answer": str(response)})
    return rows


def _read_jsonl(path: Path) -> list:
    rows: list = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                rows.append(BadRow(f"{path}:{number}", f"not valid JSON ({err.msg}, column {err.colno})"))
                continue
            rows.append(row if isinstance(row, dict) else BadRow(f"{path}:{number}", "not a JSON object"))
    return rows


def _prompt_and_response(row: dict, cfg: DataConfig, tokenizer) -> tuple[Optional[list[int]], Optional[list[int]], str]:
    """Token ids of prompt and response, or ``(None, None, reason)`` for a bad row."""
    messages = row.get(cfg.messages_field)
    if messages:
        if not isinstance(messages, list) or messages[-1].get("role") != "assistant":
            return None, None, "missing"
        prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(prompt):
            return None, None, "missing"
        response = full[len(prompt):]
        if not messages[-1].get("content", "").strip():
            return None, None, "empty"
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
        return prompt_ids, response_ids, ""
    prompt, response = row.get(cfg.prompt_field), row.get(cfg.response_field)
    if prompt is None or response is None:
        return None, None, "missing"
    if not str(response).strip():
        return None, None, "empty"
    prompt_ids = tokenizer(str(prompt), add_special_tokens=True)["input_ids"]
    response_ids = tokenizer(str(response), add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None:
        response_ids = response_ids + [tokenizer.eos_token_id]
    return prompt_ids, response_ids, ""


def tokenize_rows(rows, tokenizer, cfg: DataConfig,
                  ignore_index: int = IGNORE_INDEX) -> tuple[list[dict[str, Any]], DataReport]:
    """Examples ``{id, input_ids, labels, length, known}`` with ``ignore_index`` (the loss's,
    ``loss.ignore_index``) on prompt tokens.

    A response longer than the room left by its prompt is truncated (counted); a prompt that
    leaves no room for one response token makes the row bad (counted). An ``ignore_index``
    that is a token id of the tokenizer is refused: response tokens with that id would go
    unsupervised.
    """
    if 0 <= ignore_index < len(tokenizer):
        raise DataError(f"loss.ignore_index {ignore_index} is a token id of the tokenizer (ids 0..{len(tokenizer) - 1}): "
                        "response tokens with that id would be ignored; use a negative value such as -100")
    report = DataReport()
    examples = []
    for i, row in enumerate(rows):
        report.rows += 1
        if isinstance(row, BadRow):
            report.malformed += 1
            report.examples.append(f"{row.where}: {row.reason}")
            continue
        prompt_ids, response_ids, reason = _prompt_and_response(row, cfg, tokenizer)
        if reason == "missing":
            report.missing_fields += 1
            report.examples.append(f"row {i}: missing {cfg.prompt_field!r}/{cfg.response_field!r} or {cfg.messages_field!r}")
            continue
        if reason == "empty" or not response_ids:
            report.empty_response += 1
            report.examples.append(f"row {i}: empty response")
            continue
        room = cfg.max_length - len(prompt_ids)
        if room < 1:
            report.prompt_too_long += 1
            report.examples.append(f"row {i}: prompt has {len(prompt_ids)} tokens, max_length is {cfg.max_length}")
            continue
        if len(response_ids) > room:
            report.truncated += 1
            response_ids = response_ids[:room]
        ids = prompt_ids + response_ids
        known = row.get(cfg.known_field) if cfg.known_field else None
        examples.append({
            "id": str(row[cfg.id_field]) if cfg.id_field else str(i),
            "input_ids": ids,
            "labels": [ignore_index] * len(prompt_ids) + response_ids,
            "length": len(ids),
            "known": bool(known) if known is not None else False,
        })
    report.kept = len(examples)
    if report.rows and not report.kept:
        raise DataError(f"no usable row: {report}; e.g. " + "; ".join(report.examples[:3]))
    if report.rows and report.bad / report.rows > cfg.max_bad_fraction:
        raise DataError(
            f"{report.bad} of {report.rows} rows are unusable (more than data.max_bad_fraction="
            f"{cfg.max_bad_fraction}): {str(report)}; e.g. " + "; ".join(report.examples[:3])
        )
    return examples, report


class PadCollator:
    """Right-pads ``input_ids``/``labels`` into a batch with an attention mask; keeps ``id``.
    Padded labels are ``ignore_index`` (the loss's)."""

    def __init__(self, pad_token_id: int, ignore_index: int = IGNORE_INDEX):
        self.pad_token_id, self.ignore_index = pad_token_id, ignore_index

    def __call__(self, rows: list[dict]) -> dict:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(rows), width), self.ignore_index, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            labels[i, :n] = torch.as_tensor(r["labels"])
            mask[i, :n] = 1
        batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
        if "id" in rows[0]:
            batch["id"] = [r["id"] for r in rows]
        return batch
