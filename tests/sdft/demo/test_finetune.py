"""Tests of sdft.demo.finetune: each row trains exactly the parameters its definition names, on
the data it names. A tiny model, one epoch of stage 2: seconds on CPU."""

from __future__ import annotations

import re

import pytest
import torch

from sdft.demo.finetune import RunSpec, stage2, trainable_names
from sdft.demo.methods import ROW_NAMES, build_methods
from sdft.demo.pretrain import build_model, model_config
from sdft.demo.scoring import SplitAccuracy
from sdft.demo.tokenizer import build_tokenizer
from sdft.demo.world import ToyWorld, WorldSpec

LAYERS = 2
# The paper's definitions, written as parameter names of a Llama decoder (not through
# sdft.freezing, whose resolution is what is being checked).
ATTENTION = r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight"
MLP = r"model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight"
EVERYTHING = r".*"
TRAINS = {"sft": EVERYTHING, "sdft_1": EVERYTHING, "known_only": EVERYTHING, "attention_only": ATTENTION,
          "ffn_only": MLP, "mlp_frozen": f"(?!{MLP}$).*"}


@pytest.fixture(scope="module")
def setup():
    world = ToyWorld.generate(WorldSpec(seed=0, n_old=40, n_new=20, n_relations=2))
    tokenizer = build_tokenizer(world)
    config = model_config(tokenizer, hidden_size=32, intermediate_size=64, num_heads=4, num_layers=LAYERS)
    return world.splits(), tokenizer, config


@pytest.mark.parametrize("key", sorted(TRAINS))
def test_row_changes_exactly_the_parameters_it_names(key, setup, tmp_path):
    splits, tokenizer, config = setup
    method = {m.key: m for m in build_methods(ROW_NAMES, (1.0,), 0.5)}[key]
    model = build_model(config, seed=0)
    names = [n for n, _ in model.named_parameters()]
    expected = {n for n in names if re.fullmatch(TRAINS[key], n)}
    if key == "attention_only":
        assert len(expected) == 4 * LAYERS
    if key == "ffn_only":
        assert len(expected) == 3 * LAYERS
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    spec = RunSpec(seed=0, method=method, base_dir="unused", learning_rate=1e-2, batch_size=16,
                   stage2_epochs=1, scratch_dir=str(tmp_path))
    _, report = stage2(model, tokenizer, splits, spec)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == expected
    assert set(trainable_names(model)) == expected
    if report is not None:
        assert report.trainable == sum(p.numel() for n, p in model.named_parameters() if n in expected)


def test_known_only_trains_on_the_known_facts_only(setup, tmp_path):
    splits, tokenizer, config = setup
    methods = {m.key: m for m in build_methods(("sft", "known_only"), (), 0.5)}
    score = SplitAccuracy(tokenizer, splits)
    steps = {}
    for key in ("sft", "known_only"):
        spec = RunSpec(seed=0, method=methods[key], base_dir="unused", batch_size=8, stage2_epochs=2,
                       scratch_dir=str(tmp_path))
        history, _ = stage2(build_model(config, seed=0), tokenizer, splits, spec, score)
        assert [h["epoch"] for h in history] == [0.0, 1.0, 2.0]
        steps[key] = history[-1]["step"]
    per_epoch = {key: -(-n // 8) for key, n in (("known_only", len(splits["train_known"])),
                                                 ("sft", len(splits["train_known"]) + len(splits["train_unknown"])))}
    assert steps == {key: 2 * n for key, n in per_epoch.items()}
