"""The rounding bounds the low-precision tests judge by (tests/kernels/rounding.py) can fail.

Each bound must admit a correct computation at its dtype (plain torch passes) and reject
wrong results: zeros, a sign flip, one row left out, a computation at a lower precision than
the one bounded. All on CPU, through the same helpers the kernel and GPU tests call.
"""

from __future__ import annotations

import pytest
import torch

from sdft_kernels import LossOptions, reference_sdft_loss
from sdft_kernels.reduction import counted_masks, row_scales
from tests.kernels import rounding
from tests.kernels.helpers import (assert_within_rounding, assert_within_scale, make_problem, rounding_bounds,
                                   run)

KW = dict(divergence="jsd", jsd_beta=0.3, temperature=0.7, kl_weight=1.3)


def _wrong_versions(out, grads, rows_to_drop, other_temperature):
    """``(name, (out, grads))`` for results that are wrong in one way each; ``other_temperature``:
    the output of the same problem at another temperature."""
    zero = out._replace(loss=out.loss * 0, ce=out.ce * 0, kl=out.kl * 0)
    yield "zeros", (zero, [g * 0 for g in grads])
    yield "sign flip", (out._replace(loss=-out.loss, ce=-out.ce, kl=-out.kl), [-g for g in grads])
    for i, row in rows_to_drop:
        dropped = [g.clone() for g in grads]
        dropped[i][row] = 0
        yield f"grad {i} without row {row}", (out, dropped)
    yield "kl at another temperature", (out._replace(kl=other_temperature.kl), grads)


def _assert_all_rejected(check, wrong) -> None:
    """``check(name, result)`` raises an AssertionError for every ``(name, result)`` of ``wrong``."""
    missed = []
    for name, result in wrong:
        try:
            check(name, result)
        except AssertionError:
            continue
        missed.append(name)
    assert not missed, f"accepted although wrong: {missed}"


def _largest_rows(grads):
    """The row of largest norm of each matrix gradient, the one a dropped row would miss most."""
    return [(i, int(g.double().norm(dim=-1).argmax())) for i, g in enumerate(grads) if g.dim() == 2]


def _wrong_component(truth, fast, name):
    """Only ``name`` (loss, ce, kl or grad i) of ``truth`` replaced by ``fast``'s."""
    out, grads = truth
    if name.startswith("grad"):
        i = int(name.split()[1])
        grads = [fast[1][j] if j == i else g for j, g in enumerate(grads)]
        return out, grads
    return out._replace(**{name: getattr(fast[0], name)}), grads


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_per_entry_bounds_admit_plain_torch_and_reject_wrong_results(dtype):
    low = make_problem(N=37, D=24, V=203, bias=True, kl_mask=True).cast(dtype)
    truth = run(low.cast(torch.float64), impl="reference", **KW)
    bounds = rounding_bounds(low, **KW)
    assert_within_rounding(truth, run(low, impl="reference", **KW), bounds, "plain torch")
    assert_within_rounding(truth, truth, bounds, "the truth itself")
    other = run(low.cast(torch.float64), impl="reference", **dict(KW, temperature=1.0))[0]
    _assert_all_rejected(lambda name, wrong: assert_within_rounding(truth, wrong, bounds, name),
                         _wrong_versions(*truth, _largest_rows(truth[1]), other))


def test_float32_bounds_reject_a_half_precision_computation():
    """Logits or gradients rounded to float16 where float32 is promised: the rows of every
    value and each gradient exceed the float32 bounds. (The mean over 37 rows does not: its
    errors average out, while its bound is the worst case of each row.)"""
    p = make_problem(N=37, D=24, V=203, bias=True, kl_mask=True)
    kw = dict(KW, reduction="none")
    upstream = torch.randn(37, dtype=torch.float64)
    low = p.cast(torch.float32)
    truth = run(low.cast(torch.float64), upstream, impl="reference", **kw)
    bounds = rounding_bounds(low, upstream, **kw)
    half = run(p.cast(torch.float16), upstream, impl="reference", **kw)
    half = (half[0], [g.float() for g in half[1]])
    _assert_all_rejected(lambda name, wrong: assert_within_rounding(truth, wrong, bounds, name),
                         [(name, _wrong_component(truth, half, name))
                          for name in ("loss", "ce", "kl", "grad 0", "grad 1", "grad 2")])


def test_flushed_softmax_tails_are_rejected():
    """A logit gradient formed for an upstream gradient of 1 in float16 and scaled by a loss
    scale of 65536 afterwards: tails of ~1e-9 flush to 0 on the way, and the weight gradient's
    small rows lose them. The per-entry bound of those rows tells (as
    test_fused_loss.test_float16_small_logit_gradients_survive_a_loss_scale relies on)."""
    low = make_problem(N=64, D=24, V=203, bias=True, kl_mask=True, scale=7.0).cast(torch.float16)
    scale = torch.tensor(65536.0, dtype=torch.float64)
    want = run(low.cast(torch.float64), scale, impl="reference")[1][1]
    _, (_, bound, _) = rounding_bounds(low, scale, partial_sums=4)
    o = LossOptions()
    label_mask, kl_rows = counted_masks(low.labels, low.kl_mask, o.ignore_index)
    ce_scale, kl_scale = row_scales(torch.ones((), dtype=torch.float64), label_mask.sum().double(), label_mask,
                                    kl_rows, o)
    logits = rounding.Logits.of(low.h, low.W, low.b, low.ht, low.Wt, low.bt, o)
    G, _ = rounding.logit_gradient_error(logits, low.labels, kl_rows, ce_scale, kl_scale, torch.float16)
    flushed = (G.half().double() * 65536).T @ low.h.detach().double()
    small = want.norm(dim=1).argsort()[:20]
    assert float((flushed[small] - want[small]).abs().max()) > 0  # the tails were lost
    with pytest.raises(AssertionError):
        rounding.assert_within("flushed tails", flushed[small], want[small], bound[small])


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_relative_bounds_admit_half_precision_and_reject_wrong_gradients(dtype, divergence):
    """The GPU tests' bounds (relative for the gradients: test_cuda.py's large vocabularies
    rule out per-entry ones), on CPU: plain torch and the chunked torch path at the dtype pass,
    with float64 and float32 truths; an all-zero gradient, a sign flip, a dropped row, a
    gradient off by a few per cent do not."""
    kw = dict(divergence=divergence)
    low = make_problem(N=96, D=64, V=2003, kl_mask=True).cast(dtype)
    for exact in (torch.float64, torch.float32):
        truth = run(low.cast(exact), impl="reference", **kw)
        assert_within_scale(low, truth, run(low, impl="reference", **kw), "plain torch", exact, **kw)
        assert_within_scale(low, truth, run(low, impl="torch", chunk_size=40, **kw), "chunked torch", exact, **kw)
    out, grads = truth
    rtol = rounding.gradient_rtol(rounding.Logits.of(low.h, low.W, low.b, low.ht, low.Wt, low.bt,
                                                     LossOptions(**kw)), dtype)
    assert rtol < 0.5, f"a relative tolerance of {rtol:.2g} could not tell much"
    other = run(low.cast(exact), impl="reference", temperature=1.0, **kw)[0]
    wrong = list(_wrong_versions(out, grads, _largest_rows(grads), other))
    wrong.append(("gradients scaled by 1 + 2 rtol", (out, [g * (1 + 2 * rtol) for g in grads])))
    ignored = int((low.labels == -100).nonzero()[0, 0]) if bool((low.labels == -100).any()) else None
    if ignored is not None and not bool(low.kl_mask[ignored]):
        leak = [g.clone() for g in grads]
        leak[0][ignored] = 1e-3 * grads[0].abs().max()
        wrong.append(("a row nothing counts made non-zero", (out, leak)))
    _assert_all_rejected(lambda name, bad: assert_within_scale(low, truth, bad, name, exact, **kw), wrong)


@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 1.0)])
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_loss_rows_are_the_references(divergence, beta, softcap):
    """The bounds differentiate rounding.loss_rows (its own JSD, for a second derivative that
    stays finite): it must be the reference's loss."""
    p = make_problem(N=29, D=16, V=77, bias=True, kl_mask=True)
    o = LossOptions(divergence=divergence, jsd_beta=beta, softcap=softcap, temperature=0.6, reduction="none")
    want = reference_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt,
                               kl_mask=p.kl_mask, options=o)
    label_mask, kl_rows = counted_masks(p.labels, p.kl_mask, o.ignore_index)
    ce, div = rounding.loss_rows(p.h @ p.W.T + p.b, p.ht @ p.Wt.T + p.bt, p.labels, kl_rows, o)
    torch.testing.assert_close(ce, want.ce, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, want.kl, rtol=1e-12, atol=1e-12)


def test_gamma_refuses_sums_too_long_for_a_bound():
    assert rounding.gamma(10, torch.float32) == pytest.approx(10 * 2**-24, rel=1e-6)
    with pytest.raises(AssertionError, match="no useful bound"):
        rounding.gamma(200, torch.bfloat16)
