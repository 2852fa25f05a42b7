"""Tests of sdft.demo.pretrain: a short pretraining run (loss goes down, reproducible, cache
reused). Worlds and models are tiny, so the file runs in seconds on CPU."""

from __future__ import annotations

import torch

from sdft.demo.pretrain import PretrainOptions, build_model, model_config, pretrain
from sdft.demo.tokenizer import build_tokenizer, encode_rows
from sdft.demo.world import ToyWorld, WorldSpec


def _loss(model, batch):
    with torch.no_grad():
        return model(**batch).loss.item()


def test_short_pretraining_reduces_loss_and_is_reproducible():
    world = ToyWorld.generate(WorldSpec(seed=0, n_old=40, n_new=5, n_relations=2))
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
    world = ToyWorld.generate(WorldSpec(seed=0, n_old=20, n_new=5, n_relations=1))
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
