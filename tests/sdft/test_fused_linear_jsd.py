"""FusedLinearJSDLoss against the code it stands in for: Liger's LigerFusedLinearJSDLoss, and
TRL's generalized_jsd_loss (the divergence of its GKD trainer) over materialised logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sdft.fused_linear_jsd import FusedLinearJSDLoss
from tests.kernels.helpers import assert_close, make_problem, rounding_bounds
from tests.kernels.rounding import assert_within


def _grads(loss, p, bias=False):
    wrt = (p.h, p.W) + ((p.b,) if bias else ())
    return torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_soft_loss_equals_trls_generalized_jsd(beta, temperature):
    """weight_hard_loss 0, weight_soft_loss 1: TRL's divergence, no T**2 factor, the mean over
    the labels that are not -100 (its reduction="batchmean"), beta 0 forward and 1 reverse KL."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    p = make_problem(N=53, D=16, V=97, Dt=24, bias=True, teacher_bias=True, ignore_frac=0.3,
                     seed=int(10 * beta + 3 * temperature))
    z_s = F.linear(p.h, p.W, p.b).unsqueeze(0)  # TRL takes [B, T, V] logits
    z_t = F.linear(p.ht, p.Wt, p.bt).unsqueeze(0)
    expected = gkd.GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=p.labels.unsqueeze(0), beta=beta,
                                                   temperature=temperature, reduction="batchmean")
    ours = FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=temperature)
    got = ours(p.h, p.W, p.ht, p.Wt, p.labels, p.b, p.bt)
    assert float(expected.detach()) > 1e-3
    assert_close(got, expected, rtol=1e-10, atol=1e-13, what="loss vs TRL")
    for i, (g, e) in enumerate(zip(_grads(got, p, bias=True), _grads(expected, p, bias=True))):
        assert_close(g, e, rtol=1e-9, atol=1e-13, what=f"grad {i} vs TRL")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_reduction_none_and_sum_are_trls(beta):
    """reduction="none": one value per position, [N]. TRL's generalized_jsd_loss(reduction="none")
    gives the divergence per position and vocabulary entry of the counted positions; summed over
    the vocabulary it is our soft part there, and ignored positions are 0. With a hard loss the
    value adds the position's cross-entropy; gradients under a random [N] upstream gradient.
    reduction="sum" is TRL's "sum"."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    p = make_problem(N=53, D=16, V=97, Dt=24, bias=True, teacher_bias=True, ignore_frac=0.3, seed=int(10 * beta))
    z_s, z_t = F.linear(p.h, p.W, p.b).unsqueeze(0), F.linear(p.ht, p.Wt, p.bt).unsqueeze(0)
    settings = dict(beta=beta, temperature=0.7)
    per_entry = gkd.GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=p.labels[None], reduction="none", **settings)
    counted = p.labels != -100
    assert per_entry.shape == (int(counted.sum()), 97)
    soft = per_entry.new_zeros(53).masked_scatter(counted, per_entry.sum(-1))
    hard = F.cross_entropy(z_s[0], p.labels, ignore_index=-100, reduction="none")
    expected = 0.4 * hard + 1.3 * soft

    ours = FusedLinearJSDLoss(weight_hard_loss=0.4, weight_soft_loss=1.3, reduction="none",
                              return_soft_hard_loss=True, **settings)
    got, got_soft, got_hard = ours(p.h, p.W, p.ht, p.Wt, p.labels, p.b, p.bt)
    assert got.shape == got_soft.shape == got_hard.shape == (53,) and float(soft.max()) > 1e-3
    assert_close(got, expected, rtol=1e-10, atol=1e-13, what="per-position loss vs TRL")
    assert_close(got_soft, soft, rtol=1e-10, atol=1e-13, what="per-position soft loss vs TRL")
    assert_close(got_hard, hard, rtol=1e-10, atol=1e-13, what="per-position hard loss")
    upstream = torch.rand(53, dtype=torch.float64) + 0.5
    for i, (g, e) in enumerate(zip(_grads((got * upstream).sum(), p, bias=True),
                                   _grads((expected * upstream).sum(), p, bias=True))):
        assert_close(g, e, rtol=1e-9, atol=1e-13, what=f"grad {i} vs TRL")

    summed = gkd.GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=p.labels[None], reduction="sum", **settings)
    got_sum = FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, reduction="sum", **settings)(
        p.h, p.W, p.ht, p.Wt, p.labels, p.b, p.bt)
    assert_close(got_sum, summed, rtol=1e-10, atol=1e-13, what="sum vs TRL")


def test_reduction_none_refuses_a_normaliser():
    p = make_problem(N=8, D=8, V=40)
    with pytest.raises(ValueError, match="num_items=5 is the divisor of reduction='mean'; this loss has "
                                         "reduction='none'"):
        FusedLinearJSDLoss(reduction="none")(p.h, p.W, p.ht, p.Wt, p.labels, num_items=5)
    with pytest.raises(ValueError, match="reduction must be one of .* got 'batchmean'"):
        FusedLinearJSDLoss(reduction="batchmean")


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("weights", [(0.5, 0.5), (1.0, 0.0), (0.2, 1.3)])
def test_equals_ligers_fused_linear_jsd(beta, weights):
    """Constructor, call and result of Liger's class (loss, gradients, (loss, soft, hard))."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    hard, soft = weights
    p = make_problem(N=45, D=32, V=130, dtype=torch.float32, ignore_frac=0.25, seed=int(10 * beta + 7 * hard))
    settings = dict(weight_hard_loss=hard, weight_soft_loss=soft, beta=beta, ignore_index=-100, temperature=1.7)
    theirs = liger.LigerFusedLinearJSDLoss(**settings, compiled=False, return_soft_hard_loss=True)
    ours = FusedLinearJSDLoss(**settings, return_soft_hard_loss=True)
    expected, expected_soft, expected_hard = theirs(p.h, p.W, p.ht, p.Wt, p.labels)
    got, got_soft, got_hard = ours(p.h, p.W, p.ht, p.Wt, p.labels)
    # Two float32 computations of the same values: each within its rounding bound of the exact
    # value on these inputs (ours.options: the same loss in this package's terms), so within
    # twice that of each other.
    upstream = torch.rand(()) + 0.5  # a non-unit upstream gradient
    bounds, grad_bounds = rounding_bounds(p, upstream.double(), **vars(ours.options))
    assert_within("loss vs Liger", got, expected, 2 * bounds["loss"])
    assert_within("soft loss vs Liger", got_soft, expected_soft, 2 * bounds["kl"])
    assert_within("hard loss vs Liger", got_hard, expected_hard, 2 * bounds["ce"])
    for i, (g, e, b) in enumerate(zip(torch.autograd.grad(got * upstream, (p.h, p.W)),
                                      torch.autograd.grad(expected * upstream, (p.h, p.W)), grad_bounds)):
        assert_within(f"grad {i} vs Liger", g, e, 2 * b)


def test_hard_loss_is_cross_entropy_at_temperature_one():
    p = make_problem(N=31, D=8, V=50, ignore_frac=0.2)
    got = FusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=0.0, temperature=3.0)(p.h, p.W, p.ht, p.Wt, p.labels)
    assert_close(got, F.cross_entropy(p.h @ p.W.T, p.labels, ignore_index=-100), rtol=1e-12, atol=1e-14, what="CE")


def test_settings_reassigned_after_construction_take_effect_as_in_liger():
    """Liger's forward reads its attributes: a reassigned weight, beta or temperature counts at
    the next call, here as in Liger (and for a softcapped head, whose options are cached)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    p = make_problem(N=24, D=8, V=40, ignore_frac=0.2, seed=5)
    ours = FusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)
    theirs = liger.LigerFusedLinearJSDLoss(weight_hard_loss=0.5, weight_soft_loss=0.5, beta=0.5, temperature=1.0)
    ours(p.h, p.W, p.ht, p.Wt, p.labels, softcap=30.0)
    for name, value in (("weight_soft_loss", 2.0), ("beta", 0.2), ("temperature", 0.5), ("weight_hard_loss", 0.0)):
        setattr(ours, name, value)
        setattr(theirs, name, value)
        # Liger sums in float32 (its test above bounds the rounding); a setting left unread
        # would be off by its whole change.
        assert_close(ours(p.h, p.W, p.ht, p.Wt, p.labels), theirs(p.h, p.W, p.ht, p.Wt, p.labels),
                     rtol=2e-6, atol=1e-9, what=name)
        capped = FusedLinearJSDLoss(weight_hard_loss=ours.weight_hard_loss, weight_soft_loss=ours.weight_soft_loss,
                                    beta=ours.beta, temperature=ours.temperature)
        assert_close(ours(p.h, p.W, p.ht, p.Wt, p.labels, softcap=30.0),
                     capped(p.h, p.W, p.ht, p.Wt, p.labels, softcap=30.0), rtol=0, atol=0, what=f"{name}, softcap")
    ours.beta = 1.5
    with pytest.raises(ValueError, match="beta must be a number in \\[0, 1\\], got 1.5"):
        ours(p.h, p.W, p.ht, p.Wt, p.labels)


def test_extensions_num_items_and_softcap():
    """Beyond Liger's call: the normaliser of an accumulated batch, and a logit softcap."""
    gkd = pytest.importorskip("trl.experimental.gkd")
    p = make_problem(N=40, D=8, V=60, ignore_frac=0.2, seed=3)
    loss = FusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=0.3, temperature=0.5)
    n = int((p.labels != -100).sum())
    assert_close(loss(p.h, p.W, p.ht, p.Wt, p.labels, num_items=3 * n), loss(p.h, p.W, p.ht, p.Wt, p.labels) / 3,
                 rtol=1e-12, atol=1e-15, what="num_items")
    cap = 2.0
    capped = lambda z: cap * torch.tanh(z / cap)  # noqa: E731
    expected = gkd.GKDTrainer.generalized_jsd_loss(capped(p.h @ p.W.T)[None], capped(p.ht @ p.Wt.T)[None],
                                                   labels=p.labels[None], beta=0.3, temperature=0.5)
    assert_close(loss(p.h, p.W, p.ht, p.Wt, p.labels, softcap=cap), expected, rtol=1e-10, atol=1e-13, what="softcap")


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta=1.5), "beta must be a number in \\[0, 1\\], got 1.5"),
    (dict(temperature=0.0), "temperature must be a finite number > 0, got 0.0"),
    (dict(weight_soft_loss=-1.0), "weight_soft_loss must be a finite number >= 0, got -1.0"),
    (dict(weight_hard_loss=float("nan")), "weight_hard_loss must be a finite number >= 0, got nan"),
])
def test_bad_settings_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        FusedLinearJSDLoss(**kwargs)


def test_a_vocabulary_mismatch_is_refused():
    p = make_problem(N=8, D=8, V=40)
    with pytest.raises(ValueError, match="teacher_weight has vocab size 41 but student_weight has 40"):
        FusedLinearJSDLoss()(p.h, p.W, p.ht, torch.cat([p.Wt, p.Wt[:1]]), p.labels)
