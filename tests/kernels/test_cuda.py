"""The same comparisons on a GPU, at realistic sizes and in bf16 (skipped without CUDA).

``make bench-gpu`` runs these first under a time limit, so the quick diagnostic tests come
first (pytest runs a file in order) and problems are drawn on the GPU.
"""

from __future__ import annotations

import pytest
import torch

from sdft_kernels import fused_linear_sdft_loss
from tests.kernels.helpers import assert_within_scale, make_problem, run

pytestmark = pytest.mark.cuda



def _problem(N, D, V, dtype, **kw):
    """A problem drawn on the GPU (float64), cast to ``dtype``."""
    return make_problem(N=N, D=D, V=V, device="cuda", **kw).cast(dtype)


def _extra_memory(step) -> int:
    """Peak allocated bytes over ``step()`` beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    step()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def test_auto_is_triton_chunked_on_cuda():
    p = _problem(100, 64, 1000, torch.float32)
    a, _ = run(p, impl="auto")
    b, _ = run(p, impl="triton_chunked")
    assert torch.equal(a.loss, b.loss)


def test_weight_gradient_sums_are_float32_on_cuda():
    """cuBLAS accumulates half-precision chunk products into float32 sums in place (torch
    >= 2.10 for a float32 ``self``); without it the chunked paths round the weight gradient
    once per chunk. Checked through the call the chunk loop makes, at a real size, against a
    float32 product of the same half-precision values."""
    from sdft_kernels.weight_grad import accumulate_weight_grad, fp32_accumulating_addmm

    device = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.bfloat16, torch.float16):
        assert fp32_accumulating_addmm(device, dtype), (
            f"torch {torch.__version__}: addmm(out_dtype=float32) of {dtype} products into a float32 "
            "buffer is unavailable"
        )
        dz = torch.randn(3000, 4096, device=device).to(dtype)
        h = torch.randn(3000, 512, device=device).to(dtype)
        d_w = torch.full((4096, 512), float("nan"), device=device)
        for i, s in enumerate(range(0, 3000, 1024)):
            accumulate_weight_grad(d_w, dz[s:s + 1024], h[s:s + 1024], first=i == 0)
        want = dz.float().t() @ h.float()
        err = float((d_w - want).abs().max() / want.abs().max())
        assert err < 1e-5, f"{dtype}: float32 sums off by {err:.2g} of the largest entry"


def test_no_logits_sized_allocation():
    """The fused path's extra memory is O(N) statistics plus the gradients and their float32
    partial sums: nothing of [N, V] size."""
    N, D, V = 8192, 1024, 128256
    p = _problem(N, D, V, torch.bfloat16)
    extra = _extra_memory(lambda: fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="triton").backward())
    grads = p.h.numel() * 2 + p.W.numel() * 2
    fp32_accumulators = p.h.numel() * 4 + p.W.numel() * 4
    slack = 64 * 2**20
    assert slack < N * V * 2 / 16, "the slack must be far below one [N, V] bf16 matrix"
    assert extra < grads + fp32_accumulators + slack, f"{extra / 2**20:.0f} MiB extra"


def test_chunked_memory_is_its_chunk_buffers_plus_gradients():
    """Two [chunk, V] bf16 logit buffers, the float32 weight-gradient sums and their bf16
    copy, the hidden gradient and the zeroed copies of the hidden states."""
    N, D, V, chunk = 8192, 1024, 128256, 1024
    p = _problem(N, D, V, torch.bfloat16)
    extra = _extra_memory(lambda: fused_linear_sdft_loss(
        p.h, p.W, p.labels, p.ht, p.Wt, impl="triton_chunked", chunk_size=chunk).backward())
    expected = 2 * chunk * V * 2 + p.W.numel() * (4 + 2) + p.h.numel() * 2 * 3
    assert extra < expected + 64 * 2**20, f"{extra / 2**20:.0f} MiB extra, expected about {expected / 2**20:.0f}"


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_no_host_synchronisation(impl):
    """With label validation off and a Python num_items, a training step's loss never waits
    for the GPU: CUDA's sync debug mode turns any synchronisation into an error."""
    p = _problem(1000, 256, 5000, torch.bfloat16, kl_mask=True)
    call = lambda: fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=p.kl_mask, impl=impl,  # noqa: E731
                                          validate_labels=False, num_items=777, chunk_size=384)
    call().backward()  # first call: compiles, probes cuBLAS once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        call().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_robustness_cases_on_cuda(impl):
    """tests/kernels/test_robustness.py's cases on CUDA tensors, float64 against the reference on
    the same tensors: teacher NaN in rows without the divergence, masked (-inf) teacher entries
    including whole leading tiles, strided and expanded row vectors, and no_grad."""
    def compare(p, what, **kw):
        ref, ref_grads = run(p, impl="reference", **kw)
        out, grads = run(p, impl=impl, chunk_size=64, **kw)
        for a, b, name in [(out.loss, ref.loss, "loss"), *((g, r, f"grad {i}") for i, (g, r) in
                                                          enumerate(zip(grads, ref_grads)))]:
            assert torch.isfinite(a).all(), f"{what} {name}"
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11, msg=lambda m: f"{what} {name}: {m}")

    p = make_problem(N=300, D=64, V=5003, kl_mask=True, bias=True, device="cuda")
    ce_only = (p.labels != -100) & ~p.kl_mask
    p.ht = p.ht.masked_fill(ce_only.unsqueeze(1), float("nan"))
    compare(p, "teacher NaN outside kl_mask", divergence="jsd", jsd_beta=0.3)

    p = make_problem(N=300, D=64, V=5003, bias=True, device="cuda")
    masked = torch.zeros(5003, dtype=torch.bool, device="cuda")
    masked[:4500] = True  # more than a whole tile of the epilogue (4096) and of the fused kernels
    p.bt = p.bt.masked_fill(masked, float("-inf"))
    compare(p, "masked teacher entries", divergence="forward_kl")

    p = make_problem(N=300, D=64, V=5003, bias=True, device="cuda")
    strided_labels = torch.stack([p.labels, p.labels], 1)[:, 0]
    out = fused_linear_sdft_loss(p.h, p.W, strided_labels, p.ht, p.Wt, kl_mask=torch.tensor(True, device="cuda").expand(300),
                                 student_bias=torch.stack([p.b.detach(), p.b.detach()], 1)[:, 0], impl=impl)
    ref = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=torch.ones(300, dtype=torch.bool, device="cuda"),
                                 student_bias=p.b, impl="reference")
    torch.testing.assert_close(out, ref, rtol=1e-9, atol=1e-11)


def test_autocast_bfloat16_on_cuda():
    """fp32 weights under autocast(bfloat16): the GEMMs and kernels run in bfloat16, as
    F.linear's would, and the gradients come back in float32."""
    p = _problem(1000, 256, 5000, torch.float32)
    low = p.cast(torch.bfloat16)
    for impl in ("triton", "triton_chunked"):
        expected, expected_grads = run(low, impl=impl, chunk_size=384)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out, grads = run(p, impl=impl, chunk_size=384)
        assert torch.equal(out.loss, expected.loss), impl
        for g, e in zip(grads, expected_grads):
            assert g.dtype == torch.float32 and torch.equal(g, e.float()), impl


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_tensors_on_another_gpu_than_the_current_one(impl):
    """A head on cuda:1 while cuda:0 is current (device_map="auto"): every launch runs on the
    tensors' device."""
    p = make_problem(N=300, D=64, V=5003, kl_mask=True, device="cuda:1").cast(torch.float32)
    with torch.cuda.device(0):
        out, grads = run(p, impl=impl, chunk_size=128)
    assert all(g.device == torch.device("cuda", 1) for g in grads)
    assert_within_scale(p, run(p.cast(torch.float64), impl="reference"), (out, grads), f"{impl} on cuda:1")


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_deterministic(impl):
    p = _problem(3000, 512, 50000, torch.bfloat16)
    a, ga = run(p, impl=impl, chunk_size=1024)
    b, gb = run(p, impl=impl, chunk_size=1024)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


RAGGED = (1000, 512, 32003)  # ragged in every dimension
LLAMA3 = (2048, 1024, 128256)  # a Llama-3 vocabulary
# bf16, the dtype people train in, gets every divergence at both shapes; fp16 and fp32 the
# paper's forward KL; bf16 also biases with a Gemma-2 softcap. (Each dtype x divergence x
# flag set compiles every kernel once: the list is kept short to fit make bench-gpu's budget.)
ACCURACY_CASES = [
    *[(torch.bfloat16, d, shape, {}) for d in ("forward_kl", "reverse_kl", "jsd") for shape in (RAGGED, LLAMA3)],
    (torch.float16, "forward_kl", RAGGED, {}),
    (torch.float32, "forward_kl", RAGGED, {}),
    (torch.bfloat16, "forward_kl", RAGGED, {"bias": True, "softcap": 30.0}),
]


# "torch" too: on CUDA its chunk gradient is rounded to the input dtype before the GEMMs.
@pytest.mark.parametrize("impl", ["triton", "triton_chunked", "torch"])
@pytest.mark.parametrize(
    "dtype, divergence, shape, extra", ACCURACY_CASES,
    ids=[f"{str(c[0])[6:]}-{c[1]}-V{c[2][2]}{'-bias-softcap' if c[3] else ''}" for c in ACCURACY_CASES],
)
def test_matches_truth_within_rounding(impl, dtype, divergence, shape, extra):
    """Loss and components within their rounding bounds, gradients within the dtype's relative
    tolerance at these logits (tests/kernels/rounding.py), of the truth on the same inputs;
    plain torch at the dtype too, which checks that the bounds admit a correct computation."""
    N, D, V = shape
    kw = dict(divergence=divergence, softcap=extra.get("softcap"))
    low = _problem(N, D, V, dtype, kl_mask=True, bias=extra.get("bias", False))
    # Truth: float64 where a [N, V] float64 matrix is small, float32 at the Llama-3 head.
    exact = torch.float64 if V < 60000 else torch.float32
    truth = run(low.cast(exact), impl="reference", **kw)
    plain = run(low, impl="reference", **kw)
    # chunk_size 384 (chunked paths): several chunks, the last one ragged.
    fast = run(low, impl=impl, chunk_size=384, **kw)
    what = f"{impl} {dtype} {divergence} {extra}"
    assert_within_scale(low, truth, plain, f"plain torch, {what}", exact, **kw)
    assert_within_scale(low, truth, fast, what, exact, **kw)
