"""The Triton forward and backward kernels against plain torch on materialised logits.

Without a GPU the kernels run in Triton's interpreter (tests/conftest.py switches it on), so
shapes are small; the tile config below is small too, so that every shape still spans several
token blocks, vocabulary tiles and hidden chunks, each with a ragged tail.
"""

import dataclasses
import os
from typing import NamedTuple, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.distributions import Categorical

from sdft_kernels.options import LossOptions
from sdft_kernels.reference import divergence_rows, transform_logits
from sdft_kernels.triton_backward import sdft_backward
from sdft_kernels.triton_common import KernelConfig
from sdft_kernels.triton_forward import ForwardStats, sdft_forward
from tests.kernels import helpers
from tests.kernels import rounding

# These run the kernels on CPU tensors in Triton's interpreter (tests/conftest.py turns it on
# when there is no GPU); with a GPU, test_cuda.py runs the kernels for real.
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU present)"
)

# N = 37 tokens -> 3 blocks of 16; V = 203 -> 4 tiles of 64; D = 50 -> 4 chunks of 16;
# Dt = 34 -> 3 chunks. Every dimension ends on a partial tile.
N, D, DT, V = 37, 50, 34, 203
CORE_STATS = ForwardStats._fields[:8]  # the statistics; entropy and top1 only with metrics
TILES = KernelConfig(block_n=16, block_v=64, block_d=16)
IGNORE = -100


class Problem(NamedTuple):
    """:func:`tests.kernels.helpers.make_problem`'s tensors as the kernels take them: detached,
    with the per-row scales of the backward."""

    h: Tensor
    W: Tensor
    b: Optional[Tensor]
    ht: Optional[Tensor]
    Wt: Optional[Tensor]
    bt: Optional[Tensor]
    labels: Tensor
    kl_mask: Tensor
    ce_scale: Tensor
    kl_scale: Tensor

    def to(self, dtype: torch.dtype, teacher_dtype: Optional[torch.dtype] = None) -> "Problem":
        teacher_dtype = teacher_dtype or dtype
        cast = lambda x, dt: None if x is None else x.to(dt)  # noqa: E731
        return self._replace(
            h=cast(self.h, dtype), W=cast(self.W, dtype), b=cast(self.b, dtype),
            ht=cast(self.ht, teacher_dtype), Wt=cast(self.Wt, teacher_dtype), bt=cast(self.bt, teacher_dtype),
        )


def make_problem(*, bias=True, teacher=True, teacher_bias=True, shared_head=False, n=N, logit_scale=1.0,
                 ignore_index=IGNORE) -> Problem:
    """float64 inputs with logits of roughly unit size (times ``logit_scale``), about 20%
    ignored labels, a KL mask drawn apart from them, and scales that are a random upstream
    gradient (either sign) restricted to the counted rows."""
    p = helpers.make_problem(N=n, D=D, Dt=DT, V=V, teacher=teacher, bias=bias, teacher_bias=teacher_bias,
                             shared_head=shared_head, kl_mask=True, logit_scale=logit_scale, ignore_index=ignore_index)
    ce_scale, kl_scale = p.row_scales(ignore_index=ignore_index)
    detach = lambda t: None if t is None else t.detach()  # noqa: E731
    return Problem(detach(p.h), detach(p.W), detach(p.b), detach(p.ht), detach(p.Wt), detach(p.bt),
                   p.labels, p.kl_mask, ce_scale, kl_scale)


def statistics(x_s: Tensor, x_t: Optional[Tensor], p: Problem, o: LossOptions):
    """``(ForwardStats, objective)`` of pre-softcap logits ``[N, V]`` in their own dtype: the
    rows the forward kernel returns, and ``sum ce_scale * ce + kl_scale * tau^2 * D`` (D
    unmasked: the mask already lives in ``kl_scale``)."""
    z_s = transform_logits(x_s, o.student_logit_scale, o.student_cap)
    tau = o.temperature
    counted = p.labels != o.ignore_index
    m = z_s.max(-1).values
    log_sum_1 = (z_s - m[:, None]).logsumexp(-1)
    lse = m + log_sum_1
    z_y = z_s.gather(-1, p.labels.masked_fill(~counted, 0)[:, None])[:, 0]
    ce = torch.where(counted, lse - z_y, 0.0)
    zero = torch.zeros_like(lse)
    log_sum_s = m_t = log_sum_t = div = aux = zero
    objective = (p.ce_scale.to(z_s.dtype) * ce).sum()
    if x_t is not None:
        z_t = transform_logits(x_t, o.teacher_logit_scale, o.teacher_cap)
        m_t = z_t.max(-1).values
        log_sum_s = ((z_s - m[:, None]) / tau).logsumexp(-1)
        log_sum_t = ((z_t - m_t[:, None]) / tau).logsumexp(-1)
        lse_s, lse_t = m / tau + log_sum_s, m_t / tau + log_sum_t
        logp_s, logp_t = torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1)
        div = divergence_rows(logp_s, logp_t, o.effective_divergence, o.jsd_beta)
        if o.effective_divergence == "reverse_kl":  # E_ps[a_s - a_t]: KL(p_s || p_t) without the lses
            aux = div + lse_s - lse_t
        elif o.effective_divergence == "jsd":
            beta = torch.tensor(o.jsd_beta, dtype=torch.float64)
            log_m = torch.logaddexp(logp_t + beta.log(), logp_s + (1 - beta).log())
            aux = (logp_s.exp() * (logp_s - log_m)).sum(-1)
        objective = objective + (p.kl_scale.to(z_s.dtype) * tau**2 * div).sum()
        div = div * p.kl_mask
    entropy = top1 = None
    if o.metrics:  # the student's, at temperature 1, on the labelled rows
        entropy = torch.where(counted, Categorical(logits=z_s.detach()).entropy(), 0.0)
        top1 = (z_s.argmax(-1) == p.labels) & counted
    return ForwardStats(m, log_sum_1, log_sum_s, m_t, log_sum_t, ce, div, aux, entropy, top1), objective


def torch_stats_and_grads(p: Problem, o: LossOptions):
    """Plain torch on full logits: ``(ForwardStats, (dh, dW, db))``.

    Logits are computed in the input dtype and promoted (as the reference does); the gradients
    come from autograd on :func:`statistics`' objective.
    """
    acc = torch.float64 if p.h.dtype == torch.float64 else torch.float32
    h, W = p.h.clone().requires_grad_(), p.W.clone().requires_grad_()
    b = None if p.b is None else p.b.clone().requires_grad_()
    x_t = None if p.ht is None else F.linear(p.ht, p.Wt, p.bt).to(acc)
    stats, objective = statistics(F.linear(h, W, b).to(acc), x_t, p, o)
    leaves = [h, W] + ([b] if b is not None else [])
    grads = list(torch.autograd.grad(objective, leaves)) + ([None] if b is None else [])
    return ForwardStats(*(None if x is None else x.detach() for x in stats)), tuple(grads)


def rounding_bounds(p: Problem, o: LossOptions):
    """``(ForwardStats, (dh, dW, db))`` of bounds on how far a computation of ``p`` in its
    dtypes may be from the float64 truth on the same inputs (:mod:`tests.kernels.rounding`)."""
    logits = rounding.Logits.of(p.h, p.W, p.b, p.ht, p.Wt, p.bt, o)
    x_s, x_t = logits.leaves()
    stats, _ = statistics(x_s, x_t, p, o)
    m_ce, m_div = rounding.row_magnitudes(logits.x_s, logits.x_t, p.labels, o)
    V = x_s.shape[1]
    bounds = {}
    for field in CORE_STATS:
        value = getattr(stats, field)
        if not value.requires_grad:  # a constant 0 (aux of the forward KL): exactly 0 it must be
            bounds[field] = torch.zeros_like(value)
            continue
        if field in ("m", "m_t"):  # the maximum moves by at most the largest logit error
            err = logits.err_s if field == "m" else logits.err_t
            bounds[field] = torch.zeros_like(value) if err is None else err.amax(-1)
            continue
        sums, after = m_ce if field == "ce_rows" else m_div if field in ("div_rows", "div_aux") else (1.0, 0.0)
        bounds[field] = (rounding.first_order_bound(value, x_s, x_t, logits)
                         + rounding.row_rounding(value, sums, after, V, logits.acc)).detach()
    G, A = rounding.logit_gradient_error(logits, p.labels, p.kl_mask, p.ce_scale, p.kl_scale, p.h.dtype)
    grads = rounding.gradient_bounds(G, A, p.h, p.W, p.b is not None, logits.acc)
    return ForwardStats(**bounds), grads


def run_kernels(p: Problem, o: LossOptions, config: Optional[KernelConfig] = TILES, grads=(True, True, True)):
    stats = sdft_forward(p.h, p.W, p.b, p.ht, p.Wt, p.bt, p.labels, p.kl_mask, o, config=config)
    # The backward's scales carry the student's logit scale (reduction.row_scales).
    s = o.student_logit_scale
    out = sdft_backward(
        p.h, p.W, p.b, p.ht, p.Wt, p.bt, p.labels, stats, p.ce_scale * s, p.kl_scale * s, o, *grads,
        hidden_config=config, weight_config=config,
    )
    return stats, out


def worst(got: Tensor, want: Tensor) -> tuple[float, str]:
    """Largest absolute difference and a description of where it is."""
    diff = (got.double() - want.double()).abs()
    i = int(diff.argmax())
    idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), diff.shape))
    return float(diff.max()), f"at {idx}: got {got.flatten()[i].item():.10g}, want {want.flatten()[i].item():.10g}"


def assert_matches(name: str, got: Tensor, want: Tensor, rtol: float):
    """``max |got - want| <= rtol * max(1, max |want|)``, naming the worst element on failure."""
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err, where = worst(got, want)
    scale = max(1.0, float(want.double().abs().max()))
    assert err <= rtol * scale, f"{name}: error {err:.3g} > {rtol:.1g} * {scale:.3g} {where}"


def check_float64(p: Problem, o: LossOptions, grads=(True, True, True)):
    o = dataclasses.replace(o, metrics=True)  # the metrics are stored beside the statistics
    stats, out = run_kernels(p, o, grads=grads)
    want_stats, want_grads = torch_stats_and_grads(p, o)
    assert torch.equal(stats.top1, want_stats.top1)
    for field in CORE_STATS + ("entropy",):
        got = getattr(stats, field)
        assert got.dtype == torch.float64, f"{field}: dtype {got.dtype}"
        assert_matches(field, got, getattr(want_stats, field), 1e-12)
    for name, wanted, got, want in zip(("dh", "dW", "db"), grads, out, want_grads):
        if not wanted or want is None:
            assert got is None, f"{name} was not asked for"
            continue
        assert got.dtype == torch.float64
        assert_matches(name, got, want, 1e-12)


# Each case names what it covers; together they cover every flag of both kernels.
FLOAT64_CASES = {
    "forward_kl, both biases": (dict(), LossOptions(divergence="forward_kl", temperature=0.7)),
    "reverse_kl, softcap, no biases": (
        dict(bias=False, teacher_bias=False), LossOptions(divergence="reverse_kl", softcap=3.0, temperature=2.0),
    ),
    "jsd beta 0.3, softcap, student bias only": (
        dict(teacher_bias=False), LossOptions(divergence="jsd", jsd_beta=0.3, softcap=4.0),
    ),
    "jsd beta 0 (forward KL, as in TRL)": (dict(), LossOptions(divergence="jsd", jsd_beta=0.0)),
    "jsd beta 1 (reverse KL), shared head (Wt is W)": (
        dict(shared_head=True), LossOptions(divergence="jsd", jsd_beta=1.0, temperature=1.3),
    ),
    "jsd, a softcapped teacher of an uncapped student, logit scales": (
        dict(), LossOptions(divergence="jsd", jsd_beta=0.4, teacher_softcap=3.0, student_logit_scale=1.6,
                            teacher_logit_scale=0.7),
    ),
    "reverse_kl, each model its own softcap": (
        dict(teacher_bias=False), LossOptions(divergence="reverse_kl", student_softcap=2.5, teacher_softcap=6.0),
    ),
    "no teacher, ignore_index inside [0, V)": (
        dict(teacher=False, ignore_index=7), LossOptions(ignore_index=7, softcap=5.0),
    ),
}


@pytest.mark.parametrize("case", FLOAT64_CASES)
def test_float64_matches_torch(case):
    problem_kwargs, options = FLOAT64_CASES[case]
    check_float64(make_problem(**problem_kwargs), options)


def test_jsd_with_beta_0_or_1_is_forward_or_reverse_kl():
    """TRL's and Liger's convention: the mixture's end points are the two KLs, not 0."""
    p = make_problem()
    for beta, same_as in ((0.0, "forward_kl"), (1.0, "reverse_kl")):
        jsd, kl = (sdft_forward(p.h, p.W, p.b, p.ht, p.Wt, p.bt, p.labels, p.kl_mask, o, config=TILES)
                   for o in (LossOptions(divergence="jsd", jsd_beta=beta), LossOptions(divergence=same_as)))
        assert torch.equal(jsd.div_rows, kl.div_rows), beta
        assert bool((kl.div_rows[p.kl_mask] > 0).all()), beta


def test_only_requested_gradients():
    """Hidden gradient alone, then weight/bias alone (bias gradient without a weight gradient)."""
    p = make_problem()
    o = LossOptions(divergence="reverse_kl")
    check_float64(p, o, grads=(True, False, False))
    check_float64(p, o, grads=(False, False, True))


def check_within_rounding(p_low: Problem, o: LossOptions, config: Optional[KernelConfig]):
    """The kernels' statistics and gradients on ``p_low`` within their rounding bounds of the
    float64 truth on the same inputs (:func:`rounding_bounds`); plain torch at the same dtype
    too, which checks that the bounds are not tighter than a correct computation."""
    truth_stats, truth_grads = torch_stats_and_grads(p_low.to(torch.float64), o)
    bound_stats, bound_grads = rounding_bounds(p_low, o)
    stats, grads = run_kernels(p_low, o, config=config)
    plain_stats, plain_grads = torch_stats_and_grads(p_low, o)
    for who, got_stats, got_grads in (("kernels", stats, grads), ("plain torch", plain_stats, plain_grads)):
        for field in CORE_STATS:
            got = getattr(got_stats, field)
            assert got.dtype == torch.float32, f"{field}: dtype {got.dtype}"
            rounding.assert_within(f"{who} {field}", got, getattr(truth_stats, field), getattr(bound_stats, field))
        for name, got, truth, bound, like in zip(("dh", "dW", "db"), got_grads, truth_grads, bound_grads, p_low[:3]):
            assert got.dtype == like.dtype, f"{name}: dtype {got.dtype} != {like.dtype}"
            rounding.assert_within(f"{who} {name}", got, truth, bound)


@pytest.mark.parametrize(
    "dtype, teacher_dtype, divergence",
    [
        (torch.float32, torch.float32, "reverse_kl"),  # the common full-precision case
        (torch.float32, torch.float16, "jsd"),  # a half-precision teacher beside a float32 student
        (torch.float16, torch.float16, "forward_kl"),  # half precision end to end (bf16 needs a GPU)
    ],
    ids=["fp32", "fp32-fp16-teacher", "fp16"],
)
def test_low_precision_within_rounding_bounds(dtype, teacher_dtype, divergence):
    """Logits up to ~18 (softcap 20 bends them): every statistic and gradient within the
    worst-case rounding of the computation at its dtype, against the float64 truth on the
    same (rounded) inputs."""
    o = LossOptions(divergence=divergence, jsd_beta=0.3, softcap=20.0)
    check_within_rounding(make_problem(logit_scale=4.0).to(dtype, teacher_dtype), o, TILES)


# Masked lanes (rows past N, columns past V) may overflow to inf before tl.where drops them;
# numpy reports that in the interpreter.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_huge_logits_stay_finite(divergence):
    """Logits of magnitude ~1e4 in float32 with the default tiles: the shifted sums never
    overflow, and the error is within the float32 rounding of such logits (ulp(1e4) ~ 1e-3,
    times the terms summed), through each statistic's sensitivity to them."""
    check_within_rounding(make_problem(logit_scale=1e4).to(torch.float32), LossOptions(divergence=divergence), None)


def test_no_tokens():
    p = make_problem(n=0)
    stats, (dh, dW, db) = run_kernels(p, LossOptions())
    assert all(x.shape == (0,) for x in stats if x is not None)
    assert dh.shape == (0, D)
    assert torch.equal(dW, torch.zeros_like(p.W))
    assert torch.equal(db, torch.zeros_like(p.b))
