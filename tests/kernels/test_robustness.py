"""Every implementation under the inputs that real training produces besides the happy path.

Normalisers from an accumulated batch, NaN in rows that a term does not count, masked
vocabulary entries (-inf logits), strided and expanded per-row vectors, grad mode, a second
backward, autocast, and no host synchronisation in the hot path. Each test runs all four
implementations (the Triton ones in the interpreter here, on CUDA in test_cuda.py).
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from sdft_kernels import fused_linear_sdft_loss
from sdft_kernels import chunk_loop
from sdft_kernels.triton_common import dot_precision, on_device
from tests.kernels.helpers import assert_close, make_problem, run

INTERPRETER = os.environ.get("TRITON_INTERPRET") == "1"
FAST = ["torch", "triton", "triton_chunked"] if INTERPRETER else ["torch"]
ALL = ["reference", *FAST]
F64 = dict(rtol=1e-9, atol=1e-11)


def _grads_of(problem, impl, upstream=None, **kw):
    out, grads = run(problem, upstream, impl=impl, chunk_size=8, **kw)
    return out, grads


# ------------------------------------------------------------------------------ num_items


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("num_items", [7, 7.0, torch.tensor(7), torch.tensor([7.0])], ids=str)
def test_num_items_forms_agree(impl, num_items):
    p = make_problem(N=23, D=12, V=61, kl_mask=True)
    expected, expected_grads = _grads_of(p, "reference", num_items=7)
    out, grads = _grads_of(p, impl, num_items=num_items)
    assert out.loss.shape == ()
    assert_close(out.loss, expected.loss, what=f"{impl} loss", **F64)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, what=f"{impl} grad {i}", **F64)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("num_items", [0, torch.tensor(0)], ids=str)
def test_num_items_zero_is_an_empty_accumulated_batch(impl, num_items):
    p = make_problem(N=9, D=8, V=30, ignore_frac=1.0)  # nothing labelled: the KL follows the labels
    out, grads = _grads_of(p, impl, num_items=num_items)
    assert float(out.loss) == 0.0
    assert all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("num_items", [0, 0.0, torch.tensor(0), torch.tensor([0.0])], ids=str)
def test_num_items_zero_with_labelled_positions_is_refused(impl, num_items):
    """0 means an accumulated batch with nothing to count; with labelled positions "mean" would
    return their plain sum. Refused in the label validation's one host sync; "sum" and "none"
    do not use num_items."""
    p = make_problem(N=9, D=8, V=30, kl_mask=True)
    with pytest.raises(ValueError, match=r"num_items is 0 .* but \d+ positions have labels"):
        _grads_of(p, impl, num_items=num_items)
    total, _ = _grads_of(p, impl, num_items=num_items, reduction="sum")
    expected, _ = _grads_of(p, "reference", reduction="sum")
    assert_close(total.loss, expected.loss, what=f"{impl} sum", **F64)


@pytest.mark.parametrize("num_items", [0, torch.tensor(0)], ids=str)
def test_num_items_zero_check_shares_the_validation_sync(num_items):
    """Checking a num_items of 0 against the labels reads nothing more back to the host than
    the label validation already does (one ``tolist``)."""
    p = make_problem(N=9, D=8, V=30, ignore_frac=1.0)
    with _HostReads() as reads:
        fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl="reference", num_items=num_items)
    assert reads.calls == ["tolist"], reads.calls


# ----------------------------------------------------------- terms that do not count for a row


@pytest.mark.parametrize("impl", ALL)
def test_teacher_nan_in_rows_without_the_divergence_reaches_nothing(impl):
    """A row that carries only the cross-entropy gets nothing from its teacher, not 0 * NaN."""
    p = make_problem(N=21, D=12, V=53, kl_mask=True, bias=True)
    ce_only = (p.labels != -100) & ~p.kl_mask
    assert int(ce_only.sum()) >= 2
    clean, clean_grads = _grads_of(p, impl)
    p.ht = p.ht.masked_fill(ce_only.unsqueeze(1), float("nan"))
    out, grads = _grads_of(p, impl)
    assert_close(out.loss, clean.loss, what=f"{impl} loss", **F64)
    for i, (g, e) in enumerate(zip(grads, clean_grads)):
        assert_close(g, e, what=f"{impl} grad {i}", **F64)


# ------------------------------------------------------------------- masked vocabulary entries


def _masked_columns(V: int) -> torch.Tensor:
    """A whole leading run (longer than a tile, so a row's first tiles hold only -inf) and some
    scattered entries."""
    masked = torch.zeros(V, dtype=torch.bool)
    masked[:70] = True
    masked[torch.arange(90, V, 11)] = True
    return masked


def _kl_over_kept(p, masked, tau, divergence, beta):
    """The divergence rows with teacher mass 0 on ``masked`` written out over the kept columns
    only: an oracle that never forms 0 * log 0."""
    z_s = (p.h @ p.W.T + p.b) / tau
    z_t = ((p.ht @ p.Wt.T + p.bt) / tau)[:, ~masked]
    logp_s = z_s.log_softmax(-1)
    logp_t = z_t.log_softmax(-1)
    if divergence == "forward_kl":
        return (logp_t.exp() * (logp_t - logp_s[:, ~masked])).sum(-1)
    p_s, p_t = logp_s.exp(), torch.zeros_like(logp_s)
    p_t[:, ~masked] = logp_t.exp()
    mix = beta * p_t + (1 - beta) * p_s
    kl_t = (p_t[:, ~masked] * (logp_t - mix[:, ~masked].log())).sum(-1)
    kl_s = (p_s * (logp_s - mix.log())).sum(-1)
    return beta * kl_t + (1 - beta) * kl_s


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("jsd", 0.3)])
def test_teacher_logits_of_minus_inf_are_exact(impl, divergence, beta):
    V, tau = 160, 0.7
    p = make_problem(N=19, D=12, V=V, bias=True)
    masked = _masked_columns(V)
    p.bt = p.bt.masked_fill(masked, float("-inf"))
    out, grads = _grads_of(p, impl, divergence=divergence, jsd_beta=beta, temperature=tau, kl_weight=1.3)

    leaves = [t.detach().clone().requires_grad_(True) for t in (p.h, p.W, p.b)]
    q = make_problem(N=19, D=12, V=V, bias=True)
    q.h, q.W, q.b, q.bt = *leaves, p.bt
    counted = p.labels != -100
    ce = F.cross_entropy(q.h @ q.W.T + q.b, p.labels, reduction="sum")
    div = _kl_over_kept(q, masked, tau, divergence, beta)[counted].sum()
    expected = (ce + 1.3 * tau**2 * div) / counted.sum()
    expected_grads = torch.autograd.grad(expected, leaves)
    assert torch.isfinite(out.loss)
    assert_close(out.loss, expected, what=f"{impl} loss", **F64)
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert_close(g, e, what=f"{impl} grad {i}", **F64)


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_entries_masked_for_both_models_are_as_if_absent(impl, divergence):
    """Masking vocabulary entries with -inf in both heads equals the problem without them."""
    V = 160
    p = make_problem(N=19, D=12, V=V, bias=True, kl_mask=True)
    masked = _masked_columns(V)
    kept = (~masked).nonzero().squeeze(1)
    p.labels = torch.where(masked[p.labels.clamp(min=0)], -100, p.labels)  # no label on a masked entry
    with torch.no_grad():
        p.b.masked_fill_(masked, float("-inf"))
    p.bt = p.bt.masked_fill(masked, float("-inf"))
    out, (g_h, g_W, g_b) = _grads_of(p, impl, divergence=divergence, jsd_beta=0.4)

    small = make_problem(N=19, D=12, V=V, bias=True, kl_mask=True)
    small.h = p.h.detach().clone().requires_grad_(True)
    small.W = p.W.detach()[kept].clone().requires_grad_(True)
    small.b = p.b.detach()[kept].clone().requires_grad_(True)
    small.Wt, small.bt, small.kl_mask = p.Wt[kept], p.bt[kept], p.kl_mask
    rank = torch.cumsum(~masked, 0) - 1
    small.labels = torch.where(p.labels == -100, -100, rank[p.labels.clamp(min=0)])
    expected, (e_h, e_W, e_b) = _grads_of(small, "reference", divergence=divergence, jsd_beta=0.4)
    assert_close(out.loss, expected.loss, what=f"{impl} loss", **F64)
    assert_close(g_h, e_h, what=f"{impl} grad of hidden", **F64)
    assert_close(g_W[kept], e_W, what=f"{impl} grad of kept head rows", **F64)
    assert_close(g_b[kept], e_b, what=f"{impl} grad of kept bias", **F64)
    assert bool((g_W[masked] == 0).all()) and bool((g_b[masked] == 0).all())


# ------------------------------------------------------------ strided and expanded row vectors


@pytest.mark.parametrize("impl", ALL)
def test_strided_and_expanded_row_vectors(impl):
    N, V = 17, 45
    p = make_problem(N=N, D=10, V=V, bias=True, kl_mask=True)
    wide = make_problem(N=2 * N, D=10, V=2 * V, bias=True, kl_mask=True, seed=3)
    strided = dict(
        labels=torch.stack([p.labels, wide.labels[:N] % V], 1)[:, 0],  # stride 2
        kl_mask=torch.stack([p.kl_mask, ~p.kl_mask], 1)[:, 0],
        student_bias=torch.stack([p.b.detach(), p.b.detach()], 1)[:, 0].requires_grad_(True),
        teacher_bias=torch.stack([p.bt, -p.bt], 1)[:, 0],
    )
    assert strided["labels"].stride() == (2,) and strided["kl_mask"].stride() == (2,)
    args = (p.h, p.W, strided["labels"], p.ht, p.Wt)
    out = fused_linear_sdft_loss(*args, student_bias=strided["student_bias"], teacher_bias=strided["teacher_bias"],
                                 kl_mask=strided["kl_mask"], impl=impl, chunk_size=8)
    expected = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt,
                                      kl_mask=p.kl_mask, impl="reference")
    assert_close(out, expected, what=f"{impl} with strided vectors", **F64)

    everywhere = torch.tensor(True).expand(N)  # stride 0: reading it with stride 1 runs past it
    out = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=everywhere, impl=impl, chunk_size=8)
    expected = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, kl_mask=torch.ones(N, dtype=torch.bool),
                                      impl="reference")
    assert_close(out, expected, what=f"{impl} with an expanded kl_mask", **F64)


# ------------------------------------------------------------------ grad mode, second backward


@pytest.mark.parametrize("impl", FAST)
def test_no_gradient_is_formed_under_no_grad(impl, monkeypatch):
    p = make_problem(N=15, D=8, V=40)
    expected = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl).detach()

    def forbidden(*args, **kwargs):
        raise AssertionError("a gradient was formed under torch.no_grad()")

    monkeypatch.setattr(chunk_loop, "row_scales", forbidden)
    monkeypatch.setattr(chunk_loop, "accumulate_weight_grad", forbidden)
    with torch.no_grad():
        loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl)
    assert not loss.requires_grad
    assert_close(loss, expected, what=f"{impl} loss under no_grad", **F64)


@pytest.mark.parametrize("impl,reduction", [("reference", "mean"), ("torch", "none")]
                         + ([("triton", "mean"), ("triton", "none"), ("triton_chunked", "none")] if INTERPRETER else []))
def test_second_backward_through_a_retained_graph(impl, reduction):
    p = make_problem(N=15, D=8, V=40)
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl, reduction=reduction, chunk_size=8)
    upstream = torch.randn(loss.shape, dtype=loss.dtype)
    first = torch.autograd.grad(loss, (p.h, p.W), upstream, retain_graph=True)
    second = torch.autograd.grad(loss, (p.h, p.W), 2 * upstream)
    for a, b in zip(first, second):
        assert_close(b, 2 * a, what=f"{impl} second backward", **F64)


@pytest.mark.parametrize("impl", ["torch", "triton_chunked"] if INTERPRETER else ["torch"])
def test_second_backward_of_eager_gradients_is_refused_clearly(impl):
    p = make_problem(N=15, D=8, V=40)
    loss = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, impl=impl)
    torch.autograd.grad(loss, (p.h,), retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward.*retain_graph"):
        torch.autograd.grad(loss, (p.h,))


# ---------------------------------------------------------------------------------- autocast


@pytest.mark.parametrize("impl", ALL)
def test_autocast_runs_the_loss_in_its_dtype(impl):
    """Under autocast the GEMMs run in its dtype, as F.linear's would; gradients come back in
    the leaves' own dtype. float16 on CPU: Triton's interpreter mishandles bfloat16."""
    p = make_problem(N=21, D=16, V=50, dtype=torch.float32, bias=True)
    low = p.cast(torch.float16)
    expected, expected_grads = run(low, impl=impl, chunk_size=8)
    with torch.autocast("cpu", dtype=torch.float16):
        out, grads = run(p, impl=impl, chunk_size=8)
    assert_close(out.loss, expected.loss, what=f"{impl} loss under autocast", rtol=0, atol=0)
    # The reference's backward is plain autograd: run inside the autocast region (as here), its
    # float32 GEMMs of the float32 logits are autocast too: float16 GEMMs of a rounded logit
    # gradient, which the fused backwards skip.
    for i, (g, e) in enumerate(zip(grads, expected_grads)):
        assert g.dtype == torch.float32
        atol = 1e-3 * float(e.abs().max()) if impl == "reference" else 0.0
        assert_close(g, e, what=f"{impl} grad {i} under autocast", rtol=0, atol=atol)


# ---------------------------------------------------------- TF32 setting, device of a launch


def test_tf32_set_the_new_way_is_read():
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "tf32"
        assert dot_precision() == "tf32"
        matmul.fp32_precision = "ieee"
        assert dot_precision() == "ieee"
    finally:
        matmul.fp32_precision = before


def test_launches_run_on_the_tensors_device():
    class OnSecondGpu:  # what a launcher reads of a tensor on cuda:1
        device = torch.device("cuda", 1)

    guard = on_device(OnSecondGpu())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(on_device(torch.zeros(1)), torch.cuda.device)


# ------------------------------------------------------------------------ host synchronisation


class _HostReads(TorchFunctionMode):
    """Records the tensor methods that read a value back to the host."""

    READS = {"item", "__bool__", "tolist", "__int__", "__float__", "__index__", "nonzero"}

    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in self.READS:
            self.calls.append(name)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("impl", ALL)
@pytest.mark.parametrize("metrics", [False, True], ids=["", "metrics"])
def test_no_host_read_in_the_hot_path(impl, metrics):
    """With label validation off and a Python num_items, nothing reads a value back to the host:
    on CUDA that would be a synchronisation per call; nor do the metrics. (The CPU build drops
    uncounted rows by index, with one ``nonzero``, only on CPU, where it costs no
    synchronisation.)"""
    p = make_problem(N=20, D=16, V=70, dtype=torch.float32, bias=True, kl_mask=True)
    with _HostReads() as reads:
        out = fused_linear_sdft_loss(p.h, p.W, p.labels, p.ht, p.Wt, student_bias=p.b, teacher_bias=p.bt,
                                     kl_mask=p.kl_mask, impl=impl, validate_labels=False, num_items=13,
                                     metrics=metrics, return_components=True)
        out.loss.backward()
    assert (out.entropy is not None) == metrics
    allowed = {"nonzero"} if impl in ("torch", "triton_chunked") else set()
    assert set(reads.calls) <= allowed, reads.calls
