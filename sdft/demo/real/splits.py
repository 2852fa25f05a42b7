"""Train / held-out splits per relation, from the base model's SliCK classes.

Per relation: the Known facts are shuffled (seeded) and split into ``train_known`` (a share of
them, at most ``train_per_relation``) and ``heldout_known`` (the rest, at most
``heldout_per_relation``, never trained on: their accuracy drop is the forgetting); as many
Unknown facts as ``train_known`` got become ``train_unknown`` (the paper trains on equal numbers
of Known and Unknown). "Maybe" facts are in no split. Each split lists the relations in a fixed
order, each relation's facts in popularity order::

    splits, sizes = make_splits(facts, classes, SplitSpec())
    sizes["capital"]       # {"train_known": 30, "train_unknown": 30, "heldout_known": 44}
"""

from __future__ import annotations

import random
from dataclasses import dataclass

SPLIT_NAMES = ("train_known", "train_unknown", "heldout_known")


@dataclass(frozen=True)
class SplitSpec:
    train_share: float = 0.4          # of each relation's Known facts, to train on
    train_per_relation: int = 40      # at most this many train-known (and train-unknown) facts
    heldout_per_relation: int = 300   # at most this many held-out known facts
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.train_share < 1:
            raise ValueError(f"train_share must be in (0, 1), got {self.train_share}")
        if self.train_per_relation < 1 or self.heldout_per_relation < 1:
            raise ValueError(f"train_per_relation and heldout_per_relation must be >= 1, got "
                             f"{self.train_per_relation} and {self.heldout_per_relation}")


def make_splits(facts: dict[str, list[dict]], classes: dict[str, list[str]], spec: SplitSpec
                ) -> tuple[dict[str, list[dict]], dict[str, dict[str, int]]]:
    """``(splits, sizes)``: the three splits (each fact tagged with its base ``class``) and their
    sizes per relation. Raises ``ValueError`` when a relation has no Known fact to hold out or
    too few Unknown facts to match its train-known facts."""
    splits: dict[str, list[dict]] = {name: [] for name in SPLIT_NAMES}
    sizes: dict[str, dict[str, int]] = {}
    for relation, rows in facts.items():
        labels = classes[relation]
        if len(labels) != len(rows):
            raise ValueError(f"{relation}: {len(labels)} classes for {len(rows)} facts")
        rng = random.Random(f"{spec.seed}:{relation}")
        known = [i for i, c in enumerate(labels) if c == "known"]
        unknown = [i for i, c in enumerate(labels) if c == "unknown"]
        rng.shuffle(known)
        rng.shuffle(unknown)
        n_train = min(spec.train_per_relation, int(round(spec.train_share * len(known))))
        chosen = {"train_known": known[:n_train], "heldout_known": known[n_train:][:spec.heldout_per_relation],
                  "train_unknown": unknown[:n_train]}
        if not chosen["heldout_known"]:
            raise ValueError(f"{relation}: {len(known)} Known facts leave none to hold out")
        if len(chosen["train_unknown"]) < n_train:
            raise ValueError(f"{relation}: {len(unknown)} Unknown facts, {n_train} needed")
        for name, index in chosen.items():
            splits[name].extend({**rows[i], "class": labels[i]} for i in sorted(index))
        sizes[relation] = {name: len(chosen[name]) for name in SPLIT_NAMES}
    return splits, sizes
