"""Every fast implementation against the materialised reference, in float64 and below."""

from __future__ import annotations

import functools
import math
import os

import pytest
import torch

from sdft_kernels import fused_linear_sdft_loss
from tests.kernels.helpers import assert_close, assert_within_rounding, loss_options, make_problem, rounding_bounds, run
from tests.kernels import rounding
from tests.kernels.rounding import assert_within

# The Triton implementations run here in the interpreter on CPU tensors (tests/conftest.py);
# on a GPU machine test_cuda.py runs them on CUDA tensors instead.
INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
FAST_IMPLS = ["torch", "triton", "triton_chunked"] if INTERPRETER else ["torch"]
CHUNKED_IMPLS = ["torch", "triton_chunked"] if INTERPRETER else ["torch"]
F64 = dict(rtol=1e-9, atol=1e-11)


def _compare(problem, impl, upstream=None, tol=F64, **kw):
    ref, ref_grads = run(problem, upstream, impl="reference", **kw)
    out, grads = run(problem, upstream, impl=impl, **kw)
    for name in ("loss", "ce", "kl", "n_tokens"):
        assert_close(getattr(out, name), getattr(ref, name), what=f"{impl} {name}", **tol)
    assert len(grads) == len(ref_grads)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, what=f"{impl} grad of leaf {i}", **tol)
    return out


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize(
    "divergence,jsd_beta",
    [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.0), ("jsd", 1.0)],  # 0, 1: the KLs
)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference_float64(impl, divergence, jsd_beta, reduction):
    # Ragged sizes, 20 % ignored labels, a kl_mask unlike the label mask, biases, Dt != D.
    p = make_problem(N=37, D=24, Dt=20, V=203, bias=True, kl_mask=True)
    upstream = torch.randn(37, dtype=torch.float64) if reduction == "none" else torch.tensor(1.7, dtype=torch.float64)
    _compare(p, impl, upstream, divergence=divergence, jsd_beta=jsd_beta, reduction=reduction,
             ce_weight=0.7, kl_weight=1.3, temperature=0.6, chunk_size=8)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_softcap(impl, divergence):
    # Large logits so the cap bends them: tanh's derivative matters in the gradient.
    p = make_problem(N=29, D=16, V=150, scale=4.0, bias=True)
    _compare(p, impl, softcap=5.0, divergence=divergence, chunk_size=8)


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("caps", [(3.0, None), (None, 4.0), (2.5, 6.0)], ids=["student", "teacher", "both"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_separate_softcaps_and_logit_scales(impl, caps, reduction):
    # A teacher of another family: its own softcap and logit scale, or none.
    p = make_problem(N=29, D=16, V=150, scale=4.0, bias=True, kl_mask=True)
    upstream = torch.randn(29, dtype=torch.float64) if reduction == "none" else None
    _compare(p, impl, upstream, student_softcap=caps[0], teacher_softcap=caps[1], student_logit_scale=1.3,
             teacher_logit_scale=0.7, divergence="reverse_kl", reduction=reduction, chunk_size=8)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_no_teacher_is_fused_cross_entropy(impl):
    p = make_problem(N=33, D=24, V=170, teacher=False, bias=True)
    out = _compare(p, impl, chunk_size=8)
    assert float(out.kl) == 0.0
    expected = torch.nn.functional.cross_entropy(p.h @ p.W.T + p.b, p.labels)
    assert_close(out.loss, expected, what="loss vs F.cross_entropy", **F64)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_frozen_weight_gets_no_gradient(impl):
    p = make_problem(N=21, D=16, V=100, weight_grad=False)
    _compare(p, impl, chunk_size=8)
    assert p.W.grad is None and p.h.grad is not None


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("trained", ["h", "W", "b", "hWb"])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_gradients_reach_exactly_the_student_leaves_that_ask(impl, trained, reduction):
    """Each of hidden, head and bias alone, or all three, gets the reference's gradient; the
    rest of the student, and the teacher's tensors though they require grad, get none."""
    p = make_problem(N=23, D=16, Dt=12, V=90, bias=True, kl_mask=True)
    for name in ("h", "W", "b"):
        getattr(p, name).requires_grad_(name in trained)
    teacher = [p.ht.requires_grad_(), p.Wt.requires_grad_(), p.bt.requires_grad_()]
    upstream = torch.randn(23, dtype=torch.float64) if reduction == "none" else None
    _compare(p, impl, upstream, reduction=reduction, chunk_size=8)
    for name in ("h", "W", "b"):
        assert (getattr(p, name).grad is not None) == (name in trained), f"{impl}: gradient of {name}"
    assert all(t.grad is None for t in teacher), f"{impl}: a gradient reached the teacher"


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_shared_head(impl):
    # A frozen head shared by student and teacher: the same tensor serves both.
    p = make_problem(N=21, D=16, V=100, weight_grad=False)
    p.Wt = p.W
    _compare(p, impl, chunk_size=8)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_teacher_hidden_larger_than_student(impl):
    p = make_problem(N=19, D=16, Dt=40, V=90, kl_mask=True)
    _compare(p, impl, chunk_size=8)


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_num_items_normalises_mean(impl):
    p = make_problem(N=25, D=16, V=90)
    out, _ = run(p, impl=impl, num_items=1000)
    total, _ = run(p, impl=impl, reduction="sum")
    assert_close(out.loss, total.loss / 1000, what="mean with num_items", **F64)


@pytest.mark.parametrize("impl", CHUNKED_IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 7, None])
def test_chunk_size_does_not_change_the_result(impl, chunk_size):
    p = make_problem(N=37, D=16, V=90, kl_mask=True)
    _compare(p, impl, chunk_size=chunk_size)


def test_components_add_up():
    p = make_problem(N=25, D=16, V=90)
    out, _ = run(p, impl="torch", ce_weight=0.4, kl_weight=2.0, temperature=0.5)
    assert_close(out.loss, 0.4 * out.ce + 2.0 * 0.25 * out.kl, what="loss = w_ce ce + w_kl tau^2 kl", **F64)
    assert int(out.n_tokens) == int((p.labels != -100).sum())
    assert not out.ce.requires_grad and not out.kl.requires_grad


LOW_PRECISION = {  # make_problem settings, dtype, upstream gradient (a loss scale), chunk size
    "float32": (dict(N=37, D=24, V=203, kl_mask=True), torch.float32, None, 8),
    "float16": (dict(N=37, D=24, V=203, kl_mask=True), torch.float16, None, 8),
    # Gradients in the thousands; then logits spread wide enough that most softmax tails are ~1e-9.
    "float16 x 65536": (dict(N=64, D=24, V=203, bias=True, kl_mask=True, scale=3.0), torch.float16, 65536.0, 16),
    "float16 x 65536, wide logits": (dict(N=64, D=24, V=203, bias=True, kl_mask=True, scale=7.0), torch.float16,
                                     65536.0, 16),
}


@functools.lru_cache(maxsize=None)
def _low_precision(case: str):
    """``(low, upstream, chunk_size, truth, bounds)`` of a LOW_PRECISION case: the problem in
    its dtype, the float64 truth on the same inputs and the rounding bounds (which cost a
    Hessian per row, hence once per case), plain torch at the dtype checked against them (the
    bounds admit a correct computation)."""
    settings, dtype, scale, chunk = LOW_PRECISION[case]
    low = make_problem(**settings).cast(dtype)
    upstream = None if scale is None else torch.tensor(scale, dtype=torch.float64)
    truth = run(low.cast(torch.float64), upstream, impl="reference")
    # partial_sums: the chunked paths may round the weight gradient's sums once per chunk.
    bounds = rounding_bounds(low, upstream, partial_sums=math.ceil(low.h.shape[0] / chunk))
    assert_within_rounding(truth, run(low, upstream, impl="reference"), bounds, f"plain torch, {case}")
    return low, upstream, chunk, truth, bounds


def _fast(case: str, impl: str):
    """``impl`` on a LOW_PRECISION case: ``(out, grads)``, and the case's truth and bounds."""
    low, upstream, chunk, truth, bounds = _low_precision(case)
    return run(low, upstream, impl=impl, chunk_size=chunk), truth, bounds


def _needs_half_matmul(case: str, impl: str) -> None:
    if LOW_PRECISION[case][1] == torch.float16 and impl in CHUNKED_IMPLS and not _cpu_half_matmul_ok():
        pytest.skip("this torch build has no float16 matmul on CPU")


@pytest.mark.parametrize("impl", FAST_IMPLS)
@pytest.mark.parametrize("case", ["float32", "float16", "float16 x 65536"])
def test_low_precision_within_rounding_bounds(impl, case):
    """Loss, components and gradients within the worst-case rounding of the computation at
    the dtype, against the float64 truth on the same (rounded) inputs; under a GradScaler-sized
    loss scale too, with no overflow to inf/NaN."""
    _needs_half_matmul(case, impl)
    fast, truth, bounds = _fast(case, impl)
    assert all(bool(torch.isfinite(g).all()) for g in fast[1]), "non-finite gradients"
    assert_within_rounding(truth, fast, bounds, f"{impl}, {case}")


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_float16_small_logit_gradients_survive_a_loss_scale(impl):
    """Under a loss scale the softmax tails (~1e-9) are representable in float16 and must reach
    the weight gradient, as they do through autograd over plain float16 logits. (A logit
    gradient formed for an upstream gradient of 1 and scaled afterwards flushes them to zero;
    tests/kernels/test_rounding.py shows that these bounds reject that.) Judged entry by entry
    on the 20 weight-gradient rows of smallest norm, where those tails are all there is."""
    case = "float16 x 65536, wide logits"
    _needs_half_matmul(case, impl)
    fast, truth, bounds = _fast(case, impl)
    want = truth[1][1]
    small = want.norm(dim=1).argsort()[:20]
    bound = bounds[1][1][small]
    assert bool((bound < 0.5 * want[small].abs().amax(1, keepdim=True)).all()), "the bound must tell a flushed row"
    assert_within(f"{impl}: small weight-gradient rows", fast[1][1][small], want[small], bound)


def _cpu_half_matmul_ok() -> bool:
    try:
        torch.ones(2, 2, dtype=torch.float16) @ torch.ones(2, 2, dtype=torch.float16)
        return True
    except RuntimeError:
        return False


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_nothing_counted_gives_zero_loss_and_zero_grads(impl):
    p = make_problem(N=12, D=16, V=60, ignore_frac=1.0)
    out, grads = run(p, impl=impl)
    assert float(out.loss.detach()) == 0.0 and int(out.n_tokens) == 0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_zero_tokens(impl):
    p = make_problem(N=0, D=16, V=60)
    out, grads = run(p, impl=impl)
    assert float(out.loss.detach()) == 0.0
    assert grads[0].shape == (0, 16) and bool((grads[1] == 0).all())


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_nan_in_a_counted_position_propagates(impl):
    p = make_problem(N=12, D=16, V=60, ignore_frac=0.0)
    with torch.no_grad():
        p.h[3, 5] = float("nan")
    out, _ = run(p, impl=impl)
    assert torch.isnan(out.loss)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_nan_in_an_uncounted_position_stays_out(impl):
    # Padding rows (label ignored, outside kl_mask) contribute nothing, even when their hidden
    # state overflowed: loss and gradients equal those with any finite values there.
    p = make_problem(N=20, D=16, V=60, bias=True, kl_mask=True)
    uncounted = int(((p.labels == -100) & ~p.kl_mask).nonzero()[0, 0])
    clean, clean_grads = run(p, impl=impl)
    with torch.no_grad():
        p.h[uncounted] = float("nan")
        p.ht[uncounted] = float("inf")
    out, grads = run(p, impl=impl)
    assert_close(out.loss, clean.loss, what=f"{impl} loss", **F64)
    for i, (g, c) in enumerate(zip(grads, clean_grads)):
        assert_close(g, c, what=f"{impl} grad {i}", **F64)


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
def test_huge_logits_stay_finite(impl):
    # Logits of magnitude ~1e4: online log-sum-exp must not overflow.
    p = make_problem(N=12, D=16, V=60, dtype=torch.float32)
    with torch.no_grad():
        p.h.mul_(1e4 / (p.h @ p.W.T).abs().max())
    out, grads = run(p, impl=impl)
    assert torch.isfinite(out.loss) and all(bool(torch.isfinite(g).all()) for g in grads)
    assert float(out.loss.detach()) > 100  # the logits really are huge: CE is far from log V


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_double_backward_raises(impl):
    p = make_problem(N=8, D=16, V=40)
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl)
    with pytest.raises(RuntimeError, match="double backward"):
        torch.autograd.grad(loss, p.h, create_graph=True)


def test_default_impl_per_device():
    from sdft_kernels import default_impl

    assert default_impl("cpu") == "torch"
    assert default_impl(torch.device("cuda", 0)) == "triton_chunked"  # no GPU needed to ask


def test_auto_picks_torch_on_cpu_and_matches():
    p = make_problem(N=20, D=16, V=60)
    a, _ = run(p, impl="auto")
    b, _ = run(p, impl="torch")
    assert torch.equal(a.loss, b.loss)


def test_no_grad_forward_computes_no_gradients():
    p = make_problem(N=20, D=16, V=60)
    with torch.no_grad():
        loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="torch")
    ref = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="reference")
    assert_close(loss, ref, what="no_grad loss", **F64)


def _dft_by_definition(p, tau, kl_weight, reduction, upstream):
    """TRL SFTTrainer's dynamic fine-tuning, ``-log p(y) * p(y).detach()`` per labelled
    position, plus the divergence, on materialised float64 logits."""
    z_s = p.h @ p.W.T + p.b
    labelled = p.labels != -100
    logp = torch.log_softmax(z_s, -1).gather(-1, p.labels.clamp(min=0)[:, None])[:, 0]
    ce = torch.where(labelled, -logp * logp.exp().detach(), 0.0)
    z_t = (p.ht @ p.Wt.T + p.bt).detach()
    kl = (torch.softmax(z_t / tau, -1) * (torch.log_softmax(z_t / tau, -1) - torch.log_softmax(z_s / tau, -1))).sum(-1)
    rows = ce + kl_weight * tau**2 * kl * p.kl_mask
    loss = rows if reduction == "none" else rows.sum() / labelled.sum()
    grads = torch.autograd.grad(loss, (p.h, p.W, p.b), upstream)
    return loss.detach(), grads


@pytest.mark.parametrize("impl", ["reference", *FAST_IMPLS])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dft_weights_each_cross_entropy_by_its_detached_probability(impl, reduction):
    p = make_problem(N=37, D=24, V=203, bias=True, kl_mask=True, logit_scale=3.0)
    upstream = torch.randn(37, dtype=torch.float64) if reduction == "none" else torch.tensor(1.0, dtype=torch.float64)
    expected, expected_grads = _dft_by_definition(p, 0.7, 0.4, reduction, upstream)
    out, grads = run(p, upstream, impl=impl, loss_type="dft", temperature=0.7, kl_weight=0.4, reduction=reduction,
                     chunk_size=8)
    assert_close(out.loss, expected, what=f"{impl} dft loss", **F64)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, what=f"{impl} dft grad {i}", **F64)
    plain, _ = run(p, upstream, impl=impl, temperature=0.7, kl_weight=0.4, reduction=reduction, chunk_size=8)
    assert float((out.ce - plain.ce).abs().max()) > 0.1, "the weight must change the cross-entropy term"


@pytest.mark.parametrize("impl", FAST_IMPLS)
def test_dft_float16_gradient_formed_in_the_backward(impl):
    """float16 forms its gradient in the backward, with the real upstream gradient (no eager
    path): the weight is applied there too."""
    if impl in CHUNKED_IMPLS and not _cpu_half_matmul_ok():
        pytest.skip("this torch build has no float16 matmul on CPU")
    low = make_problem(N=37, D=24, V=203, bias=True, kl_mask=True, logit_scale=3.0).cast(torch.float16)
    truth = run(low.cast(torch.float64), impl="reference", loss_type="dft")
    plain_ce = run(low.cast(torch.float64), impl="reference")
    fast = run(low, impl=impl, loss_type="dft", chunk_size=8)
    # The rounding analysis has no DFT weight: its float16 tolerance, relative to the scale of
    # each gradient (tests/kernels/rounding.py), is far below the DFT weight's effect.
    logits = rounding.Logits.of(low.h, low.W, low.b, low.ht, low.Wt, low.bt, loss_options(loss_type="dft"))
    rtol = rounding.gradient_rtol(logits, torch.float16)
    assert_close(fast[0].loss, truth[0].loss, rtol=4 * rtol, atol=0, what=f"{impl} float16 dft loss")
    for i, (g, t, without) in enumerate(zip(fast[1], truth[1], plain_ce[1])):
        rounding.assert_relative(f"{impl} float16 dft grad {i}", g, t, rtol)
        assert float((without - t).norm()) > 10 * rtol * float(t.norm()), "the DFT weight must matter here"
