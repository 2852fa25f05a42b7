"""Tests of sdft.demo.tokenizer: the word-level tokenizer and the shared prompt format."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from sdft.demo.tokenizer import IGNORE_INDEX, build_tokenizer, encode_example, encode_rows, format_prompt
from sdft.demo.world import ToyWorld, WorldSpec

SMALL = dict(n_old=60, n_new=20, n_relations=3)


def test_tokenizer_word_level_and_round_trip(tmp_path):
    world = ToyWorld.generate(WorldSpec(seed=0, **SMALL))
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
    world = ToyWorld.generate(WorldSpec(seed=0, **SMALL))
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
