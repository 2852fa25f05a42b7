"""Freezing composes with the SDFT loss: with the FFN frozen, a step updates attention only."""

from __future__ import annotations

import torch

from sdft import causal_lm_loss
from sdft.freezing import freeze, masked_optimizer, resolve_groups
from sdft.param_groups import param_groups
from sdft.teacher import FrozenCopy
from tests.sdft.tiny_models import make_batch, perturbed_copy, tiny_model


def test_sdft_step_with_ffn_frozen_moves_attention_only():
    model = tiny_model("llama")
    teacher = FrozenCopy(perturbed_copy(model))
    report = freeze(model, "ffn")
    groups = resolve_groups(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = masked_optimizer(torch.optim.AdamW(param_groups(model, weight_decay=0.1), lr=1e-2), report)
    for _ in range(3):
        out = causal_lm_loss(model, make_batch(), teacher)
        assert float(out.kl) > 0
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    assert groups["ffn"] and groups["attention"]
    for name in groups["ffn"]:
        assert torch.equal(after[name], before[name]), f"frozen FFN parameter {name} moved"
    for name in groups["attention"]:
        assert not torch.equal(after[name], before[name]), f"attention parameter {name} did not move"
