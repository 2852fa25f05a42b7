"""The same comparisons on a GPU, at realistic sizes and in bf16 (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from sdft_kernels import fused_linear_sdft_loss
from tests.kernels.helpers import assert_no_worse_than_plain, make_problem, run

pytestmark = pytest.mark.cuda

SLACK = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}


def _on_cuda(problem, dtype):
    p = problem.cast(dtype)
    for name in ("h", "W", "ht", "Wt", "b", "bt"):
        t = getattr(p, name)
        if t is not None:
            setattr(p, name, t.detach().cuda().requires_grad_(t.requires_grad))
    p.labels = p.labels.cuda()
    p.kl_mask = None if p.kl_mask is None else p.kl_mask.cuda()
    return p


RAGGED = (1000, 512, 32003)  # ragged in every dimension
LLAMA3 = (2048, 1024, 128256)  # a Llama-3 vocabulary
# bf16, the dtype people train in, gets every divergence at both shapes; fp16 and fp32 the
# paper's forward KL; bf16 also biases with a Gemma-2 softcap. (Each dtype x divergence x
# flag set compiles every kernel once: the list is kept short to fit a lent GPU's minutes.)
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
def test_triton_matches_truth_no_worse_than_torch(impl, dtype, divergence, shape, extra):
    N, D, V = shape
    softcap = extra.get("softcap")
    base = make_problem(N=N, D=D, V=V, kl_mask=True, bias=extra.get("bias", False), dtype=torch.float32)
    truth_p = _on_cuda(base, torch.float64) if V < 60000 else _on_cuda(base, torch.float32)
    truth = run(truth_p, impl="reference", divergence=divergence, softcap=softcap)
    plain = run(_on_cuda(base, dtype), impl="reference", divergence=divergence, softcap=softcap)
    # chunk_size 384 (chunked path): several chunks, the last one ragged.
    fast = run(_on_cuda(base, dtype), impl=impl, divergence=divergence, softcap=softcap, chunk_size=384)
    assert_no_worse_than_plain(truth, plain, fast, SLACK[dtype], f"{impl} {dtype} {divergence} {extra}")


@pytest.mark.parametrize("impl", ["triton", "triton_chunked"])
def test_deterministic(impl):
    p = _on_cuda(make_problem(N=3000, D=512, V=50000, dtype=torch.float32), torch.bfloat16)
    a, ga = run(p, impl=impl, chunk_size=1024)
    b, gb = run(p, impl=impl, chunk_size=1024)
    assert torch.equal(a.loss, b.loss)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_no_logits_sized_allocation():
    """Extra memory is O(N) statistics plus the gradients: far below one [N, V] bf16 matrix."""
    N, D, V = 8192, 1024, 128256
    p = _on_cuda(make_problem(N=N, D=D, V=V, dtype=torch.float32), torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="triton")
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    grads = p.h.numel() * 2 + p.W.numel() * 2
    fp32_accumulators = p.h.numel() * 4 + p.W.numel() * 4
    assert extra < grads + fp32_accumulators + 64 * 2**20, f"{extra / 2**20:.0f} MiB extra"
    assert extra < N * V * 2 / 4, "something of logits size was allocated"


def test_chunked_memory_is_its_chunk_buffers_plus_gradients():
    """Two [chunk, V] bf16 logit buffers, the float32 weight-gradient sums, the gradients and
    the zeroed copies of the hidden states; nothing of [N, V] size."""
    N, D, V, chunk = 8192, 1024, 128256, 1024
    p = _on_cuda(make_problem(N=N, D=D, V=V, dtype=torch.float32), torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="triton_chunked", chunk_size=chunk)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before
    expected = 2 * chunk * V * 2 + p.W.numel() * (4 + 2) + p.h.numel() * 2 * 3
    assert extra < expected + 64 * 2**20, f"{extra / 2**20:.0f} MiB extra, expected about {expected / 2**20:.0f}"


def test_weight_gradient_sums_are_float32_on_cuda():
    """cuBLAS accumulates the bf16 chunk products into float32 sums in place (torch >= 2.8);
    without it the chunked path would round the weight gradient once per chunk."""
    from sdft_kernels.torch_chunked import _fp32_accumulating_addmm

    device = torch.device("cuda", torch.cuda.current_device())
    for dtype in (torch.bfloat16, torch.float16):
        assert _fp32_accumulating_addmm(device, dtype), (
            f"torch {torch.__version__}: addmm(out_dtype=float32) of {dtype} products into a float32 "
            "buffer is unavailable"
        )


def test_auto_is_triton_chunked_on_cuda():
    p = _on_cuda(make_problem(N=100, D=64, V=1000, dtype=torch.float32), torch.float32)
    a, _ = run(p, impl="auto")
    b, _ = run(p, impl="triton_chunked")
    assert torch.equal(a.loss, b.loss)
