"""The chunked path's Triton epilogue on given logits, against autograd on plain torch.

The whole ``impl="triton_chunked"`` path is compared with the reference in test_fused_loss.py;
these tests pin down the epilogue itself: its rows, its in-place gradient, the rows it must
zero, and its one-row-per-program GPU tiling (run here in the interpreter).
"""

import os

import pytest
import torch

from sdft_kernels.options import LossOptions
from sdft_kernels.reference import divergence_rows, transform_logits
from sdft_kernels.weight_grad import accumulate_weight_grad
from tests.kernels import rounding
from tests.kernels.helpers import make_problem
from sdft_kernels.triton_chunked import EpilogueConfig, chunk_epilogue

pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="needs Triton's interpreter (no GPU present)"
)

C, V = 19, 203
# 16 rows x 64 columns: two row blocks, four vocabulary tiles, both ragged. One row per
# program is the GPU tiling.
RAGGED = EpilogueConfig(block_n=16, block_v=64, num_warps=1)
ONE_ROW = EpilogueConfig(block_n=1, block_v=128, num_warps=1)


def _problem(dtype=torch.float64, teacher=True, bias=True, seed=0):
    """The epilogue's inputs from :func:`tests.kernels.helpers.make_problem`: its ``[C, V]``
    logits (about 2 in size), biases, labels with ignored ones, a KL mask and per-row scales."""
    p = make_problem(N=C, D=16, V=V, teacher=teacher, bias=bias, kl_mask=True, ignore_frac=0.25,
                     logit_scale=2.0, seed=seed)
    z_s, z_t = p.logits()
    ce_scale, kl_scale = p.row_scales(seed=seed + 1)
    cast = lambda t: None if t is None else t.detach().to(dtype)  # noqa: E731
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    return dict(z_s=cast(z_s), z_t=cast(z_t), b=cast(p.b), bt=cast(p.bt), labels=p.labels, kl_mask=p.kl_mask,
                ce_scale=ce_scale.to(acc), kl_scale=kl_scale.to(acc))


def _truth(p, o: LossOptions):
    """Masked rows and ``d sum(ce_scale ce + kl_scale tau^2 D) / d z_s`` by autograd in float64."""
    z = p["z_s"].double().clone().requires_grad_()
    x = z + p["b"].double() if p["b"] is not None else z
    z_s = transform_logits(x, o.student_logit_scale, o.student_cap)
    counted = p["labels"] != o.ignore_index
    lse = z_s.logsumexp(-1)
    ce = torch.where(counted, lse - z_s.gather(1, p["labels"].clamp(min=0)[:, None])[:, 0], 0.0)
    objective = (p["ce_scale"].double() * ce).sum()
    div = torch.zeros_like(ce)
    if p["z_t"] is not None:
        zt = p["z_t"].double() + (p["bt"].double() if p["bt"] is not None else 0.0)
        z_t = transform_logits(zt, o.teacher_logit_scale, o.teacher_cap)
        tau = o.temperature
        div = divergence_rows(torch.log_softmax(z_s / tau, -1), torch.log_softmax(z_t / tau, -1),
                              o.effective_divergence, o.jsd_beta)
        objective = objective + (p["kl_scale"].double() * tau**2 * div).sum()
        div = div * p["kl_mask"]
    (dz,) = torch.autograd.grad(objective, z)
    return ce.detach(), div.detach(), dz


CASES = {
    "forward_kl, biases": LossOptions(divergence="forward_kl", temperature=0.7),
    "reverse_kl, softcap": LossOptions(divergence="reverse_kl", temperature=2.0, softcap=3.0),
    "jsd beta 0.3, softcap": LossOptions(divergence="jsd", jsd_beta=0.3, softcap=4.0),
    "forward_kl, own softcaps and logit scales": LossOptions(divergence="forward_kl", student_softcap=3.0,
                                                             teacher_softcap=5.0, student_logit_scale=1.5,
                                                             teacher_logit_scale=0.8),
}


@pytest.mark.parametrize("config", [RAGGED, ONE_ROW], ids=["ragged", "one-row"])
@pytest.mark.parametrize("case", CASES)
def test_float64_rows_and_gradient_match_autograd(case, config):
    o = CASES[case]
    p = _problem()
    ce_want, div_want, dz_want = _truth(p, o)
    z_s = p["z_s"]
    s = o.student_logit_scale  # the scales carry it (reduction.row_scales)
    ce, div = chunk_epilogue(z_s, p["z_t"], p["b"], p["bt"], p["labels"], p["kl_mask"], o,
                             p["ce_scale"] * s, p["kl_scale"] * s, config=config)
    torch.testing.assert_close(ce, ce_want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div, div_want, rtol=1e-12, atol=1e-12)
    # The gradient replaced the student logits in place.
    torch.testing.assert_close(z_s, dz_want, rtol=1e-12, atol=1e-12)


def test_without_teacher_and_without_gradient():
    o = LossOptions()
    p = _problem(teacher=False, bias=False)
    ce_want, _, _ = _truth(p, o)
    before = p["z_s"].clone()
    ce, div = chunk_epilogue(p["z_s"], None, None, None, p["labels"], p["kl_mask"], o, config=RAGGED)
    torch.testing.assert_close(ce, ce_want, rtol=1e-12, atol=1e-12)
    assert torch.equal(div, torch.zeros_like(div))
    assert torch.equal(p["z_s"], before), "no scales given: the logits must stay untouched"


def test_rows_that_count_for_nothing_get_exact_zeros_whatever_their_logits():
    o = LossOptions(divergence="forward_kl")
    p = _problem()
    dead = (p["labels"] == -100) & ~p["kl_mask"]
    assert dead.any() and not dead.all()
    ce_want, div_want, dz_want = _truth(p, o)
    p["z_s"][dead] = float("nan")
    p["z_t"][dead] = float("inf")
    ce, div = chunk_epilogue(p["z_s"], p["z_t"], p["b"], p["bt"], p["labels"], p["kl_mask"], o,
                             p["ce_scale"], p["kl_scale"], config=RAGGED)
    assert torch.equal(p["z_s"][dead], torch.zeros_like(p["z_s"][dead]))
    assert torch.equal(ce[dead], torch.zeros_like(ce[dead])) and torch.equal(div[dead], torch.zeros_like(div[dead]))
    torch.testing.assert_close(p["z_s"][~dead], dz_want[~dead], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ce[~dead], ce_want[~dead], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_low_precision_logits(dtype):
    """Rows in float32 from half or single logits, dz in the logits' dtype: each within its
    worst-case rounding of the float64 values on the same (rounded) logits."""
    o = LossOptions(divergence="jsd", jsd_beta=0.4, softcap=20.0)
    p = _problem(dtype=dtype)
    ce_want, div_want, dz_want = _truth(p, o)
    logits = rounding.Logits.given(p["z_s"], p["z_t"], p["b"], p["bt"], o)
    ce_bound, div_bound = rounding.row_bounds(logits, p["labels"], p["kl_mask"])
    _, dz_bound = rounding.logit_gradient_error(logits, p["labels"], p["kl_mask"], p["ce_scale"], p["kl_scale"], dtype)
    ce, div = chunk_epilogue(p["z_s"], p["z_t"], p["b"], p["bt"], p["labels"], p["kl_mask"], o,
                             p["ce_scale"], p["kl_scale"], config=RAGGED)
    assert ce.dtype == torch.float32 and div.dtype == torch.float32 and p["z_s"].dtype == dtype
    rounding.assert_within("ce rows", ce, ce_want, ce_bound)
    rounding.assert_within("divergence rows", div, div_want, div_bound)
    rounding.assert_within("dz", p["z_s"], dz_want, dz_bound)


def test_first_weight_gradient_chunk_ignores_the_uninitialised_buffer():
    """The loop allocates the weight gradient with torch.empty; its first chunk overwrites it."""
    dz, h = torch.randn(5, 7, dtype=torch.float64), torch.randn(5, 3, dtype=torch.float64)
    d_w = torch.full((7, 3), float("nan"), dtype=torch.float64)
    accumulate_weight_grad(d_w, dz[:2], h[:2], first=True)
    accumulate_weight_grad(d_w, dz[2:], h[2:], first=False)
    torch.testing.assert_close(d_w, dz.t() @ h, rtol=1e-12, atol=1e-12)
