"""Tests of sdft.demo.real.report: category shifts and per-relation accuracy from run histories."""

from __future__ import annotations

import pytest

from sdft.demo.methods import build_methods
from sdft.demo.real.report import (by_relation, category_shifts, format_relations, format_shifts, knowledge_table,
                                   transitions)


def _record(old: str, new: str, old_rel: dict, new_rel: dict) -> dict:
    return {"classes": {"old_facts": old, "new_facts": new}, "old_facts_by_relation": old_rel,
            "new_facts_by_relation": new_rel}


def _run(seed: int, method: str, start: dict, middle: dict, end: dict) -> dict:
    return {"seed": seed, "method": method, "history": [start, middle, end]}


def test_transitions_count_each_fact_from_start_to_end():
    t = transitions("KKKMUU", "KMUKUK")
    assert t["known"] == {"known": 1, "maybe": 1, "unknown": 1}
    assert t["maybe"] == {"known": 1, "maybe": 0, "unknown": 0}
    assert t["unknown"] == {"known": 1, "maybe": 0, "unknown": 1}
    with pytest.raises(ValueError, match="different lengths"):
        transitions("KK", "K")


def test_shifts_and_relations_average_over_seeds():
    methods = build_methods(("sft", "known_only"), (), 0.5)
    rel = {"a": [2, 3], "b": [1, 1]}
    runs = [
        _run(0, "sft", _record("KKKK", "UU", {"a": [3, 3], "b": [1, 1]}, {"a": [0, 1], "b": [0, 1]}),
             _record("KKKU", "KU", {"a": [3, 3], "b": [0, 1]}, {"a": [1, 1], "b": [0, 1]}),
             _record("KKUU", "KK", rel, {"a": [1, 1], "b": [1, 1]})),
        _run(1, "sft", _record("KKKK", "UU", {"a": [3, 3], "b": [1, 1]}, {"a": [0, 1], "b": [0, 1]}),
             _record("KKKK", "KU", {"a": [3, 3], "b": [1, 1]}, {"a": [1, 1], "b": [0, 1]}),
             _record("KMKK", "KU", {"a": [2, 3], "b": [1, 1]}, {"a": [1, 1], "b": [0, 1]})),
        _run(0, "known_only", _record("KKKK", "UU", {"a": [3, 3], "b": [1, 1]}, {"a": [0, 1], "b": [0, 1]}),
             _record("KKKK", "UU", {"a": [3, 3], "b": [1, 1]}, {"a": [0, 1], "b": [0, 1]}),
             _record("KKKK", "UM", {"a": [3, 3], "b": [1, 1]}, {"a": [0, 1], "b": [0, 1]})),
    ]
    shifts = category_shifts(runs, methods)
    assert shifts["sft"]["old_facts"]["known"] == {"known": 2.5, "maybe": 0.5, "unknown": 1.0}
    assert shifts["sft"]["new_facts"]["unknown"] == {"known": 1.5, "maybe": 0.0, "unknown": 0.5}
    assert shifts["known_only"]["new_facts"]["unknown"] == {"known": 0.0, "maybe": 1.0, "unknown": 1.0}
    text = format_shifts(shifts)
    assert "| SFT (all parameters) | 62.5 | 12.5 | 25.0 | 0 of 0 | 75.0 | 0.0 | 25.0 |" in text
    relations = by_relation(runs, methods)
    a = relations["sft"]["relations"]["a"]
    assert (a["old_start"], a["old_end"], a["old_peak"], a["old_n"], a["new_end"], a["new_n"]) == (3, 2, 3, 3, 1, 1)
    assert relations["sft"]["relations"]["b"]["old_end"] == 1.0 and relations["sft"]["relations"]["b"]["new_end"] == 0.5
    assert "100.0 -> 66.7 (of 3)" in format_relations(relations)


def test_knowledge_table_lists_classes_and_splits():
    text = knowledge_table({"capital": {"known": 30, "maybe": 10, "unknown": 60, "total": 100}},
                           {"capital": {"train_known": 12, "train_unknown": 12, "heldout_known": 18}})
    assert "| capital | 100 | 30 (30.0%) | 10 | 60 | 12 | 12 | 18 |" in text
