"""Half-precision inputs, as mixed-precision training hands them to the loss.

The oracle is the float64 reference on the very same (rounded) input values: whatever error is
left is the implementation's own. With float32 logits (the default) the loss is within 1e-5 of
it and every gradient within 3e-3 of its norm, the tolerances TRL holds its own chunked
divergence to under autocast; logits rounded to bf16 before the softmax miss both by orders of
magnitude. ``logits_dtype="input"`` keeps that rounding on purpose: it reproduces the loss of
materialised bf16/fp16 logits.

Triton's interpreter mishandles bfloat16, so the Triton paths are tested here in float16.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from tests.kernels.helpers import make_problem, run

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
TRITON = ["triton", "triton_chunked"] if INTERPRETER else []
LOSS_TOL = 1e-5  # relative to max(1, |loss|)
GRAD_TOL = 3e-3  # norm-wise, relative to the gradient's norm


def _cases():
    """(impl, dtype) pairs: every impl in float16, the torch ones also in bfloat16."""
    for impl in ["reference", "torch", *TRITON]:
        for dtype in (torch.bfloat16, torch.float16):
            if dtype == torch.bfloat16 and impl in TRITON:
                continue
            yield pytest.param(impl, dtype, id=f"{impl}-{str(dtype).replace('torch.', '')}")


def _half_problem(dtype, teacher=True):
    """A ragged problem with logits of a few units (where bf16 keeps 2 decimal digits), biases,
    ignored labels and a KL mask apart from them, in ``dtype``."""
    return make_problem(N=37, D=48, Dt=40, V=203, bias=True, kl_mask=True, logit_scale=4.0,
                        teacher=teacher).cast(dtype)


def assert_within(name, got, want, tol):
    """``|got - want| <= tol * max(1, |want|)`` for scalars, norm-wise for tensors."""
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert bool(torch.isfinite(got).all()), f"{name}: non-finite values"
    if want.dim() == 0:
        err, scale = float((got - want).abs()), max(1.0, float(want.abs()))
    else:
        err, scale = float((got - want).norm()), max(float(want.norm()), 1e-30)
    assert err <= tol * scale, f"{name}: error {err / scale:.3g} (relative) > {tol:g}"


def _check_against_float64(low, impl, upstream=None, autocast_problem=None, **kw):
    """Loss, ce, kl and every gradient of ``impl`` on ``low`` (or on ``autocast_problem`` under
    autocast to ``low``'s dtype) against the float64 reference on ``low``'s values."""
    truth, truth_grads = run(low.cast(torch.float64), upstream, impl="reference", **kw)
    if autocast_problem is None:
        out, grads = run(low, upstream, impl=impl, chunk_size=8, **kw)
    else:
        with torch.autocast("cpu", dtype=low.h.dtype):
            out, grads = run(autocast_problem, upstream, impl=impl, chunk_size=8, **kw)
    for name in ("loss", "ce", "kl"):
        assert_within(f"{impl} {name}", getattr(out, name), getattr(truth, name), LOSS_TOL)
    assert len(grads) == len(truth_grads) == 3
    for name, g, t in zip(("d hidden", "d weight", "d bias"), grads, truth_grads):
        assert_within(f"{impl} {name}", g, t, GRAD_TOL)


@pytest.mark.parametrize("impl, dtype", list(_cases()))
@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_half_inputs_match_float64_on_the_same_values(impl, dtype, divergence):
    low = _half_problem(dtype)
    _check_against_float64(low, impl, divergence=divergence, jsd_beta=0.3, temperature=0.7)


@pytest.mark.parametrize("impl, dtype", list(_cases()))
def test_half_inputs_with_softcap_and_per_row_upstream_gradient(impl, dtype):
    low = _half_problem(dtype)
    upstream = torch.randn(low.labels.numel(), dtype=torch.float64)
    _check_against_float64(low, impl, upstream, reduction="none", softcap=6.0)
    # "none" gives rows: the check above compares them norm-wise; each row as a scalar too.
    truth, _ = run(low.cast(torch.float64), upstream, impl="reference", reduction="none", softcap=6.0)
    out, _ = run(low, upstream, impl=impl, reduction="none", softcap=6.0, chunk_size=8)
    err = (out.loss.double() - truth.loss).abs() / truth.loss.abs().clamp_min(1.0)
    err = err.detach()
    assert float(err.max()) <= LOSS_TOL, f"worst row {int(err.argmax())}: {float(err.max()):.3g}"


@pytest.mark.parametrize("impl, dtype", list(_cases()))
def test_under_autocast_float32_inputs_get_float32_logits(impl, dtype):
    """float32 leaves under autocast: the GEMMs run in its dtype, the logits stay float32."""
    low = _half_problem(dtype)
    full = low.cast(torch.float32)
    _check_against_float64(low, impl, autocast_problem=full)
    assert full.h.grad.dtype == torch.float32 and full.W.grad.dtype == torch.float32


@pytest.mark.parametrize("impl, dtype", list(_cases()))
def test_logits_dtype_input_rounds_as_an_hf_head(impl, dtype):
    """``logits_dtype="input"``: the cross-entropy of ``F.linear``'s rounded logits, which an HF
    model in that dtype computes; the default is closer to the float64 truth than that."""
    low = _half_problem(dtype, teacher=False)
    hf = F.cross_entropy(F.linear(low.h, low.W, low.b).float(), low.labels)
    truth = F.cross_entropy(F.linear(low.h.double(), low.W.double(), low.b.double()), low.labels)
    rounded, _ = run(low, impl=impl, logits_dtype="input")
    default, _ = run(low, impl=impl)
    rounding = float((hf.double() - truth).abs())
    assert rounding > 20 * LOSS_TOL, "the problem must make the rounding visible"
    assert float((rounded.loss.double() - hf.double()).abs()) <= 0.05 * rounding
    assert float((default.loss.double() - truth).abs()) <= LOSS_TOL * max(1.0, float(truth.abs()))


# ------------------------------------------------------------------------------ mixed dtypes


def _mixed(p64, hidden, head, bias, teacher_hidden=None, teacher_head=None):
    """``p64``'s values with the student's hidden states, head and bias in the given dtypes
    (the teacher's in its own, default the student's), as fresh leaves."""
    def leaf(t, dtype, grad=True):
        return None if t is None else t.detach().to(dtype).requires_grad_(grad)

    q = p64.cast(torch.float64)
    q.h, q.W, q.b = leaf(p64.h, hidden), leaf(p64.W, head), leaf(p64.b, bias)
    q.ht = leaf(p64.ht, teacher_hidden or hidden, grad=False)
    q.Wt = leaf(p64.Wt, teacher_head or head, grad=False)
    q.bt = leaf(p64.bt, bias, grad=False)
    return q


def _mixed_cases():
    """(impl, hidden, head, bias, teacher hidden, teacher head) as mixed precision hands them
    over: half activations with a float32 master head (and bias), a float32 bias beside a half
    head, a half teacher cache read through a float32 teacher head."""
    half = {"reference": torch.bfloat16, "torch": torch.bfloat16, "triton": torch.float16,
            "triton_chunked": torch.float16}
    f32 = torch.float32
    for impl in ["reference", "torch", *TRITON]:
        h = half[impl]
        yield pytest.param(impl, h, f32, f32, None, None, id=f"{impl}-half-hidden-f32-head")
        yield pytest.param(impl, h, h, f32, None, None, id=f"{impl}-half-head-f32-bias")
        yield pytest.param(impl, f32, f32, f32, h, f32, id=f"{impl}-half-teacher-hidden-f32-teacher-head")


@pytest.mark.parametrize("impl, hidden, head, bias, teacher_hidden, teacher_head", list(_mixed_cases()))
def test_mixed_dtypes_match_float64_on_the_same_values(impl, hidden, head, bias, teacher_hidden, teacher_head):
    """Without autocast, mixed dtypes compute in their promoted dtype; each gradient comes back
    in its own tensor's dtype."""
    p64 = make_problem(N=37, D=48, V=203, bias=True, kl_mask=True, logit_scale=4.0)
    mixed = _mixed(p64, hidden, head, bias, teacher_hidden, teacher_head)
    _check_against_float64(mixed, impl, divergence="jsd", jsd_beta=0.3, softcap=9.0)
    assert (mixed.h.grad.dtype, mixed.W.grad.dtype, mixed.b.grad.dtype) == (hidden, head, bias)


@pytest.mark.parametrize("impl", ["reference", "torch", *TRITON])
def test_mixed_dtypes_under_autocast_are_cast_first(impl):
    """Under autocast every floating input is cast to its dtype (as F.linear casts), whatever
    dtype it came in: the same loss as the inputs cast by hand."""
    half, f32 = torch.float16, torch.float32
    p32 = make_problem(N=29, D=32, V=150, bias=True, kl_mask=True, logit_scale=4.0).cast(f32)
    mixed = _mixed(p32, half, f32, f32, teacher_hidden=half, teacher_head=f32)
    by_hand, _ = run(_mixed(p32, half, half, half), impl=impl, chunk_size=8)
    with torch.autocast("cpu", dtype=half):
        out, grads = run(mixed, impl=impl, chunk_size=8)
    assert torch.equal(out.loss, by_hand.loss)
    assert [g.dtype for g in grads] == [half, f32, f32]
