"""Tests of sdft.demo.real.splits: per relation, disjoint splits of the right classes and sizes."""

from __future__ import annotations

import pytest

from sdft.demo.real.splits import SplitSpec, make_splits


def _facts(n: int, relation: str) -> list[dict]:
    return [{"id": f"{relation}.{i}", "relation": relation, "question": f"q{i}", "answer": f"a{i}"} for i in range(n)]


def test_splits_per_relation_are_disjoint_balanced_and_capped():
    facts = {"r1": _facts(100, "r1"), "r2": _facts(60, "r2")}
    classes = {"r1": ["known"] * 50 + ["maybe"] * 10 + ["unknown"] * 40,
               "r2": ["unknown", "known", "maybe"] * 20}
    splits, sizes = make_splits(facts, classes, SplitSpec(train_share=0.4, train_per_relation=15,
                                                          heldout_per_relation=30, seed=1))
    # r1: 50 known -> 15 train (cap of 20), 30 held out (cap of 35); r2: 20 known -> 8 and 12.
    assert sizes == {"r1": {"train_known": 15, "train_unknown": 15, "heldout_known": 30},
                     "r2": {"train_known": 8, "train_unknown": 8, "heldout_known": 12}}
    index = {r["id"]: c for rel in facts for r, c in zip(facts[rel], classes[rel])}
    ids = {name: [r["id"] for r in rows] for name, rows in splits.items()}
    assert not (set(ids["train_known"]) & set(ids["heldout_known"]))
    assert all(index[i] == "known" for i in ids["train_known"] + ids["heldout_known"])
    assert all(index[i] == "unknown" for i in ids["train_unknown"])
    assert all(r["class"] == index[r["id"]] for rows in splits.values() for r in rows)
    # Relations in order, each relation's facts in input order.
    for rows in splits.values():
        keys = [(r["relation"], int(r["id"].split(".")[1])) for r in rows]
        assert keys == sorted(keys)
    again, _ = make_splits(facts, classes, SplitSpec(train_share=0.4, train_per_relation=15,
                                                     heldout_per_relation=30, seed=1))
    other, _ = make_splits(facts, classes, SplitSpec(train_share=0.4, train_per_relation=15,
                                                     heldout_per_relation=30, seed=2))
    assert again == splits and other != splits


def test_splits_refuse_what_cannot_be_split():
    facts = {"r": _facts(10, "r")}
    with pytest.raises(ValueError, match="none to hold out"):
        make_splits(facts, {"r": ["unknown"] * 10}, SplitSpec())
    with pytest.raises(ValueError, match="1 Unknown facts, 4 needed"):
        make_splits(facts, {"r": ["known"] * 9 + ["unknown"]}, SplitSpec())
    with pytest.raises(ValueError, match="classes for 10 facts"):
        make_splits(facts, {"r": ["known"]}, SplitSpec())
    with pytest.raises(ValueError, match="train_share"):
        SplitSpec(train_share=1.0)
