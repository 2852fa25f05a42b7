"""Tests of sdft.toyworld: a reproducible world, leak-free splits, name-like vs UUID keys, the
word-level tokenizer, the shared prompt format, and a short pretraining run (loss goes down,
cache reused). Worlds and models are tiny, so the file runs in seconds on CPU.
"""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sdft.toyworld import (
    IGNORE_INDEX,
    SPLIT_NAMES,
    PretrainOptions,
    ToyWorld,
    build_model,
    build_tokenizer,
    encode_example,
    encode_rows,
    format_prompt,
    model_config,
    pretrain,
)

SMALL = dict(n_old=60, n_new=20, n_relations=3)


def _pairs(rows):
    return {(r["entity"], r["relation"]) for r in rows}


def test_world_is_deterministic_per_seed():
    a = ToyWorld.generate(seed=0, **SMALL).splits()
    b = ToyWorld.generate(seed=0, **SMALL).splits()
    c = ToyWorld.generate(seed=1, **SMALL).splits()
    assert a == b
    assert a != c
    assert ToyWorld.generate(seed=0, **SMALL).fingerprint() == \
        ToyWorld.generate(seed=0, **SMALL).fingerprint()
    assert ToyWorld.generate(seed=0, **SMALL).fingerprint() != \
        ToyWorld.generate(seed=1, **SMALL).fingerprint()


@pytest.mark.parametrize("split_by", ["entity", "fact"])
@pytest.mark.parametrize("key_style", ["names", "uuid"])
def test_splits_are_disjoint_and_complete(split_by, key_style):
    world = ToyWorld.generate(seed=3, split_by=split_by, key_style=key_style, **SMALL)
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
    world = ToyWorld.generate(seed=0, n_old=40, n_new=10, n_relations=6)
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
    names = ToyWorld.generate(seed=0, n_old=300, n_new=100, key_style="names", n_syllables=12)
    uuid = ToyWorld.generate(seed=0, n_old=300, n_new=100, key_style="uuid")
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
        ToyWorld.generate(n_relations=0)
    with pytest.raises(ValueError, match="key_style"):
        ToyWorld.generate(key_style="emoji")
    with pytest.raises(ValueError, match="fewer than"):
        ToyWorld.generate(n_old=100, n_new=10, n_syllables=4)     # 4^3 = 64 keys < 110
    with pytest.raises(ValueError, match="n_train_known"):
        ToyWorld.generate(n_old=10, n_new=20)


# --- tokenizer and prompt format ---------------------------------------------------------------


def test_tokenizer_word_level_and_round_trip(tmp_path):
    world = ToyWorld.generate(seed=0, **SMALL)
    tok = build_tokenizer(world)
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2, 3)
    assert len(tok) == 4 + len(world.vocabulary())
    assert tok.padding_side == "right"
    rows = world.old_rows()
    for r in rows:
        ids = tok(r["question"])["input_ids"]
        assert ids[0] == tok.bos_token_id and len(ids) == 8          # <bos> + 7 words
        assert tok.unk_token_id not in ids
        assert tok.decode(ids, skip_special_tokens=True) == r["question"]
        assert len(tok(r["answer"], add_special_tokens=False)["input_ids"]) == 1
    assert tok("WHERE was")["input_ids"] == tok("where was")["input_ids"]   # lowercased
    assert tok("zzz")["input_ids"] == [tok.bos_token_id, tok.unk_token_id]

    tok.save_pretrained(tmp_path)
    for loaded in (AutoTokenizer.from_pretrained(tmp_path),
                   PreTrainedTokenizerFast.from_pretrained(tmp_path)):
        assert loaded.get_vocab() == tok.get_vocab()
        assert loaded.pad_token == "<pad>" and loaded.padding_side == "right"
        questions = [r["question"] for r in rows[:5]]
        assert loaded(questions)["input_ids"] == tok(questions)["input_ids"]

    left = build_tokenizer(world, padding_side="left")
    batch = left(["where was", rows[0]["question"]], padding=True)
    assert batch["input_ids"][0][0] == left.pad_token_id
    assert batch["attention_mask"][0][:5] == [0] * 5
    with pytest.raises(ValueError):
        build_tokenizer(world, padding_side="middle")


def test_encode_example_uses_the_evaluation_prompt():
    world = ToyWorld.generate(seed=0, **SMALL)
    tok = build_tokenizer(world)
    r = world.old_rows()[0]
    ids, labels = encode_example(tok, r["question"], r["answer"])
    prompt = tok(format_prompt(r["question"]))["input_ids"]
    answer_id = tok.convert_tokens_to_ids(r["answer"])
    assert ids == prompt + [answer_id, tok.eos_token_id]
    assert labels == [IGNORE_INDEX] * len(prompt) + [answer_id, tok.eos_token_id]
    assert format_prompt("  where  was x\n born ?") == "where was x born ?"
    batch = encode_rows(tok, world.old_rows()[:4])
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 10)
    assert int((batch["labels"] != IGNORE_INDEX).sum()) == 8


# --- model and pretraining -------------------------------------------------------------------


def _loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


def test_short_pretraining_reduces_loss_and_is_reproducible():
    world = ToyWorld.generate(seed=0, n_old=40, n_new=5, n_relations=2)
    tok = build_tokenizer(world)
    config = model_config(tok, hidden_size=32, intermediate_size=64, num_heads=4)
    assert config.vocab_size == len(tok) and not config.tie_word_embeddings
    batch = encode_rows(tok, world.old_rows())
    before = _loss(build_model(config, seed=0), batch)
    options = PretrainOptions(lr=3e-3, batch_size=16, max_steps=40, warmup_steps=5,
                              eval_every=20)
    records = []
    model = pretrain(world, tok, config=config, seed=0, options=options, log=records.append)
    after = _loss(model, batch)
    assert after < before - 0.5, (before, after)
    assert not model.training
    assert [r["step"] for r in records if not r.get("done")] == [0, 20, 40]
    assert records[-1]["done"] and not records[-1]["cached"]
    again = pretrain(world, tok, config=config, seed=0, options=options)
    for (name, p), q in zip(model.state_dict().items(), again.state_dict().values()):
        assert torch.equal(p, q), name


def test_pretrain_stops_at_target_and_uses_cache(tmp_path):
    world = ToyWorld.generate(seed=0, n_old=20, n_new=5, n_relations=1)
    tok = build_tokenizer(world)
    config = model_config(tok, hidden_size=32, intermediate_size=64, num_heads=4)
    # target 0: stops at the first evaluation, before any step.
    options = PretrainOptions(max_steps=50, eval_every=10, target_accuracy=0.0)
    records = []
    first = pretrain(world, tok, config=config, options=options, cache_dir=tmp_path,
                     log=records.append)
    assert records[0]["step"] == 0 and records[-1]["done"] and not records[-1]["cached"]
    assert len(list(tmp_path.glob("pretrain-*/pretrain.json"))) == 1
    records.clear()
    second = pretrain(world, tok, config=config, options=options, cache_dir=tmp_path,
                      log=records.append)
    assert records[-1]["cached"]
    for p, q in zip(first.state_dict().values(), second.state_dict().values()):
        assert torch.equal(p, q)
    # Another seed is another cache entry.
    pretrain(world, tok, config=config, seed=1, options=options, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("pretrain-*/pretrain.json"))) == 2
