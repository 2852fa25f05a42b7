"""Every implementation against code we did not write that computes the same objective.

TRL's ``generalized_jsd_loss`` (the loss of its GKD and distillation trainers) and Liger's
chunked ``LigerFusedLinearJSDLoss``. Their conventions differ from ours, mapped here:

- neither scales the divergence by ``tau**2``: our ``kl_weight`` is theirs divided by ``tau**2``;
- ``beta`` 0 is forward KL(teacher || student), 1 reverse KL; in between the same mixture;
- TRL's ``reduction="batchmean"`` divides by the count of labels that are not -100 (our
  ``"mean"``), ``"sum"`` is ours;
- Liger's hard loss is cross-entropy at temperature 1 (our ``ce_weight``), its soft loss the
  divergence at ``temperature``, the mean over tokens whose label is not ignored.
"""

from __future__ import annotations

import functools
import os

import pytest
import torch

from sdft_kernels import fused_linear_sdft_loss
from tests.kernels.helpers import assert_close, make_problem, rounding_bounds
from tests.kernels.rounding import assert_within

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
IMPLS = ["reference", "torch"] + (["triton", "triton_chunked"] if INTERPRETER else [])


def _ours(p, impl, **kw):
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl, chunk_size=16, **kw)
    return loss, torch.autograd.grad(loss, (p.h, p.W))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.5, 1.0, 2.0])
@pytest.mark.parametrize("reduction", ["batchmean", "sum"])
def test_divergence_equals_trls_generalized_jsd(impl, beta, tau, reduction):
    gkd = pytest.importorskip("trl.experimental.gkd")
    p = make_problem(N=41, D=16, V=97, seed=int(beta * 10 + tau * 3))
    z_s = (p.h @ p.W.T).unsqueeze(0)  # TRL takes [B, T, V] logits
    z_t = (p.ht @ p.Wt.T).unsqueeze(0)
    expected = gkd.GKDTrainer.generalized_jsd_loss(z_s, z_t, labels=p.labels.unsqueeze(0), beta=beta,
                                                   temperature=tau, reduction=reduction)
    expected_grads = torch.autograd.grad(expected, (p.h, p.W))
    got, grads = _ours(p, impl, ce_weight=0.0, kl_weight=1.0 / tau**2, temperature=tau, divergence="jsd",
                       jsd_beta=beta, reduction="mean" if reduction == "batchmean" else "sum")
    tol = dict(rtol=1e-9, atol=1e-12)
    assert_close(got, expected, what=f"{impl} loss vs TRL", **tol)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, what=f"{impl} grad {i} vs TRL", **tol)


@functools.lru_cache(maxsize=None)
def _liger_case(beta: float, tau: float, lam: float = 0.8):
    """``(problem, options, loss, grads, bounds)``: Liger's ``LigerFusedLinearJSDLoss`` on a float32
    problem, the same loss in our options, and its rounding bounds (once per case: they cost a
    Hessian per row)."""
    liger = pytest.importorskip("liger_kernel.chunked_loss")
    p = make_problem(N=45, D=32, V=130, dtype=torch.float32, seed=int(beta * 10 + tau))
    oracle = liger.LigerFusedLinearJSDLoss(weight_hard_loss=1.0, weight_soft_loss=lam * tau**2, beta=beta,
                                           temperature=tau, compiled=False)
    expected = oracle(p.h, p.W, p.ht, p.Wt, p.labels)
    expected_grads = torch.autograd.grad(expected, (p.h, p.W))
    options = dict(kl_weight=lam, temperature=tau, divergence="jsd", jsd_beta=beta)
    return p, options, expected.detach(), expected_grads, rounding_bounds(p, **options)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_hard_and_soft_loss_equal_ligers_fused_linear_jsd(impl, beta, tau):
    p, options, expected, expected_grads, (bounds, grad_bounds) = _liger_case(beta, tau)
    got, grads = _ours(p, impl, **options)
    # Two float32 computations of the same value: each within its rounding bound of the exact
    # value on these inputs, so within twice that of each other.
    assert_within(f"{impl} loss vs Liger", got, expected, 2 * bounds["loss"])
    for i, (g, e, b) in enumerate(zip(grads, expected_grads, grad_bounds)):
        assert_within(f"{impl} grad {i} vs Liger", g, e, 2 * b)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("beta", [0.0, 0.4, 1.0])
@pytest.mark.parametrize(
    "caps, scales",
    [((None, 4.0), (1.0, 1.0)), ((3.0, None), (1.0, 1.0)), ((3.0, 6.0), (1.7, 0.6)), ((None, None), (0.5, 2.0))],
    ids=["teacher-cap-only", "student-cap-only", "both-caps-and-scales", "scales-only"],
)
def test_separate_softcaps_and_logit_scales_equal_trls_distillation_loss(impl, beta, caps, scales):
    """TRL's ``DistillationTrainer`` applies each model's logit scale, then its own softcap,
    then the temperature (``_chunked_divergence_loss``): a teacher of another family than the
    student. Its float32 kernel is the oracle here, biases included."""
    distillation = pytest.importorskip("trl.trainer.distillation_trainer")
    tau = 0.8
    p = make_problem(N=43, D=24, Dt=20, V=150, bias=True, dtype=torch.float32, scale=3.0, seed=int(beta * 10))
    valid = p.labels != -100
    expected, _, n_valid = distillation._chunked_divergence_loss(
        p.h.unsqueeze(0), p.ht.unsqueeze(0), p.W, p.Wt, valid.unsqueeze(0), beta, student_lm_head_bias=p.b,
        teacher_lm_head_bias=p.bt, student_logit_scale=scales[0], teacher_logit_scale=scales[1],
        student_final_logit_softcapping=caps[0], teacher_final_logit_softcapping=caps[1], temperature=tau)
    leaves = (p.h, p.W, p.b)
    expected_grads = torch.autograd.grad(expected, leaves)
    got = fused_linear_sdft_loss(
        p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt, impl=impl, chunk_size=16,
        ce_weight=0.0, kl_weight=1.0 / tau**2, temperature=tau, divergence="jsd", jsd_beta=beta,
        student_softcap=caps[0], teacher_softcap=caps[1], student_logit_scale=scales[0],
        teacher_logit_scale=scales[1])
    grads = torch.autograd.grad(got, leaves)
    assert int(n_valid) == int(valid.sum())
    assert_close(got, expected, rtol=2e-5, atol=1e-6, what=f"{impl} loss vs TRL")
    for name, g, e in zip(("hidden", "weight", "bias"), grads, expected_grads):
        scale = float(e.abs().max())
        assert_close(g, e, rtol=1e-4, atol=1e-4 * scale, what=f"{impl} grad of the {name} vs TRL")


@pytest.mark.parametrize("impl", IMPLS)
def test_softcap_sets_both_models_caps(impl):
    p = make_problem(N=23, D=16, V=80, bias=True, scale=3.0)
    both = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt,
                                  impl=impl, softcap=4.0)
    each = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt,
                                  impl=impl, student_softcap=4.0, teacher_softcap=4.0)
    assert torch.equal(both, each)
    with pytest.raises(ValueError, match="softcap=4.0 sets both"):
        fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl, softcap=4.0, teacher_softcap=3.0)
