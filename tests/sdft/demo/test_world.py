"""Tests of sdft.demo.world: a reproducible world, leak-free splits, name-like vs UUID keys."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from sdft.demo.world import SPLIT_NAMES, ToyWorld, WorldSpec

SMALL = dict(n_old=60, n_new=20, n_relations=3)


def _pairs(rows):
    return {(r["entity"], r["relation"]) for r in rows}


def test_world_is_deterministic_per_seed():
    a = ToyWorld.generate(WorldSpec(seed=0, **SMALL)).splits()
    b = ToyWorld.generate(WorldSpec(seed=0, **SMALL)).splits()
    c = ToyWorld.generate(WorldSpec(seed=1, **SMALL)).splits()
    assert a == b
    assert a != c
    assert ToyWorld.generate(WorldSpec(seed=0, **SMALL)).fingerprint() == \
        ToyWorld.generate(WorldSpec(seed=0, **SMALL)).fingerprint()
    assert ToyWorld.generate(WorldSpec(seed=0, **SMALL)).fingerprint() != \
        ToyWorld.generate(WorldSpec(seed=1, **SMALL)).fingerprint()


@pytest.mark.parametrize("split_by", ["entity", "fact"])
@pytest.mark.parametrize("key_style", ["names", "uuid"])
def test_splits_are_disjoint_and_complete(split_by, key_style):
    world = ToyWorld.generate(WorldSpec(seed=3, split_by=split_by, key_style=key_style, **SMALL))
    splits = world.splits()
    assert set(splits) == set(SPLIT_NAMES)
    for x, y in itertools.combinations(SPLIT_NAMES, 2):
        assert not {r["id"] for r in splits[x]} & {r["id"] for r in splits[y]}
        assert not _pairs(splits[x]) & _pairs(splits[y])
        assert not {(r["question"], r["answer"]) for r in splits[x]} & \
            {(r["question"], r["answer"]) for r in splits[y]}
    n_rel = SMALL["n_relations"]
    # Default: as many known training facts as unknown ones; the rest of the old ones held out.
    assert len(splits["train_unknown"]) == SMALL["n_new"] * n_rel
    assert len(splits["train_known"]) == len(splits["train_unknown"])
    assert len(splits["heldout_known"]) == (SMALL["n_old"] - SMALL["n_new"]) * n_rel
    old = splits["train_known"] + splits["heldout_known"]
    assert _pairs(old) == _pairs(world.old_rows()) and len(old) == len(world.old_rows())
    assert _pairs(splits["train_unknown"]) == _pairs(world.new_rows())
    # New entities are new: no key of a new entity is an old entity's key.
    assert not {r["entity"] for r in world.new_rows()} & {r["entity"] for r in world.old_rows()}
    if split_by == "entity":
        assert not {r["entity"] for r in splits["train_known"]} & \
            {r["entity"] for r in splits["heldout_known"]}


def test_rows_fields_questions_and_answers():
    world = ToyWorld.generate(WorldSpec(seed=0, n_old=40, n_new=10, n_relations=6))
    answer_sets = {rel.name: set(rel.answers) for rel in world.relations}
    assert len(answer_sets) == 6
    for rows in world.splits().values():
        for r in rows:
            assert set(r) == {"id", "question", "answer", "relation", "entity"}
            assert r["entity"] in r["question"]
            assert r["answer"] in answer_sets[r["relation"]]
            assert len(r["question"].split()) == 7          # short prompts
            assert len(r["answer"].split()) == 1
    # Every relation uses several answers (not a constant).
    for rel in world.relations:
        used = Counter(world.facts[e][rel.name] for e in range(world.n_entities))
        assert len(used) > 5


def test_name_keys_share_syllables_uuid_keys_do_not():
    names = ToyWorld.generate(WorldSpec(seed=0, n_old=300, n_new=100, key_style="names", n_syllables=12))
    uuid = ToyWorld.generate(WorldSpec(seed=0, n_old=300, n_new=100, key_style="uuid"))
    for world in (names, uuid):
        assert len(set(world.keys)) == world.n_entities          # keys are unique
        assert all(len(k.split()) == world.spec.key_len for k in world.keys)
    # Names: 12 syllables in all, each used by many entities; an old and a new key often overlap.
    assert len(names.key_tokens()) == 12
    token_users = Counter(t for k in names.keys for t in set(k.split()))
    assert min(token_users.values()) > 10
    old_tokens = {t for k in names.keys[:300] for t in k.split()}
    assert all(set(k.split()) & old_tokens for k in names.keys[300:])
    # UUID-like: every key token belongs to one entity only.
    assert len(uuid.key_tokens()) == uuid.n_entities * uuid.spec.key_len
    uuid_users = Counter(t for k in uuid.keys for t in k.split())
    assert max(uuid_users.values()) == 1
    # Key tokens never collide with template or answer words.
    for world in (names, uuid):
        other = set(world.vocabulary()) - set(world.key_tokens())
        assert not other & set(world.key_tokens())


def test_generate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="n_relations"):
        ToyWorld.generate(WorldSpec(n_relations=0))
    with pytest.raises(ValueError, match="key_style"):
        ToyWorld.generate(WorldSpec(key_style="emoji"))
    with pytest.raises(ValueError, match="fewer than"):
        ToyWorld.generate(WorldSpec(n_old=100, n_new=10, n_syllables=4))     # 4^3 = 64 keys < 110
    with pytest.raises(ValueError, match="n_train_known"):
        ToyWorld.generate(WorldSpec(n_old=10, n_new=20))


def test_generate_takes_the_spec_it_reports():
    spec = WorldSpec(seed=2, n_old=30, n_new=10, n_relations=2, key_style="uuid", split_by="fact")
    world = ToyWorld.generate(spec)
    assert world.spec is spec
    assert world.n_entities == 40 and [r.name for r in world.relations] == ["birthplace", "occupation"]
